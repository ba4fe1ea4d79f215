"""CIA-Net training with limited box supervision (cia-net-alignment-contrast-attention.txt, M4).

- Pairing (Sec. 4.4): every training image gets a normal ("No Finding") training image as its
  negative: the one whose 16x16 hash code (:func:`cxrviewer.core.models.cia.hash_codes`, on
  [0, 1] pixels as the pipeline computes them) is nearest by cosine distance. Codes are
  computed once, on the un-augmented images. A normal image used as a positive is paired with
  its nearest *other* normal. Ablations (Table 5): ``random`` (a random normal per
  (seed, epoch, image)) and ``canonical`` (``resources/canonical_chest.png`` if present, else
  the mean training normal).
- Loss (Eq. 4-6, :func:`training.losses.cia_loss`): for an image whose boxes are *revealed*,
  each class with a box gets the per-grid BCE against ``box_to_grid`` labels (weight
  ``beta_B``); every other class (and every class of an unrevealed image) gets the MIL loss
  on its image label. Normal images are positives with all-zero labels (MIL with label 0).
- ``box_fraction`` (Table 3: 0 / 40 / 80 % annotated) keeps the boxes of that share of the
  boxed training images, chosen by a seeded hash of the image key (:func:`select_revealed`),
  so the choice is deterministic and the 40 % set is a subset of the 80 % set.
- Optimiser (Sec. 4.1 "Training"): SGD with Nesterov momentum 0.9, lr 1e-3 divided by 10 every
  5 epochs, weight decay 1e-4 (the command's defaults; Adam stays available for tiny runs).
- The bundle stores a bank of normal images (uint8 at the input size, their hash codes and
  ids) as extras; :func:`bank_negatives` and the app's pipeline pair against it at inference.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxrviewer.core.canonical import default_canonical_path, load_canonical
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.errors import CxrError
from cxrviewer.core.geometry import Box
from cxrviewer.core.preprocess import Preprocess

from ..data.dataset import dataset_preprocess
from ..losses import cia_loss
from .loop import TrainConfig, Trainer, use_monitor

log = logging.getLogger(__name__)

NEGATIVE_MODES: tuple[str, ...] = ("paired", "random", "canonical")

__all__ = [
    "NEGATIVE_MODES", "select_revealed", "image_codes", "pair_indices", "NormalPool", "CIAPairs",
    "cia_collate", "grid_targets", "make_cia_loss", "normal_bank_extras", "train_cia", "bank_negatives", "with_bank_attention",
    "evaluate_cia", "prepare_pairs", "init_head_prior", "canonical_negative",
]


# ---- helpers on datasets -------------------------------------------------------------------
def dataset_keys(ds: Dataset) -> list[str]:
    """Image keys of a :class:`ChestDataset` (records) or :class:`CachedDataset` (rows)."""
    if hasattr(ds, "records"):
        return [r.key for r in ds.records]
    if hasattr(ds, "keys") and hasattr(ds, "rows"):
        return [ds.keys[int(r)] for r in ds.rows]
    return [str(i) for i in range(len(ds))]


def dataset_boxes(ds: Dataset) -> list[list[Box]]:
    """Ground-truth boxes per item, read without decoding images."""
    if hasattr(ds, "records"):
        return [list(r.boxes) for r in ds.records]
    if hasattr(ds, "boxes_of"):
        return [ds.boxes_of(i) for i in range(len(ds))]
    classes = getattr(ds, "classes", CLASSES)
    return [[Box(classes[int(r[0])], *map(float, r[1:5])) for r in ds[i]["boxes"].tolist()] for i in range(len(ds))]


def plain_view(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` without augmentation (for hash codes and negatives)."""
    view = copy.copy(ds)
    if hasattr(view, "augment_cfg"):
        view.augment_cfg = None
    return view


# ---- box-fraction selection -----------------------------------------------------------------
def _key_rank(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"cia-boxes:{seed}:{key}".encode()).digest()[:8], "little")


def select_revealed(keys: Sequence[str], has_boxes: Sequence[bool], fraction: float, seed: int = 0) -> np.ndarray:
    """Which images keep their boxes: ``round(fraction * n_boxed)`` of the boxed images.

    Ranked by a seeded hash of the key, so the choice depends only on (keys, seed): the same
    seed gives the same set, and a smaller fraction selects a subset of a larger one
    (CIA-Net Table 3's annotated ratios).
    """
    if not 0.0 <= fraction <= 1.0:
        raise CxrError(f"box fraction must be in [0, 1], got {fraction}")
    boxed = [i for i, h in enumerate(has_boxes) if h]
    n_keep = int(round(fraction * len(boxed)))
    keep = sorted(boxed, key=lambda i: (_key_rank(keys[i], seed), i))[:n_keep]
    out = np.zeros(len(keys), dtype=bool)
    out[keep] = True
    return out


# ---- hash codes and pairing -----------------------------------------------------------------
@torch.no_grad()
def image_codes(ds: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                mean_of: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hash codes ``[N, 256]`` of every item of ``ds`` (un-augmented, [0, 1] pixels; CIA Sec. 4.4).

    ``mean_of`` (bool [N]) also returns the mean [0, 1] image ``[1, S, S]`` of those items.
    """
    from cxrviewer.core.models.cia import hash_codes

    from ..data import collate

    view = plain_view(ds)
    pre = dataset_preprocess(ds)
    codes, total, count = [], None, 0
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    for batch in loader:
        x01 = pre.denormalise(batch["image"].float())
        codes.append(hash_codes(x01))
        if mean_of is not None:
            sel = torch.as_tensor(mean_of[batch["index"].numpy()], dtype=torch.bool)
            if sel.any():
                s = x01[sel].sum(0)
                total = s if total is None else total + s
                count += int(sel.sum())
    allc = torch.cat(codes) if codes else torch.zeros(0, 256)
    return allc, (total / count if count else None)


def pair_indices(codes: torch.Tensor, pool_codes: torch.Tensor, exclude: torch.Tensor | None = None,
                 chunk: int = 4096) -> torch.Tensor:
    """Nearest pool entry by cosine similarity for each code (``nearest_normals``, batched).

    ``exclude[i]`` (pool position or -1) is never chosen for query ``i`` (a normal is not its own pair).
    """
    from cxrviewer.core.models.cia import cosine_similarity_matrix

    if pool_codes.shape[0] == 0:
        raise CxrError("no normal images to pair with")
    out = []
    for s in range(0, codes.shape[0], chunk):
        sim = cosine_similarity_matrix(codes[s:s + chunk], pool_codes)
        if exclude is not None and pool_codes.shape[0] > 1:
            ex = exclude[s:s + chunk]
            rows = torch.nonzero(ex >= 0).flatten()
            sim[rows, ex[rows]] = -float("inf")
        out.append(sim.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class NormalPool:
    """The normal training images: dataset positions, hash codes, un-augmented access."""

    def __init__(self, ds: Dataset, positions: np.ndarray, codes: torch.Tensor) -> None:
        self.view = plain_view(ds)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.codes = codes
        self.keys = [dataset_keys(ds)[int(p)] for p in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def image(self, j: int) -> torch.Tensor:
        """Normalised image ``[1, S, S]`` of pool entry ``j``."""
        return self.view[int(self.positions[j])]["image"]


def canonical_negative(size: int, pre: Preprocess, path: str | Path | None = None,
                       mean01: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Canonical chest ``[1, S, S]`` normalised by ``pre`` and where it came from: the PNG, else the mean normal."""
    p = Path(path) if path else default_canonical_path()
    if p.is_file():
        return pre.normalise(load_canonical(p, size, antialias=False)[0]), str(p)
    if mean01 is None:
        raise CxrError("--negatives canonical needs resources/canonical_chest.png or normal training images")
    return pre.normalise(mean01.float()), "mean of the normal training images"


class CIAPairs(Dataset):
    """Training items plus ``negative`` [1, S, S] and ``reveal`` (bool: boxes used) per image."""

    def __init__(self, base: Dataset, *, mode: str, revealed: np.ndarray, pool: NormalPool | None = None,
                 pairs: torch.Tensor | None = None, canonical: torch.Tensor | None = None, seed: int = 0) -> None:
        if mode not in NEGATIVE_MODES:
            raise CxrError(f"unknown negatives mode {mode!r}; expected one of {', '.join(NEGATIVE_MODES)}")
        self.base, self.mode, self.pool, self.pairs = base, mode, pool, pairs
        self.revealed = np.asarray(revealed, dtype=bool)
        self.canonical, self.seed, self.epoch = canonical, seed, 0
        self.labels = getattr(base, "labels", None)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def negative_index(self, i: int) -> int:
        """Pool position of item ``i``'s negative (``paired``/``random``)."""
        if self.mode == "paired":
            return int(self.pairs[i])
        rng = np.random.default_rng((self.seed, self.epoch, i, 7))
        j = int(rng.integers(len(self.pool)))
        if len(self.pool) > 1 and int(self.pool.positions[j]) == i:
            j = (j + 1) % len(self.pool)
        return j

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        if self.mode == "canonical":
            item["negative"] = self.canonical
        else:
            item["negative"] = self.pool.image(self.negative_index(i))
        item["reveal"] = bool(self.revealed[i])
        return item


def cia_collate(items: list[dict]) -> dict:
    """:func:`training.data.collate` plus stacked ``negative`` and ``reveal``."""
    from ..data import collate

    out = collate(items)
    out["negative"] = torch.stack([it["negative"] for it in items])
    out["reveal"] = torch.tensor([bool(it["reveal"]) for it in items])
    return out


# ---- loss -------------------------------------------------------------------------------------
def grid_targets(boxes: Sequence[torch.Tensor], reveal: torch.Tensor, num_classes: int,
                 image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid labels ``[B, C, gh, gw]``, has_box ``[B, C]``) from ``[M, 5]`` box rows of revealed images.

    A cell is 1 where it overlaps a projected box of the class (CIA Sec. 3.2, ``box_to_grid``).
    """
    from cxrviewer.core.explain.boxes import box_to_grid

    b = len(boxes)
    gl = torch.zeros(b, num_classes, *grid)
    hb = torch.zeros(b, num_classes)
    for i, rows in enumerate(boxes):
        if not bool(reveal[i]):
            continue
        for r in rows.tolist():
            c = int(r[0])
            if not 0 <= c < num_classes or r[3] <= 0 or r[4] <= 0:
                continue
            g = torch.from_numpy(box_to_grid(Box(str(c), *r[1:5]), image_size, grid))
            if g.sum() == 0:
                continue
            gl[i, c] = torch.maximum(gl[i, c], g)
            hb[i, c] = 1.0
    return gl, hb


def make_cia_loss(beta_b: float = 5.0) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]:
    """``loss_fn(model, batch)`` for :class:`Trainer`: CIA Eq. 4-6 on the grid logits."""

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x, neg = batch["image"], batch["negative"].to(batch["image"].dtype)
        out = model(x, neg)
        logits = out["grid_logits"].float()
        gl, hb = grid_targets(batch["boxes"], batch["reveal"].cpu(), logits.shape[1],
                              (int(x.shape[-2]), int(x.shape[-1])), (int(logits.shape[-2]), int(logits.shape[-1])))
        loss = cia_loss(logits, batch["labels"].float(), gl.to(logits.device), hb.to(logits.device), beta_b=beta_b)
        return loss, {"box_terms": float(hb.sum())}

    return loss_fn


# ---- the normal bank stored in the bundle -----------------------------------------------------
def _farthest_points(codes: torch.Tensor, n: int) -> list[int]:
    """``n`` diverse pool entries: greedy farthest-point sampling in cosine distance."""
    from cxrviewer.core.models.cia import cosine_similarity_matrix

    m = codes.shape[0]
    if n >= m:
        return list(range(m))
    mean = codes.float().mean(0, keepdim=True)
    first = int(cosine_similarity_matrix(mean, codes).argmax())
    chosen = [first]
    best = cosine_similarity_matrix(codes, codes[first:first + 1])[:, 0]
    for _ in range(n - 1):
        j = int(best.argmin())
        chosen.append(j)
        best = torch.maximum(best, cosine_similarity_matrix(codes, codes[j:j + 1])[:, 0])
    return chosen


def normal_bank_extras(pool: NormalPool | None, size: int, *, n: int = 64, mode: str = "paired",
                       canonical: torch.Tensor | None = None, canonical_source: str = "",
                       pre: Preprocess | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Bundle extras (``normal_bank_images`` uint8 [N,S,S], ``normal_bank_codes``, ``normal_bank_ids``).

    ``paired``/``random``: up to ``n`` diverse training normals; ``canonical``: the canonical chest
    alone, so the app pairs exactly as the model was trained. ``pre``: the normalisation the pool
    images and ``canonical`` carry (default ``minus1_1``).
    """
    from cxrviewer.core.models.cia import hash_codes

    pre = pre or Preprocess()

    if mode == "canonical":
        imgs01 = pre.denormalise(canonical.float())[None]
        ids = ["canonical"]
        info = {"synthetic": False, "source": canonical_source, "count": 1, "negatives": mode}
    else:
        if pool is None or len(pool) == 0:
            raise CxrError("no normal images for the CIA normal bank")
        sel = _farthest_points(pool.codes, n)
        imgs01 = torch.stack([pre.denormalise(pool.image(j).float()) for j in sel])
        ids = [pool.keys[j] for j in sel]
        info = {"synthetic": False, "source": "training normals (farthest-point sample of hash codes)",
                "count": len(sel), "negatives": mode}
    u8 = np.clip(np.rint(imgs01[:, 0].numpy() * 255.0), 0, 255).astype(np.uint8)
    codes = hash_codes(torch.from_numpy(u8.astype(np.float32) / 255.0)[:, None]).numpy().astype(np.float32)
    return ({"normal_bank_images": u8, "normal_bank_codes": codes,
             "normal_bank_ids": np.asarray(ids, dtype=str)}, {"normal_bank": info})


def with_bank_attention(model: torch.nn.Module, extras: dict[str, np.ndarray], input_size: int | Sequence[int],
                        normalisation: Any) -> dict[str, np.ndarray]:
    """``extras`` plus the bank's precomputed ``M-`` (float32, on the model's device in eval mode) and its
    key, so the app pairs without an encoder pass per study (cxrviewer/core/explain/contrast.py)."""
    from cxrviewer.core.explain.contrast import precompute_bank_attention

    if "normal_bank_images" not in extras or not callable(getattr(model, "negative_attention", None)):
        return dict(extras)
    size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(input_size)
    return {**extras, **precompute_bank_attention(model, np.asarray(extras["normal_bank_images"]), size,
                                                  normalisation)}


# ---- evaluation ------------------------------------------------------------------------------
def bank_negatives(loaded_bundle: Any, dataset: Dataset) -> Callable[[int], torch.Tensor]:
    """``fn(i) -> [1, S, S]``: the bank image nearest to ``dataset[i]`` by hash code (CIA Sec. 4.4).

    The bank is the bundle's ``normal_bank_*`` extras; images are resized to the dataset size
    and normalised as the manifest says; the choice per index is cached.
    """
    import torch.nn.functional as F

    from cxrviewer.core.errors import BundleError
    from cxrviewer.core.models.cia import hash_codes, nearest_normal

    extras = loaded_bundle.extras
    if "normal_bank_images" not in extras:
        raise BundleError("the CIA bundle has no normal bank (extras 'normal_bank_images')",
                          path=str(getattr(loaded_bundle, "path", "")))
    pre = Preprocess.from_normalisation(loaded_bundle.manifest.normalisation)
    bank01 = torch.from_numpy(np.asarray(extras["normal_bank_images"]).astype(np.float32) / 255.0)[:, None]
    codes = extras.get("normal_bank_codes")
    codes_t = torch.from_numpy(np.asarray(codes, np.float32)) if codes is not None else hash_codes(bank01)
    size = getattr(dataset, "size", None)
    if size and tuple(bank01.shape[-2:]) != (size, size):
        bank01 = F.interpolate(bank01, size=(size, size), mode="bilinear", align_corners=False)
    bank = pre.normalise(bank01)
    ds_pre = dataset_preprocess(dataset)
    chosen: dict[int, int] = {}

    def negative(i: int) -> torch.Tensor:
        if i not in chosen:
            x = dataset[i]["image"].float()
            chosen[i] = nearest_normal(hash_codes(ds_pre.denormalise(x)[None])[0], codes_t)
        return bank[chosen[i]]

    negative.chosen = chosen  # type: ignore[attr-defined]
    return negative


def evaluate_cia(model: torch.nn.Module, dataset: Dataset, negatives: Callable[[int], torch.Tensor]) -> dict:
    """:func:`training.evaluate.evaluate_model` (method ``cia``) plus the mean accuracy at T(IoU)=0.3
    over the boxed classes present (``loc_iou_0.3``)."""
    from ..evaluate import evaluate_model

    res = evaluate_model(model, dataset, method="cia", negatives=negatives)
    row = res["iou"].get("0.3", {})
    accs = [v["acc"] for v in row.values() if v.get("n") and v.get("acc") is not None]
    res["loc_iou_0.3"] = float(np.mean(accs)) if accs else None
    return res


# ---- training --------------------------------------------------------------------------------
def prepare_pairs(train_ds: Dataset, *, mode: str = "paired", box_fraction: float = 0.4, seed: int = 0,
                  canonical_path: str | Path | None = None, num_workers: int = 0
                  ) -> tuple[CIAPairs, NormalPool | None, dict[str, Any]]:
    """Hash codes once, the normal pool, nearest-normal pairs and the revealed-box selection."""
    labels = np.asarray(train_ds.labels)
    normal = ~np.any(labels > 0, axis=1)
    pre = dataset_preprocess(train_ds)
    size = int(getattr(train_ds, "size", 0))
    need_mean = mode == "canonical" and not (Path(canonical_path) if canonical_path
                                             else default_canonical_path()).is_file()
    codes, mean01 = image_codes(train_ds, num_workers=num_workers, mean_of=normal if need_mean else None)
    positions = np.flatnonzero(normal)
    pool = NormalPool(train_ds, positions, codes[positions]) if len(positions) else None
    keys = dataset_keys(train_ds)
    boxes = dataset_boxes(train_ds)
    revealed = select_revealed(keys, [bool(b) for b in boxes], box_fraction, seed)
    info: dict[str, Any] = {"negatives": mode, "box_fraction": box_fraction, "n_train": len(keys),
                            "n_normals": int(len(positions)), "n_boxed": int(sum(bool(b) for b in boxes)),
                            "n_revealed": int(revealed.sum())}
    pairs, canonical = None, None
    if mode in ("paired", "random"):
        if pool is None:
            raise CxrError("the training data has no normal ('No Finding') images to pair with; "
                           "use --negatives canonical")
        if mode == "paired":
            self_pos = torch.full((len(keys),), -1, dtype=torch.long)
            self_pos[torch.from_numpy(positions)] = torch.arange(len(positions))
            pairs = pair_indices(codes, pool.codes, exclude=self_pos)
    else:
        canonical, src = canonical_negative(size, pre, canonical_path, mean01)
        info["canonical"] = src
    ds = CIAPairs(train_ds, mode=mode, revealed=revealed, pool=pool, pairs=pairs, canonical=canonical, seed=seed)
    log.info("CIA data: %d images, %d normals, %d boxed, %d with boxes revealed (%.0f%%), negatives %s",
             len(keys), len(positions), info["n_boxed"], info["n_revealed"], 100 * box_fraction, mode)
    return ds, pool, info


def init_head_prior(model: torch.nn.Module, prior: float = 0.01) -> None:
    """Set the last head convolution's bias so every cell starts at probability ``prior``.

    Not in the paper (its head is unspecified); the usual prior initialisation for dense
    sigmoid outputs. With MIL over ``h*w`` cells a start at p = 0.5 makes every normal image
    cost ``h*w*log 2`` per class and the first epochs are spent only pushing the bias down.
    """
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1] \
        if hasattr(model, "head") else None
    if last is not None and last.bias is not None:
        with torch.no_grad():
            last.bias.fill_(float(np.log(prior / (1.0 - prior))))


def train_cia(model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig, *,
              box_fraction: float = 0.4, negatives: str = "paired", beta_b: float = 5.0, bank_size: int = 64,
              canonical_path: str | Path | None = None, prior: float | None = 0.01,
              stop_after_epoch: int | None = None,
              ) -> tuple[torch.nn.Module, list[dict], dict[str, np.ndarray], dict[str, Any]]:
    """Train CIA-Net with the shared loop; returns (model, history, bundle extras, info).

    ``val_ds`` (optional) is scored after every epoch with the bundle's bank pairing
    (:func:`evaluate_cia`: AUROC, localisation at T(IoU), ``loc_iou_0.3``). ``prior``: initial
    cell probability of the head (:func:`init_head_prior`; None keeps the model's init; a resumed
    run loads its checkpoint over it).
    """
    if prior is not None:
        init_head_prior(model, prior)
    pairs_ds, pool, info = prepare_pairs(train_ds, mode=negatives, box_fraction=box_fraction, seed=cfg.seed,
                                         canonical_path=canonical_path, num_workers=cfg.num_workers)
    pre = dataset_preprocess(train_ds)
    extras, extras_info = normal_bank_extras(pool, int(getattr(train_ds, "size", 0)), n=bank_size, mode=negatives,
                                             canonical=pairs_ds.canonical, canonical_source=info.get("canonical", ""),
                                             pre=pre)
    info.update(extras_info)

    from types import SimpleNamespace

    bank = SimpleNamespace(extras=extras, manifest=SimpleNamespace(normalisation=pre.to_manifest()["normalisation"]),
                           path="")

    def eval_fn(m: torch.nn.Module) -> dict:
        if val_ds is None or len(val_ds) == 0:
            return {}
        res = evaluate_cia(m, val_ds, bank_negatives(bank, val_ds))
        return {"mean_auroc": res["mean_auroc"], "loc_iou_0.3": res["loc_iou_0.3"],
                "iou_0.3": {c: v["acc"] for c, v in res["iou"]["0.3"].items() if v["n"]}}

    # the best held-out localisation (IoU 0.3); of equal ones, the best mean AUROC
    use_monitor(cfg, "metrics.loc_iou_0.3,metrics.mean_auroc", "max")
    trainer = Trainer(model, pairs_ds, make_cia_loss(beta_b), cfg, eval_fn=eval_fn, collate_fn=cia_collate)
    try:
        history = trainer.fit(stop_after_epoch=stop_after_epoch)
    finally:
        trainer.close()
    return trainer.model, history, extras, info
