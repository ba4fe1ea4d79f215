"""The papers' own NIH localisation and AUROC numbers, quoted for docs/nih-benchmark.md.

Localisation rows: T(IoU) -> accuracies of the eight boxed classes in
``cxrviewer.core.classes.BOXED_CLASSES`` order (Atelectasis, Cardiomegaly, Effusion,
Infiltration, Mass, Nodule, Pneumonia, Pneumothorax) followed by the mean. Where a paper
prints no mean, the mean of its eight values is computed here (``_with_mean``) and the
source line says so. AUROC rows: class -> value (NIH class names) plus "Mean".
All values are copied from the plain-text papers in ../shared/papers/.
"""
from __future__ import annotations


def _with_mean(vals: list[float]) -> list[float]:
    return list(vals) + [round(sum(vals) / len(vals), 2)]


_AUROC_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                  "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                  "Hernia", "Mean")


def _auroc(vals: list[float]) -> dict[str, float]:
    return dict(zip(_AUROC_CLASSES, vals))


PAPERS: list[dict] = [
    {"name": "paper: ChestX-ray8 ResNet-50 CAM (Wang et al.)",
     "source": "T(IoU)=0.1, 0.2, 0.4, 0.6: iterative-attention-mining.txt Table 2, rows 'ref.' (Acc. part of "
               "'Acc.-AFP'; mean computed by us); T(IoU)=0.3: baseline-cam-space-attention-gated.txt Table 2, "
               "column 'BL ResNet-50' (reported from ChestX-ray8; mean computed by us, rounded to 2 digits); "
               "T(IoU)=0.5, 0.7: disease-masks-attention.txt Table 1, rows 'X. Wang et al. [18]' (mean as "
               "printed). AUROC: disease-masks-attention.txt Table 3, column 'X. Wang et al. [18]'. Trained on "
               "~108k images, scored on the 984 official boxes (ChestX-ray8 protocol: the boxed images are "
               "test images).",
     "iou": {"0.1": _with_mean([0.69, 0.94, 0.66, 0.71, 0.40, 0.14, 0.63, 0.38]),
             "0.2": _with_mean([0.47, 0.68, 0.45, 0.48, 0.26, 0.05, 0.35, 0.23]),
             "0.3": _with_mean([0.24, 0.46, 0.30, 0.28, 0.15, 0.04, 0.17, 0.13]),
             "0.4": _with_mean([0.09, 0.28, 0.20, 0.12, 0.07, 0.01, 0.07, 0.07]),
             "0.5": [0.05, 0.18, 0.11, 0.07, 0.01, 0.01, 0.03, 0.03, 0.06],
             "0.6": _with_mean([0.02, 0.08, 0.05, 0.02, 0.00, 0.01, 0.02, 0.03]),
             "0.7": [0.01, 0.03, 0.02, 0.00, 0.00, 0.00, 0.01, 0.02, 0.01]},
     "auroc": _auroc([0.70, 0.81, 0.76, 0.66, 0.69, 0.67, 0.66, 0.80, 0.70, 0.81, 0.83, 0.79, 0.68, 0.87, 0.74])},
    {"name": "paper: baseline ResNet-34 CAM (baseline-cam paper)",
     "source": "baseline-cam-space-attention-gated.txt Table 2, column 'BL ResNet-34 (ours)', T(IoU)=0.3 only "
               "(other thresholds are promised in an appendix that the text does not contain); mean computed "
               "by us. Full NIH data, 256 px.",
     "iou": {"0.3": _with_mean([0.52, 0.99, 0.23, 0.58, 0.41, 0.04, 0.38, 0.14])}},
    {"name": "paper: DM base ResNet-50",
     "source": "disease-masks-attention.txt Table 1, rows 'ResNet-50' (means as printed).",
     "iou": {"0.3": [0.30, 0.82, 0.32, 0.21, 0.35, 0.10, 0.19, 0.20, 0.31],
             "0.5": [0.10, 0.60, 0.13, 0.15, 0.13, 0.01, 0.10, 0.12, 0.17],
             "0.7": [0.06, 0.21, 0.04, 0.07, 0.03, 0.00, 0.02, 0.03, 0.06]}},
    {"name": "paper: DM ResNet-50+Alignment+DM",
     "source": "disease-masks-attention.txt Table 1, rows 'ResNet-50+Alignment+DM' (means as printed). AUROC: "
               "Table 3, column 'Ours'.",
     "iou": {"0.3": [0.40, 0.97, 0.40, 0.58, 0.50, 0.14, 0.40, 0.38, 0.47],
             "0.5": [0.18, 0.80, 0.21, 0.25, 0.35, 0.05, 0.15, 0.16, 0.27],
             "0.7": [0.08, 0.41, 0.11, 0.11, 0.10, 0.01, 0.08, 0.11, 0.13]},
     "auroc": _auroc([0.79, 0.91, 0.84, 0.71, 0.85, 0.81, 0.73, 0.89, 0.74, 0.86, 0.95, 0.84, 0.80, 0.88, 0.83])},
    {"name": "paper: attention mining + KP (AM)",
     "source": "iterative-attention-mining.txt Table 2, rows 'ours' (Acc. part of 'Acc.-AFP'; mean computed by "
               "us). Different protocol: a data-mining setting where the boxed images are also training "
               "images, so it is the least comparable row.",
     "iou": {"0.1": _with_mean([0.68, 0.97, 0.65, 0.52, 0.56, 0.46, 0.65, 0.43]),
             "0.2": _with_mean([0.51, 0.90, 0.52, 0.44, 0.47, 0.27, 0.54, 0.24]),
             "0.3": _with_mean([0.33, 0.85, 0.34, 0.28, 0.33, 0.11, 0.39, 0.16]),
             "0.4": _with_mean([0.23, 0.73, 0.18, 0.20, 0.18, 0.03, 0.23, 0.11]),
             "0.5": _with_mean([0.11, 0.60, 0.10, 0.12, 0.07, 0.03, 0.17, 0.08]),
             "0.6": _with_mean([0.03, 0.44, 0.05, 0.06, 0.05, 0.01, 0.05, 0.07]),
             "0.7": _with_mean([0.01, 0.17, 0.01, 0.02, 0.01, 0.00, 0.02, 0.02])}},
    {"name": "paper: CIA-Net 0% boxes",
     "source": "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 0% 'Ours' (T(IoU)=0.3, 0.7; "
               "means as printed); T(IoU)=0.1 and 0.5 from Table 2 rows 'Ours' (the same experiment: 100% "
               "unannotated, no boxes; Table 3's 0.5/0% row is garbled in our text copy, and "
               "disease-masks-attention.txt Table 1 'J. Liu et al.' quotes the Table 2 values). Scored on all "
               "880 boxed images. At T(IoU)=0.1 the printed mean is 0.60 although its eight values average "
               "0.57 (kept as printed). AUROC: Table 4 'Ours' (70/20 split, ResNet-50, 512 px).",
     "mean_as_printed_differs": ["0.1"],
     "iou": {"0.1": [0.39, 0.90, 0.65, 0.85, 0.69, 0.38, 0.30, 0.39, 0.60],
             "0.3": [0.34, 0.71, 0.39, 0.65, 0.48, 0.09, 0.16, 0.20, 0.38],
             "0.5": [0.19, 0.53, 0.19, 0.47, 0.33, 0.03, 0.08, 0.11, 0.24],
             "0.7": [0.08, 0.30, 0.09, 0.25, 0.19, 0.01, 0.04, 0.07, 0.13]},
     "auroc": _auroc([0.79, 0.87, 0.88, 0.69, 0.81, 0.73, 0.75, 0.89, 0.79, 0.91, 0.93, 0.80, 0.80, 0.92, 0.83])},
    {"name": "paper: CIA-Net 40% boxes",
     "source": "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 40% 'Ours' (means as printed); "
               "5-fold CV, scored on the held-out annotated images.",
     "iou": {"0.3": [0.55, 0.73, 0.55, 0.76, 0.48, 0.22, 0.39, 0.30, 0.50],
             "0.5": [0.36, 0.57, 0.37, 0.62, 0.34, 0.13, 0.23, 0.17, 0.35],
             "0.7": [0.19, 0.47, 0.20, 0.41, 0.22, 0.06, 0.12, 0.11, 0.22]}},
    {"name": "paper: CIA-Net 80% boxes",
     "source": "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 80% 'Ours' (means as printed); "
               "5-fold CV, scored on the held-out 20% annotated images.",
     "iou": {"0.3": [0.54, 0.82, 0.55, 0.81, 0.49, 0.29, 0.51, 0.40, 0.55],
             "0.5": [0.38, 0.77, 0.42, 0.63, 0.34, 0.26, 0.39, 0.27, 0.43],
             "0.7": [0.18, 0.71, 0.31, 0.42, 0.25, 0.11, 0.26, 0.23, 0.31]}},
]
