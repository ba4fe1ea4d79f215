"""U-Net training for left lung, right lung and heart (lung-heart-feature-weighting.txt Sec. 3.2).

Loss: soft Dice per class (lung-heart Eq. 2, ``1 - 2|P.G| / (|P| + |G|)``,
sigmoid probabilities, summed over the batch and averaged over the three
classes) plus an optional BCE term. Evaluation: hard Dice per class at the
masks' full resolution (1024 px for JSRT) after bilinear up-sampling of the
logits, threshold ``p > 0.5`` (the pipeline's rule).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.segmentation import (PREPROCESS, SEG_CLASSES, SegDataset, SegRecord, preprocess_input,
                                 read_gray01, read_mask)
from .loop import TrainConfig, Trainer, hyperparameters, selection, use_monitor

log = logging.getLogger(__name__)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice loss (lung-heart Eq. 2) of ``logits [B,C,H,W]`` vs ``target`` in [0,1].

    Returns (mean loss over classes, per-class soft Dice [C]).
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
    dice = (2.0 * inter + eps) / (denom + eps)
    return (1.0 - dice).mean(), dice.detach()


def make_seg_loss(bce_weight: float = 0.5):
    """``loss_fn(model, batch)`` for :class:`Trainer`: Dice (+ ``bce_weight`` * BCE)."""

    def seg_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["image"])["logits"].float()
        loss, dice = soft_dice_loss(logits, batch["masks"])
        logs = {f"dice_{c}": float(d) for c, d in zip(SEG_CLASSES, dice)}
        if bce_weight > 0:
            bce = F.binary_cross_entropy_with_logits(logits, batch["masks"].float())
            loss = loss + bce_weight * bce
            logs["bce"] = float(bce.detach())
        return loss, logs

    return seg_loss


def _dice_hard(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Dice ``2|P&G| / (|P| + |G|)`` of two binary masks (1.0 when both are empty)."""
    p = (pred.cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)).astype(bool, copy=False)
    g = (gt.cpu().numpy() if torch.is_tensor(gt) else np.asarray(gt)).astype(bool, copy=False)
    s = np.count_nonzero(p) + np.count_nonzero(g)
    return 1.0 if s == 0 else 2.0 * np.count_nonzero(p & g) / s


def _summary(per_image: dict[str, list[float]]) -> dict:
    out: dict = {"dice": {c: float(np.mean(v)) for c, v in per_image.items()},
                 "dice_std": {c: float(np.std(v)) for c, v in per_image.items()},
                 "n_images": len(next(iter(per_image.values()), []))}
    lungs = [out["dice"][c] for c in ("left_lung", "right_lung") if c in out["dice"]]
    if lungs:
        out["dice_lungs_mean"] = float(np.mean(lungs))
    return out


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, records: Sequence[SegRecord], *, size: int | None = None,
                          preprocess: dict | None = PREPROCESS, batch_size: int = 8,
                          classes: Sequence[str] = SEG_CLASSES) -> dict:
    """Mean Dice per class over ``records`` at the masks' full resolution.

    Each image is preprocessed to the model input ``size`` (default: the model's
    ``input_size`` attribute or 256), the logits are bilinearly up-sampled to the
    mask size and thresholded at p > 0.5. Returns ``{"dice": {class: mean},
    "dice_std": {...}, "dice_lungs_mean": m, "n_images": n, "seconds": t}``.
    """
    t0 = time.perf_counter()
    size = int(size or getattr(model, "input_size", 256))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per: dict[str, list[float]] = {c: [] for c in classes}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        imgs = [read_gray01(r.image) for r in chunk]
        x = torch.cat([preprocess_input(im, size, preprocess) for im in imgs]).to(device)
        logits = model(x)["logits"].float().cpu()
        for i, r in enumerate(chunk):
            gts = [read_mask(r.masks[c]) for c in classes]
            up = F.interpolate(logits[i:i + 1], size=gts[0].shape, mode="bilinear", align_corners=False)[0]
            pred = (up > 0.0).numpy()
            for ci, c in enumerate(classes):
                per[c].append(_dice_hard(pred[ci], gts[ci]))
    model.train(was_training)
    out = _summary(per)
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def evaluate_arrays(model: torch.nn.Module, ds: SegDataset, *, batch_size: int = 16) -> dict:
    """Dice per class at the input size on an in-memory set (fast per-epoch check; masks > 0.5)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per: dict[str, list[float]] = {c: [] for c in SEG_CLASSES}
    for start in range(0, len(ds), batch_size):
        x = ds.x[start:start + batch_size].to(device)
        y = ds.y[start:start + batch_size]
        logits = model(x)["logits"].float().cpu()
        for i in range(x.shape[0]):
            for ci, c in enumerate(SEG_CLASSES):
                per[c].append(_dice_hard(logits[i, ci] > 0.0, y[i, ci] > 0.5))
    model.train(was_training)
    return _summary(per)


def init_prior_bias(model: torch.nn.Module, masks: torch.Tensor) -> None:
    """Set the 1x1 output bias to logit(mean mask fraction) per class (faster start of training)."""
    out = getattr(model, "out", None)
    if isinstance(out, torch.nn.Conv2d) and out.bias is not None and out.bias.numel() == masks.shape[1]:
        p = masks.float().mean(dim=(0, 2, 3)).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            out.bias.copy_(torch.log(p / (1 - p)))


class CosineTrainer(Trainer):
    """The shared :class:`Trainer` with a cosine learning-rate decay over ``cfg.epochs`` (1 warm-up epoch)."""

    def _lr_for(self, epoch: int) -> float:
        n = max(int(self.cfg.epochs), 1)
        if epoch == 0 and n > 2:
            return self.cfg.lr * 0.3
        return self.cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * epoch / n)))


def train_segmentation(model: torch.nn.Module, train_ds: SegDataset, val_ds: SegDataset | None,
                       cfg: TrainConfig, *, bce_weight: float = 0.5, resume: bool = True,
                       stop_after_epoch: int | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``model`` with Dice (+BCE) through the shared loop; per-epoch Dice on ``val_ds``."""
    eval_fn = (lambda m: evaluate_arrays(m, val_ds)) if val_ds is not None and len(val_ds) else None

    def on_epoch_end(epoch: int, rec: dict) -> None:
        d = rec.get("metrics", {}).get("dice", {})
        log.info("epoch %d loss %.4f %.0fs dice %s", epoch, rec["loss"], rec["seconds"],
                 {k: round(v, 4) for k, v in d.items()})

    init_prior_bias(model, train_ds.y)  # a resumed checkpoint overwrites it
    use_monitor(cfg, "val_loss", "min")
    trainer = CosineTrainer(model, train_ds, make_seg_loss(bce_weight), cfg, eval_fn=eval_fn,
                            collate_fn=train_ds.collate, on_epoch_end=on_epoch_end,
                            val_ds=val_ds if val_ds is not None and len(val_ds) else None)
    history = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    trainer.close()
    return trainer.model, history


def segmentation_provenance(command: str, cfg: TrainConfig, data: str, *, fold: int, n_folds: int,
                            n_train: int, n_val: int, history: list[dict], evaluation: dict | None,
                            wall_seconds: float) -> dict:
    """Provenance for the bundle manifest: data, licence note, preprocessing, command, metrics."""
    return {
        "trained": True,
        "research_demo": False,
        "research_use_only": True,
        "data": {
            "name": "JSRT (Shiraishi et al. 2000) with SCR masks (van Ginneken et al. 2006)",
            "path": str(data),
            "terms": "research and education use only; the weights are for research use only",
            "split": f"image-wise fold {fold} of {n_folds} held out (seed {cfg.seed})",
            "n_train": n_train, "n_val": n_val,
        },
        "preprocess": dict(PREPROCESS),
        "command": command,
        **({"config": cfg.run_config} if cfg.run_config else {}),
        "train_config": hyperparameters(cfg),
        "epochs_run": len(history),
        "selection": selection(history, cfg),
        "final_loss": history[-1]["loss"] if history else None,
        "heldout_evaluation": evaluation,
        "wall_seconds": round(float(wall_seconds), 1),
    }


def save_segmentation_bundle(model: torch.nn.Module, out: str | Path, *, input_size: int, provenance: dict,
                             half: bool = True) -> Path:
    """Write the bundle via :func:`cxrviewer.core.bundle.save_bundle` (fp16 weights when ``half``).

    The loader reads fp16 tensors into the fp32 network (``load_state_dict`` casts).
    """
    import copy

    from cxrviewer.core.bundle import save_bundle

    m = copy.deepcopy(model).cpu().eval()
    if half:
        m = m.half()
        # BatchNorm running statistics stay fp32-accurate enough in fp16; the counter stays int.
    prov = dict(provenance)
    prov["weights_dtype"] = "float16" if half else "float32"
    return save_bundle(m, out, classes=SEG_CLASSES, input_size=int(input_size),
                       normalisation={"kind": "minus1_1"},
                       name="segmentation",
                       description="U-Net: left lung, right lung, heart (JSRT/SCR; research use only)",
                       role="segmentation", provenance=prov, overwrite=True)
