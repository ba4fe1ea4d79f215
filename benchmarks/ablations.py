"""The papers' ablations reproduced on ONE phantom set (METHODS.md, "What each paper claims").

    python benchmarks/ablations.py --config quick [--seeds 3] [--out docs/ablations.md]
        [--claims align_dm,dm_pdm,...] [--threads 2] [--device cpu]

One phantom set (``PHANTOMS`` below, harder than the test phantoms: lower contrast, smaller
lesions, random pose) is written once; every claim trains its variants on the same patient-wise
split with the same recipe, once per seed (the seed changes the initialisation, the batch order
and the CIA box selection, never the data). Every model is scored on the held-out images:
localisation accuracy per boxed class at T(IoU) 0.3/0.5/0.7, AUROC per class, mean +- sd over
seeds, and the model-free floor (median training box per class, METHODS.md "Always report the
floor"). A claim's direction is *reproduced* when the claimed-better variant's headline mean is
higher and the mean +- sd intervals do not overlap, *not reproduced* when the opposite holds,
*inconclusive* when the intervals overlap.

Decisions (documented, not tuned per claim):

- ``+align`` warps every image with its ground-truth phantom pose (an oracle aligner: the
  alignment network's own quality is benchmarked in ``docs/alignment.md``); the aligned
  variants are scored in the aligned frame (boxes warped with the image), their floor too.
- DM (disease-masks Eq. 3-5) and PDM (Sec. 4.4, from the phantom lung/heart masks) both start
  from the aligned classifier and retrain ``finetune_epochs``.
- AM t=1 vs t=3 (attention-mining Eq. 7-8) is the same mined (KP) MSA network read with 1 or 3
  mining steps; KP vs no KP are two mining runs from the same trained MSA network, read with
  the T = 3 map. MSA vs none compares ``msa`` and ``cam_classifier`` CAMs (both plain CAM).
- CIA "base" (CIA-Net Table 3) is the same network without the contrast-induced attention
  (``F = F+``, one forward pass, same MIL + box loss): :class:`BaseGridNet`.
- Lung/heart weighting (M3) uses the phantom's own lung and heart masks as ``M_g`` for training
  and testing (the U-Net's masks are benchmarked in ``docs/segmentation.md``); the comparison
  is the same ``lung_heart`` network with ``M_g = 1`` (no weighting).

Partial results are written after every (seed, claim), so an interrupted run still leaves a
table (``<out>.json`` beside the markdown). The "Discussion" block of an existing ``--out`` file
(between ``<!-- discussion -->`` markers) is kept when the file is rewritten.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES  # noqa: E402
from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.models.cia import CIANet  # noqa: E402
from training.phantoms import PhantomConfig  # noqa: E402

log = logging.getLogger("ablations")

IOU_T = (0.3, 0.5, 0.7)
SMALL = ("Nodule", "Mass")

#: The one phantom set of every claim: harder than the tests' phantoms (contrast 1.5-2.0,
#: lesion scale 1.0-1.5, often no pose): contrast 1.2, default lesion size, random pose, up to
#: two findings, the eight boxed classes only (the six others would have no box to localise).
#: (A first quick run at contrast 0.9 / lesion scale 0.85 left every CPU-sized model at chance
#: AUROC, which can decide no claim; that run was stopped before any verdict, not tuned per claim.)
PHANTOMS = PhantomConfig(contrast=1.2, lesion_scale=1.0, normal_fraction=0.3, max_findings=2,
                         affine_rotation=8.0, affine_scale=0.08, affine_shift=0.05,
                         class_weights=tuple((c, 1.0) for c in BOXED_CLASSES))


@dataclass
class BenchConfig:
    """Sizes of one benchmark configuration."""

    name: str
    n_images: int
    size: int
    backbone: str
    epochs: int  # classifiers / CIA from scratch
    finetune_epochs: int  # DM / PDM retraining, attention mining
    batch_size: int
    lr: float
    cia_lr: float
    cia_head: int = 16
    share_encoder: bool = True
    data_seed: int = 0
    val_folds: int = 2  # patient-wise folds (of 5) held out for scoring
    claims: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


CONFIGS: dict[str, BenchConfig] = {
    # CPU (<= 40 min for 3 seeds on 2 cores): tiny backbone, 160 px (a 5x5 stride-32 CAM grid, 10x10
    # for MSA; at 128 px the 4x4 grid is too coarse for T(IoU) 0.3 on small findings). 960 phantoms x
    # 12 epochs: the first quick config (320 x 4 epochs) left every unaligned network at chance AUROC,
    # so 7 of 8 claims could not be decided; with this one every variant learns (mean AUROC
    # 0.67-0.89 over 3 seeds). 192 px was tried for small findings: nodule/mass boxes stayed at 0 for
    # every variant, so the extra time buys nothing (the same for every claim, not tuned per claim).
    "quick": BenchConfig("quick", n_images=960, size=160, backbone="tiny", epochs=12, finetune_epochs=4,
                         batch_size=16, lr=2e-3, cia_lr=3e-3),
    # GPU: ResNet-50 at 256 px, ten times the data, the papers' epoch counts.
    "full": BenchConfig("full", n_images=4000, size=256, backbone="resnet50", epochs=10, finetune_epochs=5,
                        batch_size=32, lr=1e-4, cia_lr=1e-3, cia_head=512, share_encoder=False, val_folds=1),
    # the smoke test's: seconds.
    "smoke": BenchConfig("smoke", n_images=40, size=64, backbone="tiny", epochs=1, finetune_epochs=1,
                         batch_size=16, lr=2e-3, cia_lr=3e-3),
}


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    paper: str
    variants: tuple[tuple[str, str], ...]  # (variant id, label)
    better: tuple[tuple[str, str], ...]  # (claimed better, claimed worse)
    metric: str = "loc"  # loc (mean acc over classes and T(IoU) 0.3/0.5/0.7) | auroc
    classes: tuple[str, ...] = BOXED_CLASSES  # classes of the headline metric
    frame: str = "raw"  # raw | aligned (which floor)


CLAIMS: tuple[Claim, ...] = (
    Claim("align_dm", "Align + DM > Align > plain CAM classifier", "disease-masks Table 1",
          (("base", "plain CAM"), ("align", "+align"), ("align_dm", "+align+DM")),
          (("align_dm", "align"), ("align", "base"))),
    Claim("dm_pdm", "DM masks learned from CAMs beat hand-drawn pseudo masks (PDM)", "disease-masks Table 2",
          (("pdm", "+align+PDM"), ("align_dm", "+align+DM")), (("align_dm", "pdm"),), frame="aligned"),
    Claim("am_steps", "AM t=3 beats t=1", "attention-mining Table 3",
          (("am_t1", "AM t=1"), ("am_t3", "AM t=3")), (("am_t3", "am_t1"),)),
    Claim("kp", "KP beats no KP", "attention-mining Table 3",
          (("mine_none", "AM, no KP"), ("mine_kp", "AM + KP")), (("mine_kp", "mine_none"),)),
    Claim("msa", "MSA helps small findings (nodule, mass)", "attention-mining Table 1",
          (("base", "plain CAM"), ("msa", "MSA")), (("msa", "base"),), classes=SMALL),
    Claim("cia_boxes", "more boxes -> better localisation; CIA > base at every ratio", "CIA-Net Table 3",
          (("base_0", "base 0%"), ("cia_0", "CIA 0%"), ("base_40", "base 40%"), ("cia_40", "CIA 40%"),
           ("base_80", "base 80%"), ("cia_80", "CIA 80%")),
          (("cia_40", "cia_0"), ("cia_80", "cia_40"), ("cia_0", "base_0"), ("cia_40", "base_40"),
           ("cia_80", "base_80"))),
    Claim("align_cia", "alignment improves both base and CIA", "CIA-Net Table 6",
          (("base_80", "base"), ("base_80_al", "base + align"), ("cia_80", "CIA"), ("cia_80_al", "CIA + align")),
          (("base_80_al", "base_80"), ("cia_80_al", "cia_80"))),
    Claim("negatives", "similarity-paired negatives beat random or canonical ones", "CIA-Net Table 5",
          (("cia_40", "paired"), ("cia_40_random", "random"), ("cia_40_canonical", "canonical")),
          (("cia_40", "cia_40_random"), ("cia_40", "cia_40_canonical"))),
    Claim("lung_heart", "lung/heart weighting raises mean AUROC", "lung-heart Table 2",
          (("lh_off", "M_g = 1"), ("lh_on", "F_l = F_g * M_g")), (("lh_on", "lh_off"),), metric="auroc"),
)
CLAIM_BY_KEY = {c.key: c for c in CLAIMS}
ALIGNED_VARIANTS = {"align", "align_dm", "pdm"}
ALIGNED_SUFFIX = "_al"  # a grid-network variant trained and scored on the aligned images (CIA-Net Table 6)


def is_aligned(vid: str) -> bool:
    """Whether variant ``vid`` lives in the aligned frame (trained, scored and floored there)."""
    return vid in ALIGNED_VARIANTS or vid.endswith(ALIGNED_SUFFIX)


# ---- data -------------------------------------------------------------------------------------
class MemDataset(Dataset):
    """Every item decoded once and kept in memory (the trainers' dataset protocol, no augmentation)."""

    def __init__(self, items: list[dict], records, size: int, normalisation: str = "minus1_1") -> None:
        self.images = torch.stack([it["image"] for it in items]) if items else torch.zeros(0, 1, size, size)
        self._labels = np.stack([it["labels"].numpy() for it in items]) if items else np.zeros((0, len(CLASSES)))
        self.boxes = [it["boxes"] for it in items]
        self.records = list(records)
        self.size = size
        self.normalisation = normalisation
        self.augment_cfg = None
        self.masks: torch.Tensor | None = None  # [N, 1, S, S] lung/heart masks when attached

    @classmethod
    def of(cls, ds: Dataset, records) -> "MemDataset":
        return cls([ds[i] for i in range(len(ds))], records, int(ds.size) if hasattr(ds, "size") else
                   int(ds[0]["image"].shape[-1]), str(getattr(ds, "normalisation", "minus1_1")))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "labels": torch.from_numpy(self._labels[i].astype(np.float32)),
                "boxes": self.boxes[i], "index": i}


def _boxes_of(arr: torch.Tensor) -> list[Box]:
    return [Box(CLASSES[int(r[0])], float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in arr.tolist()]


@dataclass
class Data:
    folder: Path
    train: MemDataset
    val: MemDataset
    train_al: MemDataset
    val_al: MemDataset
    thetas_train: torch.Tensor
    anatomy_train: object  # i -> [3, S, S]


def build_data(cfg: BenchConfig, work: Path) -> Data:
    """Write the phantom set, split it patient-wise (``val_folds`` of 5 held out), load it in memory."""
    from training.data import ChestDataset, load_records, patient_folds
    from training.phantoms import write_phantom_dataset
    from training.trainers.align import phantom_pose
    from training.trainers.disease_masks import AlignedDataset, anatomy_from_folder

    folder = work / "phantoms"
    if not (folder / "Data_Entry_2017.csv").exists():
        write_phantom_dataset(folder, n=cfg.n_images, size=cfg.size, seed=cfg.data_seed, config=PHANTOMS,
                              masks=True)
    records = load_records(folder)
    folds = patient_folds(records, 5, cfg.data_seed)
    tr = [r for r, f in zip(records, folds) if f >= cfg.val_folds]
    va = [r for r, f in zip(records, folds) if f < cfg.val_folds]
    train = MemDataset.of(ChestDataset(tr, cfg.size, seed=0), tr)
    val = MemDataset.of(ChestDataset(va, cfg.size, seed=0), va)
    truth = json.loads((folder / "phantom_truth.json").read_text())

    def thetas(recs) -> torch.Tensor:
        out = []
        for r in recs:
            g = phantom_pose(truth, r.key)
            if g is None:
                g = phantom_pose(truth, Path(r.path).name)
            out.append(g if g is not None else torch.eye(2, 3))
        return torch.stack(out)

    th_tr, th_va = thetas(tr), thetas(va)
    train_al = MemDataset.of(AlignedDataset(train, th_tr), tr)
    val_al = MemDataset.of(AlignedDataset(val, th_va), va)
    anat = anatomy_from_folder(tr, cfg.size)
    # lung/heart masks M_g (M3) from the phantom's own anatomy masks
    for ds, recs in ((train, tr), (val, va)):
        fn = anatomy_from_folder(recs, cfg.size)
        ds.masks = torch.stack([torch.from_numpy((np.asarray(fn(i)).max(0) > 0.5).astype(np.float32))[None]
                                for i in range(len(recs))])
    return Data(folder, train, val, train_al, val_al, th_tr, anat)


# ---- models -----------------------------------------------------------------------------------
class BaseGridNet(CIANet):
    """CIA-Net's "base" (CIA-Net Table 3): the same grid network without contrast-induced
    attention, ``F = F+`` (Eq. 3 with ``dM = 1``); the negative image is ignored."""

    def forward(self, x_pos: torch.Tensor, x_neg: torch.Tensor | None = None,
                upsample_to: int | None = None) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        f_pos = self.backbone(x_pos)["stage5"]
        h = f_pos
        if upsample_to:
            h = F.interpolate(h, size=(int(upsample_to),) * 2, mode="bilinear", align_corners=False)
        logits = self.head(h)
        log_none = -F.softplus(logits).flatten(2).sum(2)
        ones = torch.ones_like(f_pos[:, :1])
        return {"grid_logits": logits, "grid_probs": torch.sigmoid(logits), "image_probs": -torch.expm1(log_none),
                "attention": ones, "attention_pos": ones, "attention_neg": ones, "features": f_pos,
                "weighted_features": f_pos}


class _MaskedLH(torch.nn.Module):
    """Feeds a per-batch lung/heart mask to a ``lung_heart`` model (set ``mask`` before calling)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict:
        return self.model(x, lung_heart_mask=self.mask)

    def cam_weights(self):
        return self.model.cam_weights()


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(model: torch.nn.Module, ds: MemDataset, *, method: str = "cam", steps: int = 3,
             negatives=None, lh_masks: torch.Tensor | None = None) -> dict:
    """AUROC per class on ``ds`` and localisation accuracy at T(IoU) 0.3/0.5/0.7 on its boxed images.

    ``method`` is a registered explainer (``cam``, ``attention_mining`` with ``steps`` steps,
    attention-mining Eq. 7-8, or ``contrast``); its boxes come from its own box rule through
    :func:`training.evaluate.single_model_boxes`, the path the app's pipeline uses too.
    """
    from cxrviewer.core.explain.metrics import auroc_per_class, localization_table
    from training.evaluate import single_model_boxes

    model.eval()
    dev = next(model.parameters()).device
    probs, preds, gts = [], {}, {}
    for i in range(len(ds)):
        item = ds[i]
        gt = _boxes_of(item["boxes"])
        cls = sorted({CLASSES.index(b.label) for b in gt if b.label in BOXED_CLASSES})
        if isinstance(model, _MaskedLH):
            model.mask = lh_masks[i:i + 1].to(dev) if lh_masks is not None else None
        neg = negatives(i).to(dev) if negatives is not None else None
        p, b = single_model_boxes(model, item["image"].to(dev), cls, method, negative=neg,
                                  steps=steps if method == "attention_mining" else None)
        probs.append(p)
        if gt:
            preds[i], gts[i] = b, gt
    au = auroc_per_class(np.stack(probs), ds.labels)
    tab = localization_table(preds, gts, metric="iou", thresholds=IOU_T)
    return {"auroc": {c: _num(v) for c, v in zip(CLASSES, au) if c in BOXED_CLASSES},
            "iou": {f"{t:g}": {c: _num(r.accuracy) for c, r in row.items()} for t, row in tab.items()},
            "n": {c: int(r.n_images) for c, r in tab[IOU_T[0]].items()}}


def floor_result(train: MemDataset, val: MemDataset) -> dict:
    from cxrviewer.core.explain.metrics import floor_table

    train_boxes = [b for i in range(len(train)) for b in _boxes_of(train.boxes[i])]
    gts = {i: _boxes_of(val.boxes[i]) for i in range(len(val)) if len(val.boxes[i])}
    tab = floor_table(train_boxes, gts, metric="iou", thresholds=IOU_T)
    return {"iou": {f"{t:g}": {c: _num(r.accuracy) for c, r in row.items()} for t, row in tab.items()},
            "n": {c: int(r.n_images) for c, r in tab[IOU_T[0]].items()}}


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


# ---- training ---------------------------------------------------------------------------------
class Runner:
    """Trains (and caches per seed) every variant a claim needs."""

    def __init__(self, cfg: BenchConfig, data: Data, work: Path, device: str) -> None:
        self.cfg, self.data, self.work, self.device = cfg, data, work, device
        self.models: dict[str, torch.nn.Module] = {}
        self.extras: dict[str, dict] = {}
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        self.seed, self.models, self.extras = seed, {}, {}

    def tcfg(self, name: str, *, epochs: int | None = None, lr: float | None = None, **kw):
        from training.trainers.loop import TrainConfig

        return TrainConfig(epochs=epochs or self.cfg.epochs, batch_size=self.cfg.batch_size, lr=lr or self.cfg.lr,
                           seed=self.seed, log_every=0, device=self.device,
                           out_dir=str(self.work / f"seed{self.seed}" / name), **kw)

    def _new(self, arch: str, **kw) -> torch.nn.Module:
        from cxrviewer.core.models import create_model

        torch.manual_seed(self.seed)
        return create_model(arch, backbone=self.cfg.backbone, **kw)

    def get(self, vid: str) -> torch.nn.Module:
        if vid not in self.models:
            t0 = time.perf_counter()
            self.models[vid] = self._train(vid)
            log.info("seed %d: trained %s in %.0f s", self.seed, vid, time.perf_counter() - t0)
        return self.models[vid]

    def _train(self, vid: str) -> torch.nn.Module:
        from training.trainers.classify import train_classifier
        from training.trainers.disease_masks import train_disease_masks
        from training.trainers.mine import MiningConfig, mine

        d, c = self.data, self.cfg
        if vid == "base":
            return train_classifier(self._new("cam_classifier"), d.train, None, self.tcfg(vid))[0]
        if vid == "align":
            return train_classifier(self._new("cam_classifier"), d.train_al, None, self.tcfg(vid))[0]
        if vid in ("align_dm", "pdm"):
            al = copy.deepcopy(self.get("align"))
            warp = None
            if vid == "pdm":
                from cxrviewer.core.models.alignment import warp as warp_fn

                th = d.thetas_train

                def warp(maps: torch.Tensor, i: int) -> torch.Tensor:
                    return warp_fn(maps[None].float(), th[i][None])[0]
            res = train_disease_masks(al, d.train_al, None, self.tcfg(vid, epochs=c.finetune_epochs),
                                      pseudo=d.anatomy_train if vid == "pdm" else None, pseudo_warp=warp)
            return res.model
        if vid == "msa":
            return train_classifier(self._new("msa"), d.train, None, self.tcfg(vid))[0]
        if vid in ("mine_none", "mine_kp"):
            m = copy.deepcopy(self.get("msa"))
            kp = vid.split("_")[1]
            return mine(m, d.train, None, self.tcfg(vid, epochs=c.finetune_epochs), MiningConfig(kp=kp))[0]
        if vid.startswith(("cia_", "base_")):
            return self._train_cia(vid)
        if vid in ("lh_on", "lh_off"):
            return self._train_lh(vid == "lh_on")
        raise KeyError(vid)

    def _train_cia(self, vid: str) -> torch.nn.Module:
        from training.trainers.cia import train_cia

        aligned = is_aligned(vid)  # CIA-Net Table 6: the same recipe on the (oracle-)aligned images
        parts = vid.removesuffix(ALIGNED_SUFFIX).split("_")
        kind, frac = parts[0], int(parts[1]) / 100.0
        neg = parts[2] if len(parts) > 2 else "paired"
        c = self.cfg
        torch.manual_seed(self.seed)
        if kind == "base":
            model = BaseGridNet(backbone=c.backbone, head_channels=c.cia_head, share_encoder=True)
        else:
            model = self._new("cia", head_channels=c.cia_head, share_encoder=c.share_encoder)
        cfg = self.tcfg(vid, lr=c.cia_lr, optimizer="adam" if c.backbone == "tiny" else "sgd",
                        weight_decay=0.0 if c.backbone == "tiny" else 1e-4,
                        lr_step_epochs=max(c.epochs - 1, 1) if c.backbone == "tiny" else 5)
        train = self.data.train_al if aligned else self.data.train
        model, _, extras, _ = train_cia(model, train, None, cfg, box_fraction=frac, negatives=neg)
        self.extras[vid] = extras
        return model

    def _train_lh(self, on: bool) -> torch.nn.Module:
        from training.losses import weighted_bce
        from training.trainers.classify import train_classifier

        masks = self.data.train.masks

        def loss_fn(model: torch.nn.Module, batch: dict):
            m = masks[batch["index"].cpu()].to(batch["image"].device) if on else None
            out = model(batch["image"], lung_heart_mask=m)
            return weighted_bce(out["logits"].float(), batch["labels"]), {}

        model = train_classifier(self._new("lung_heart"), self.data.train, None, self.tcfg("lh_on" if on else "lh_off"),
                                 loss_fn=loss_fn)[0]
        return _MaskedLH(model)

    def score(self, vid: str) -> dict:
        """Held-out scores of variant ``vid`` (trains what it needs)."""
        d = self.data
        val = d.val_al if is_aligned(vid) else d.val
        if vid in ("am_t1", "am_t3"):
            return evaluate(self.get("mine_kp"), d.val, method="attention_mining", steps=1 if vid == "am_t1" else 3)
        if vid in ("mine_none", "mine_kp"):
            return evaluate(self.get(vid), d.val, method="attention_mining", steps=3)
        if vid.startswith(("cia_", "base_")):
            from training.trainers.cia import bank_negatives

            model = self.get(vid)
            if vid.startswith("base_"):
                return evaluate(model, val, method="contrast", negatives=lambda i: val[i]["image"])
            bank = SimpleNamespace(extras=self.extras[vid], path="",
                                   manifest=SimpleNamespace(normalisation={"kind": val.normalisation}))
            return evaluate(model, val, method="contrast", negatives=bank_negatives(bank, val))
        if vid in ("lh_on", "lh_off"):
            return evaluate(self.get(vid), d.val, method="cam", lh_masks=d.val.masks if vid == "lh_on" else None)
        return evaluate(self.get(vid), val, method="cam")


# ---- aggregation and the report ---------------------------------------------------------------
def _mean_sd(vals: list[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(m: float | None, s: float | None) -> str:
    if m is None:
        return "–"
    return f"{m:.2f} ± {s:.2f}" if s is not None else f"{m:.2f}"


def headline(claim: Claim, res: dict) -> float | None:
    """Per-seed headline number: mean over ``claim.classes`` (and T(IoU) 0.3/0.5/0.7) or mean AUROC."""
    if claim.metric == "auroc":
        v = [res["auroc"].get(c) for c in claim.classes]
    else:
        v = [res["iou"][f"{t:g}"].get(c) for t in IOU_T for c in claim.classes if res["n"].get(c)]
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


#: Below this mean AUROC (over the boxed classes) a network has not learnt the task; a pair where
#: both variants are below it cannot decide a claim, whatever their localisation numbers.
CHANCE_AUROC = 0.55
#: Smallest headline difference that counts: one more correct box of one class at one threshold
#: moves the headline by about 1 / (n boxed images x 8 classes x 3 thresholds) ~ 0.004 here.
MIN_EFFECT = 0.02


def mean_auroc(res: dict) -> float | None:
    v = [x for x in res["auroc"].values() if x is not None]
    return float(np.mean(v)) if v else None


def verdict(claim: Claim, per_variant: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """(overall verdict, one line per claimed pair)."""
    lines, states = [], []
    for good, bad in claim.better:
        a = [headline(claim, r) for r in per_variant.get(good, [])]
        b = [headline(claim, r) for r in per_variant.get(bad, [])]
        ma, sa, na = _mean_sd(a)
        mb, sb, nb = _mean_sd(b)
        labels = dict(claim.variants)
        if ma is None or mb is None:
            states.append("pending")
            lines.append(f"{labels[good]} vs {labels[bad]}: pending")
            continue
        wins = sum(1 for x, y in zip(a, b) if x is not None and y is not None and x > y)
        overlap = (ma - sa) <= (mb + sb) and (mb - sb) <= (ma + sa)
        au_a = _mean_sd([mean_auroc(r) for r in per_variant.get(good, [])])[0]
        au_b = _mean_sd([mean_auroc(r) for r in per_variant.get(bad, [])])[0]
        at_chance = max(x for x in (au_a, au_b, 0.0) if x is not None) < CHANCE_AUROC
        if na < 2 or nb < 2:
            st = "inconclusive (one seed)"
        elif at_chance:
            st = f"inconclusive (both at chance: mean AUROC {au_a:.2f} / {au_b:.2f} < {CHANCE_AUROC})"
        elif overlap:
            st = "inconclusive"
        elif abs(ma - mb) < MIN_EFFECT:
            st = f"inconclusive (|diff| < {MIN_EFFECT})"
        else:
            st = "reproduced" if ma > mb else "not reproduced"
        states.append(st)
        lines.append(f"{labels[good]} {ma:.3f} ± {sa:.3f} vs {labels[bad]} {mb:.3f} ± {sb:.3f} "
                     f"(diff {ma - mb:+.3f}; better in {wins}/{min(na, nb)} seeds): **{st}**")
    if not states or all(s == "pending" for s in states):
        return "pending", lines
    states = [s.split(" (")[0] if s.startswith("inconclusive") else s for s in states]
    if all(s == "reproduced" for s in states):
        return "reproduced", lines
    if any(s == "not reproduced" for s in states):
        ok = sum(s == "reproduced" for s in states)
        return ("not reproduced" if ok == 0 else f"partly ({ok}/{len(states)} pairs reproduced, "
                f"{sum(s == 'not reproduced' for s in states)} reversed)"), lines
    ok = sum(s == "reproduced" for s in states)
    return ("inconclusive" if ok == 0 else f"partly ({ok}/{len(states)} pairs reproduced, rest inconclusive)"), lines


def claim_markdown(claim: Claim, per_variant: dict[str, list[dict]], floors: dict[str, dict]) -> str:
    short = [c.replace("_", " ") for c in BOXED_CLASSES]
    out = [f"### {claim.title} ({claim.paper})", ""]
    overall, lines = verdict(claim, per_variant)
    metric = ("mean AUROC over the eight boxed classes" if claim.metric == "auroc" else
              "mean localisation accuracy over " + ("/".join(claim.classes) if claim.classes != BOXED_CLASSES
                                                    else "the boxed classes") + " and T(IoU) 0.3/0.5/0.7")
    out += [f"Verdict: **{overall}** (headline: {metric}, mean ± sd over seeds)", ""]
    out += [f"- {ln}" for ln in lines] + [""]
    frames = [f for f, hit in (("raw", any(not is_aligned(v) for v, _ in claim.variants)),
                                ("aligned", any(is_aligned(v) for v, _ in claim.variants))) if hit]
    for t in IOU_T:
        key = f"{t:g}"
        out += [f"Localisation accuracy at T(IoU) = {t:g}", "",
                "| variant | seeds | " + " | ".join(short) + " | Mean |", "|---|---|" + "---|" * (len(short) + 1)]
        for vid, label in claim.variants:
            runs = per_variant.get(vid, [])
            if not runs:
                continue
            cells, means = [], []
            for c in BOXED_CLASSES:
                m, s, _ = _mean_sd([r["iou"][key].get(c) for r in runs])
                cells.append(_fmt(m, s))
            for r in runs:
                v = [r["iou"][key].get(c) for c in BOXED_CLASSES if r["n"].get(c)]
                v = [x for x in v if x is not None]
                means.append(float(np.mean(v)) if v else None)
            out.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {_fmt(*_mean_sd(means)[:2])} |")
        for frame in frames:
            floor = floors[frame]
            fr = floor["iou"][key]
            fv = [fr.get(c) for c in BOXED_CLASSES if floor["n"].get(c)]
            fv = [x for x in fv if x is not None]
            name = "floor (median box)" + (", aligned frame" if frame == "aligned" else "")
            out.append(f"| {name} | – | " + " | ".join(_fmt(fr.get(c), None) for c in BOXED_CLASSES)
                       + f" | {_fmt(float(np.mean(fv)) if fv else None, None)} |")
        out.append("| n boxed images | | " + " | ".join(str(floors[frames[0]]["n"].get(c, 0)) for c in BOXED_CLASSES)
                   + " | |")
        out.append("")
    out += ["AUROC", "", "| variant | " + " | ".join(short) + " | Mean |", "|---|" + "---|" * (len(short) + 1)]
    for vid, label in claim.variants:
        runs = per_variant.get(vid, [])
        if not runs:
            continue
        cells = [_fmt(*_mean_sd([r["auroc"].get(c) for r in runs])[:2]) for c in BOXED_CLASSES]
        means = []
        for r in runs:
            v = [r["auroc"].get(c) for c in BOXED_CLASSES]
            v = [x for x in v if x is not None]
            means.append(float(np.mean(v)) if v else None)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(*_mean_sd(means)[:2])} |")
    out.append("")
    return "\n".join(out)


DISCUSSION_START, DISCUSSION_END = "<!-- discussion -->", "<!-- /discussion -->"


def write_report(out: Path, state: dict, *, final: bool) -> None:
    cfg = state["config"]
    claims = [CLAIM_BY_KEY[k] for k in state["claims"]]
    lines = ["# Ablations on phantoms", "",
             "Generated by `benchmarks/ablations.py` (" + ("complete run" if final else
                                                         "PARTIAL: the run was still going or was interrupted") + ").",
             "", f"- Command: `{state['command']}`",
             f"- Wall time: {state['wall_s'] / 60:.1f} min ({state['wall_s']:.0f} s) on {state['machine']}",
             f"- Seeds done: {state['seeds_done']} of {state['seeds']} (seed = initialisation, batch order, CIA box "
             "selection; the data never changes)",
             f"- Config `{cfg['name']}`: {cfg['n_images']} phantoms at {cfg['size']} px, backbone `{cfg['backbone']}`, "
             f"{cfg['epochs']} epochs from scratch, {cfg['finetune_epochs']} fine-tune epochs (DM/PDM/mining), batch "
             f"{cfg['batch_size']}, Adam lr {cfg['lr']} (CIA {cfg['cia_lr']}); held out: patient-wise folds "
             f"0-{cfg['val_folds'] - 1} of 5 ({state['n_val']} images, {state['n_train']} for training)",
             f"- Phantoms (the same for every claim): `{state['phantoms']}`",
             "- Scores: localisation accuracy per boxed class at T(IoU) 0.3/0.5/0.7 (CAM: ChestX-ray8 threshold; AM: "
             "three ranked boxes; CIA: positive grid cells), AUROC per class; `mean ± sd` over seeds; `–` = no "
             "positive/boxed image of that class. Floor = one fixed box per class (median training box).",
             "- Verdict rule, per claimed pair: reproduced when the claimed-better variant's headline is higher, "
             "the mean ± sd intervals do not overlap and the difference is at least "
             f"{MIN_EFFECT}; not reproduced when lower on the same terms; otherwise inconclusive, and always "
             f"inconclusive when both variants are at chance (mean AUROC < {CHANCE_AUROC}: the network learnt "
             "nothing, so its boxes are noise) or with one seed.",
             "", "## Summary", "", "| claim | paper | verdict |", "|---|---|---|"]
    for cl in claims:
        lines.append(f"| {cl.title} | {cl.paper} | {verdict(cl, state['results'].get(cl.key, {}))[0]} |")
    lines += ["", "## Tables", ""]
    for cl in claims:
        lines += [claim_markdown(cl, state["results"].get(cl.key, {}), state["floors"]), ""]
    lines += ["## Discussion", ""]
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    if DISCUSSION_START in old and DISCUSSION_END in old:
        lines.append(old[old.index(DISCUSSION_START):old.index(DISCUSSION_END) + len(DISCUSSION_END)])
    else:
        lines += [DISCUSSION_START, "(to be written from the tables above)", DISCUSSION_END]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")


# ---- driver -----------------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, *, seeds: int, out: Path, claims: tuple[str, ...], work: Path,
                  device: str = "cpu", command: str = "") -> dict:
    """Run ``claims`` for ``seeds`` seeds (seed-major: after seed 0 every claim has a number)."""
    t0 = time.perf_counter()
    data = build_data(cfg, work)
    floors = {"raw": floor_result(data.train, data.val), "aligned": floor_result(data.train_al, data.val_al)}
    import platform

    state = {"command": command, "config": asdict(cfg), "phantoms": repr(PHANTOMS), "claims": list(claims),
             "seeds": seeds, "seeds_done": 0, "wall_s": 0.0, "n_train": len(data.train), "n_val": len(data.val),
             "machine": f"{platform.machine()} CPU x{torch.get_num_threads()} threads" if device == "cpu" else device,
             "floors": floors, "results": {k: {} for k in claims}}
    runner = Runner(cfg, data, work, device)
    for seed in range(seeds):
        runner.set_seed(seed)
        scored: dict[str, dict] = {}
        for key in claims:
            cl = CLAIM_BY_KEY[key]
            for vid, _ in cl.variants:
                if vid not in scored:
                    scored[vid] = runner.score(vid)
                state["results"][key].setdefault(vid, []).append(scored[vid])
            state["wall_s"] = time.perf_counter() - t0
            write_report(out, state, final=False)
            log.info("seed %d claim %s done at %.0f s: %s", seed, key, state["wall_s"],
                     verdict(cl, state["results"][key])[0])
        state["seeds_done"] = seed + 1
    state["wall_s"] = time.perf_counter() - t0
    write_report(out, state, final=True)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="quick")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "docs" / "ablations.md"))
    p.add_argument("--claims", default=",".join(c.key for c in CLAIMS),
                   help="comma-separated subset of: " + ", ".join(c.key for c in CLAIMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--work", default=None, help="folder for phantoms and runs (default: a temporary folder)")
    p.add_argument("--from-json", default=None, help="only re-render --out from a saved <out>.json state")
    args = p.parse_args(argv)
    if args.from_json:
        state = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        write_report(Path(args.out), state, final=state["seeds_done"] >= state["seeds"])
        print(f"re-rendered {args.out} from {args.from_json}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, args.threads))
    claims = tuple(k.strip() for k in args.claims.split(",") if k.strip())
    unknown = [k for k in claims if k not in CLAIM_BY_KEY]
    if unknown:
        p.error(f"unknown claims {unknown}")
    cfg = replace(CONFIGS[args.config], claims=claims)
    command = "python benchmarks/ablations.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="ablations-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        state = run_benchmark(cfg, seeds=args.seeds, out=Path(args.out), claims=claims, work=work,
                              device=args.device, command=command)
    print(f"wrote {args.out} ({state['wall_s']:.0f} s)")
    for k in claims:
        print(f"{k}: {verdict(CLAIM_BY_KEY[k], state['results'][k])[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
