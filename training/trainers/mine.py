"""M2: attention mining (AM) with class-specific erasure and knowledge preservation (KP).

iterative-attention-mining.txt Sec. 2-3, on the ResNet-MSA network (``msa`` in the registry):

- Erasure (Eq. 1): for each class ``c`` the mask ``M^c`` is one AM step of the *current*
  model's CAM of ``c`` (normalise, binarise at 0.5, zero the connected component holding the
  global maximum; ``explain.attention_mining.erasure_masks``). The branch logit is
  ``w_c . GAP(X * M^c) + b_c`` (Eq. 2), computed as ``mean(M^c * cam_c) + b_c`` from the same
  forward pass (``cam`` is ``w_c . X``), so the backbone runs once per batch.
- ``L_cls = mean_c BCE`` over the batch (Eq. 2-3).
- ``kp="none"``: every image of the batch is erased. ``"vanilla"`` (KP-Vanilla): only the first
  ``n = N/8`` images are erased, the other ``N - n`` keep ``M = 1``. ``"kp"``: as vanilla plus
  ``L^k = ||GAP(X_A(k)) - GAP(X_B(k))||_2 / (N - n)`` between a frozen copy ``N_A`` (the network
  before mining) and the trained ``N_B`` on the untouched images, over the layers ``stage4``,
  ``stage5`` (the paper's 3rd and 4th bottleneck: ResNet ``layer3``/``layer4``, see
  ``core/models/backbones.py``), ``msa`` and ``logits``; ``L = L_cls + lam * mean_k L^k`` (Eq. 4-6).

Note on inference: with a linear CAM head, Eq. 7 gives ``H_t = H_1 * M_{t-1}`` and the fill terms
of Eq. 8 restore exactly the erased parts, so ``H_f == H_1`` for raw (un-normalised) maps (checked
numerically on ``explain.attention_mining.attention_mining``). What AM changes is the network,
through the erasure during training here; the per-step maps only show where it looked.

Decisions where the paper is silent (documented):

- Which classes are erased: every class of every erased image (Eq. 1 is written per class,
  without regard to the label); ``erase="positive"`` erases only the labelled classes.
- ``N_A`` runs in the same train/eval mode as ``N_B`` on the whole batch, so BatchNorm sees the
  same batch statistics and ``L_KP = 0`` while the networks are equal; its BatchNorm momentum is
  0 so its running statistics never move (it stays exactly the network before mining).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from cxrviewer.core.errors import ModelError

from ..losses import am_classification_loss, knowledge_preservation_loss
from .classify import train_classifier
from .loop import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["KP_LAYERS", "KP_MODES", "MiningConfig", "MiningLoss", "frozen_copy", "mine", "n_erased"]

KP_MODES: tuple[str, ...] = ("none", "vanilla", "kp")
#: Layers of knowledge preservation (attention-mining Eq. 4-5).
KP_LAYERS: tuple[str, ...] = ("stage4", "stage5", "msa", "logits")


@dataclass
class MiningConfig:
    """Knobs of the mining phase (attention-mining Sec. 2-3)."""

    kp: str = "kp"  # none | vanilla | kp
    lam: float = 0.5  # lambda of Eq. 6
    erase_fraction: float = 0.125  # n / N of KP-Vanilla and KP
    threshold: float = 0.5  # binarisation of the normalised CAM (Sec. 3.2)
    erase: str = "all"  # all | positive
    layers: Sequence[str] = field(default_factory=lambda: KP_LAYERS)

    def __post_init__(self) -> None:
        if self.kp not in KP_MODES:
            raise ValueError(f"kp must be one of {KP_MODES}, not {self.kp!r}")
        if self.erase not in ("all", "positive"):
            raise ValueError(f"erase must be 'all' or 'positive', not {self.erase!r}")
        if not 0 < self.erase_fraction <= 1:
            raise ValueError("erase_fraction must be in (0, 1]")


def n_erased(batch: int, cfg: MiningConfig) -> int:
    """``n``: how many images of a batch of ``batch`` are erased (all without KP, else ``N/8``, at least 1)."""
    if cfg.kp == "none":
        return batch
    return min(batch, max(1, int(round(batch * cfg.erase_fraction))))


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``N_A``: a copy that never changes (no grad, BatchNorm momentum 0)."""
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    for m in frozen.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return frozen


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


class MiningLoss:
    """``loss_fn(model, batch) -> (loss, logs)`` of the mining phase for :class:`~training.trainers.loop.Trainer`."""

    def __init__(self, cfg: MiningConfig, frozen: torch.nn.Module | None = None) -> None:
        if cfg.kp == "kp" and frozen is None:
            raise ValueError("KP needs the frozen network N_A")
        self.cfg = cfg
        self.frozen = frozen if cfg.kp == "kp" else None

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        from cxrviewer.core.explain.attention_mining import erasure_masks

        cfg = self.cfg
        x, y = batch["image"], batch["labels"]
        out = model(x)
        if "cam" not in out or "features" not in out:
            raise ModelError("attention mining needs a classifier returning 'features' and 'cam'")
        inner = _inner(model)
        if getattr(inner, "pool", "avg") != "avg":
            raise ModelError("attention mining needs average pooling (Eq. 2)")
        big_n = x.shape[0]
        n = n_erased(big_n, cfg)
        w, b = inner.cam_weights()
        masks = erasure_masks(out["features"][:n].detach(), w.detach(), None, cfg.threshold)  # [n, C, h, w]
        if cfg.erase == "positive":
            pos = (y[:n] > 0.5)[:, :, None, None].to(masks.dtype)
            masks = masks * pos + (1.0 - pos)
        cam = out["cam"].float()
        erased_logits = (cam[:n] * masks.float()).mean(dim=(2, 3))  # Eq. 2: w_c . GAP(X * M^c)
        if b is not None:
            erased_logits = erased_logits + b.float()
        logits = torch.cat([erased_logits, out["logits"][n:].float()], 0)
        l_cls = am_classification_loss(logits, y)  # Eq. 2-3
        logs = {"l_cls": float(l_cls.detach()), "erased_fraction": float(1.0 - masks.float().mean())}
        loss = l_cls
        if self.frozen is not None and big_n > n:
            if next(self.frozen.parameters()).device != x.device:
                self.frozen.to(x.device)
            self.frozen.train(inner.training)
            with torch.no_grad():
                out_a = self.frozen(x)
            fa = [out_a[k][n:] for k in cfg.layers]
            fb = [out[k][n:] for k in cfg.layers]
            l_kp = knowledge_preservation_loss(fa, fb)  # Eq. 4-5
            loss = l_cls + cfg.lam * l_kp  # Eq. 6
            logs["l_kp"] = float(l_kp.detach())
        return loss, logs


def mine(model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig,
         mining: MiningConfig | None = None, *, stop_after_epoch: int | None = None,
         ) -> tuple[torch.nn.Module, list[dict]]:
    """Fine-tune a trained classifier (typically ``msa``) with AM (+ KP) for ``cfg.epochs`` epochs.

    ``N_A`` is a frozen copy of ``model`` as passed (the network before mining); a resumed run
    restores ``N_B`` from the checkpoint while ``N_A`` stays the given starting network.
    """
    mining = mining or MiningConfig()
    frozen = frozen_copy(model) if mining.kp == "kp" else None
    loss_fn = MiningLoss(mining, frozen)
    model, history = train_classifier(model, train_ds, val_ds, cfg, loss_fn=loss_fn,
                                      stop_after_epoch=stop_after_epoch)
    return model, history
