"""The papers' own NIH localisation and AUROC numbers, quoted for docs/nih-benchmark.md.

The numbers stand in ``benchmarks/_nih_paper_numbers.txt`` (copied from the plain-text papers
in ../shared/papers/), one row per paper and T(IoU) or AUROC, laid out like the papers'
tables; this module names each paper and the tables and rows its numbers come from
(``source``), and builds :data:`PAPERS` from both.

Localisation rows: T(IoU) -> accuracies of the eight boxed classes in
``cxrviewer.core.classes.BOXED_CLASSES`` order (Atelectasis, Cardiomegaly, Effusion,
Infiltration, Mass, Nodule, Pneumonia, Pneumothorax) followed by the mean. Where a paper
prints no mean, the mean of its eight values is computed here (``_with_mean``) and the
source says so. AUROC rows: class -> value (NIH class names) plus "Mean".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: The numbers, one white-space separated row per paper and T(IoU) or ``auroc``.
TABLE = Path(__file__).with_name("_nih_paper_numbers.txt")
#: A localisation cell where the paper prints no mean.
NOT_PRINTED = "-"


def _with_mean(vals: list[float]) -> list[float]:
    return list(vals) + [round(sum(vals) / len(vals), 2)]


_AUROC_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                  "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                  "Hernia", "Mean")


def read_table(path: Path = TABLE) -> dict[str, dict[str, Any]]:
    """Paper key -> ``{"iou": {T(IoU): 8 values + mean}}`` plus ``"auroc": {class: value}`` if given."""
    papers: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, what, *cells = line.split()
        paper = papers.setdefault(key, {"iou": {}})
        if what == "auroc" and len(cells) == len(_AUROC_CLASSES):
            paper["auroc"] = dict(zip(_AUROC_CLASSES, map(float, cells)))
        elif what != "auroc" and len(cells) == 9:
            vals = [float(c) for c in cells[:8]]
            paper["iou"][what] = _with_mean(vals) if cells[8] == NOT_PRINTED else vals + [float(cells[8])]
        else:
            raise ValueError(f"{path.name}:{n}: expected 9 localisation or {len(_AUROC_CLASSES)} AUROC values")
    return papers


_NUMBERS = read_table()


def _paper(key: str, name: str, source: str, **extra: Any) -> dict[str, Any]:
    """One entry of :data:`PAPERS`: its name and source, then its rows of the table."""
    return {"name": name, "source": source, **extra, **_NUMBERS[key]}


#: The papers' rows, in the order docs/nih-benchmark.md lists them.
PAPERS: list[dict] = [
    _paper("wang", "paper: ChestX-ray8 ResNet-50 CAM (Wang et al.)",
           "T(IoU)=0.1, 0.2, 0.4, 0.6: iterative-attention-mining.txt Table 2, rows 'ref.' (Acc. part of "
           "'Acc.-AFP'; mean computed by us); T(IoU)=0.3: baseline-cam-space-attention-gated.txt Table 2, "
           "column 'BL ResNet-50' (reported from ChestX-ray8; mean computed by us, rounded to 2 digits); "
           "T(IoU)=0.5, 0.7: disease-masks-attention.txt Table 1, rows 'X. Wang et al. [18]' (mean as "
           "printed). AUROC: disease-masks-attention.txt Table 3, column 'X. Wang et al. [18]'. Trained on "
           "~108k images, scored on the 984 official boxes (ChestX-ray8 protocol: the boxed images are "
           "test images)."),
    _paper("bl34", "paper: baseline ResNet-34 CAM (baseline-cam paper)",
           "baseline-cam-space-attention-gated.txt Table 2, column 'BL ResNet-34 (ours)', T(IoU)=0.3 only "
           "(other thresholds are promised in an appendix that the text does not contain); mean computed "
           "by us. Full NIH data, 256 px."),
    _paper("dm_base", "paper: DM base ResNet-50",
           "disease-masks-attention.txt Table 1, rows 'ResNet-50' (means as printed)."),
    _paper("dm_full", "paper: DM ResNet-50+Alignment+DM",
           "disease-masks-attention.txt Table 1, rows 'ResNet-50+Alignment+DM' (means as printed). AUROC: "
           "Table 3, column 'Ours'."),
    _paper("am", "paper: attention mining + KP (AM)",
           "iterative-attention-mining.txt Table 2, rows 'ours' (Acc. part of 'Acc.-AFP'; mean computed by "
           "us). Different protocol: a data-mining setting where the boxed images are also training "
           "images, so it is the least comparable row."),
    _paper("cia0", "paper: CIA-Net 0% boxes",
           "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 0% 'Ours' (T(IoU)=0.3, 0.7; "
           "means as printed); T(IoU)=0.1 and 0.5 from Table 2 rows 'Ours' (the same experiment: 100% "
           "unannotated, no boxes; Table 3's 0.5/0% row is garbled in our text copy, and "
           "disease-masks-attention.txt Table 1 'J. Liu et al.' quotes the Table 2 values). Scored on all "
           "880 boxed images. At T(IoU)=0.1 the printed mean is 0.60 although its eight values average "
           "0.57 (kept as printed). AUROC: Table 4 'Ours' (70/20 split, ResNet-50, 512 px).",
           mean_as_printed_differs=["0.1"]),
    _paper("cia40", "paper: CIA-Net 40% boxes",
           "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 40% 'Ours' (means as printed); "
           "5-fold CV, scored on the held-out annotated images."),
    _paper("cia80", "paper: CIA-Net 80% boxes",
           "cia-net-alignment-contrast-attention.txt Table 3, rows anno ratio 80% 'Ours' (means as printed); "
           "5-fold CV, scored on the held-out 20% annotated images."),
]
