"""Baseline classifier training with weighted BCE (disease-masks Eq. 10).

The same function trains every classifier-family network of the registry
(baseline CAM, space attention, attention-gated, MSA, lung/heart); the
method-specific trainers reuse :func:`predict` and :func:`auroc_table`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxrviewer.core.classes import CLASSES

from ..losses import weighted_bce
from .loop import TrainConfig, Trainer, hyperparameters, selection, use_monitor

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, ds: Dataset, *, batch_size: int = 32, device=None,
            forward=None) -> np.ndarray:
    """Sigmoid probabilities [N, C] of ``model`` on ``ds`` (eval mode, no augmentation). A
    ``ChestDataset``/``CachedDataset`` sends its stored pixels (uint8 from a cache) and the device
    normalises them (:class:`~training.data.loader.DeviceTransform`: the same values)."""
    from ..data import collate
    from ..data.loader import DeviceTransform, EpochItems

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    transform = DeviceTransform.of(ds)
    if transform is None:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    else:
        keys = [(int(getattr(ds, "epoch", 0)), i) for i in range(len(ds))]
        loader = DataLoader(EpochItems(ds), batch_size=batch_size, sampler=keys, collate_fn=collate,
                            pin_memory=torch.device(device).type == "cuda")
    out = []
    for batch in loader:
        if transform is None:
            x = batch["image"].to(device)
        else:
            x = transform({"image": batch["image"].to(device, non_blocking=True),
                           "aug": batch["aug"].to(device, non_blocking=True)})["image"]
        res = forward(model, x) if forward is not None else model(x)
        out.append(torch.sigmoid(res["logits"].float()).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, len(getattr(ds, "classes", CLASSES))), np.float32)


def auroc_table(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """AUROC per class of ``classes`` (NaN where a class has only one label value) and their mean."""
    from cxrviewer.core.explain.metrics import auroc_per_class

    per = {c: float(v) for c, v in zip(classes, auroc_per_class(probs, labels))}
    vals = [v for v in per.values() if np.isfinite(v)]
    return {"auroc": per, "mean_auroc": float(np.mean(vals)) if vals else float("nan")}


def classification_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Weighted BCE on the logits (disease-masks Eq. 10)."""
    out = model(batch["image"])
    loss = weighted_bce(out["logits"].float(), batch["labels"])
    return loss, {}


def train_classifier(model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None,
                     cfg: TrainConfig, *, loss_fn=classification_loss, stop_after_epoch: int | None = None,
                     on_epoch_end=None) -> tuple[torch.nn.Module, list[dict]]:
    """Train with the shared loop; evaluates AUROC on ``val_ds`` after each epoch. The model returned
    holds the epoch of the best held-out mean AUROC (unless ``cfg.monitor`` names another metric).
    A ``ChestDataset``/``CachedDataset`` is fed through :mod:`training.data.loader` (persistent
    workers; on CUDA they serve the stored pixels and the GPU augments and normalises the batch);
    ``on_epoch_end(epoch, record)``: see
    :class:`~.loop.Trainer`."""
    from ..data import collate
    from ..data.loader import DeviceTransform

    use_monitor(cfg, "metrics.mean_auroc", "max")

    def eval_fn(m: torch.nn.Module) -> dict:
        if val_ds is None or len(val_ds) == 0:
            return {}
        probs = predict(m, val_ds, batch_size=cfg.batch_size)
        return auroc_table(np.asarray(val_ds.labels), probs, getattr(val_ds, "classes", CLASSES))

    trainer = Trainer(model, train_ds, loss_fn, cfg, eval_fn=eval_fn, collate_fn=collate,
                      device_transform=DeviceTransform.of(train_ds), on_epoch_end=on_epoch_end)
    try:
        history = trainer.fit(stop_after_epoch=stop_after_epoch)
    finally:
        trainer.close()
    return trainer.model, history


def provenance(command: str, cfg: TrainConfig, data: str, history: list[dict], **extra) -> dict:
    """Recipe recorded in the bundle manifest: command, seed, data, ``config`` (the command's resolved
    options: ``cxr-train COMMAND --config`` of it repeats the run), ``train_config`` (the loop's
    hyper-parameters), epochs, the last epoch's record (``final``) and which epoch the weights are
    and why (``selection``: epoch, metric, value, reason best / last / stopped early)."""
    last = history[-1] if history else {}
    options = {"config": cfg.run_config} if cfg.run_config else {}
    return {"command": command, "seed": cfg.seed, "data": str(data), **options,
            "train_config": hyperparameters(cfg), "epochs_trained": len(history), "final": last,
            "selection": selection(history, cfg), **extra}


def save_classifier_bundle(model: torch.nn.Module, out: str | Path, *, input_size: int, provenance: dict,
                           research_demo: bool = True, extras: dict | None = None,
                           normalisation: dict | None = None, classes: Sequence[str] = CLASSES,
                           label_set: str | dict | None = None) -> Path:
    """Write ``model`` as a bundle the app loads (``cxrviewer.core.bundle``); ``normalisation``: the
    manifest's (default ``minus1_1``, what the datasets feed unless ``--init-weights`` set another);
    ``classes``/``label_set``: the trained classes and the set they come from (default the NIH 14)."""
    from cxrviewer.core.bundle import save_bundle

    prov = dict(provenance)
    prov.setdefault("research_demo", research_demo)
    return save_bundle(model.cpu(), out, classes=list(classes), label_set=label_set, input_size=input_size,
                       normalisation=normalisation or {"kind": "minus1_1"}, provenance=prov, extras=extras,
                       overwrite=True)
