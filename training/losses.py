"""Training losses (Qt-free; torch + cxrviewer.core only).

- :func:`weighted_bce`: disease-masks-attention.txt Eq. 10 (ChestX-ray8's weighted CE; also
  baseline-cam-space-attention-gated.txt Eq. 1).
- :func:`am_classification_loss`, :func:`knowledge_preservation_loss`, :func:`attention_mining_loss`:
  iterative-attention-mining.txt Eq. 2-3 and Eq. 4-6.
- :func:`cia_loss`: cia-net-alignment-contrast-attention.txt Eq. 4-6 (per-grid BCE + MIL).
- :func:`alignment_loss`: disease-masks-attention.txt Eq. 6-9 (perceptual + Euclidean).

Normalisation: the papers write plain sums (Eq. 10 over the batch's label matrix, CIA Eq. 6
over samples and classes, disease-masks Eq. 8 over pixels). ``reduction="sum"`` gives those
literally; the default ``"mean"`` divides each by a constant of the batch shape (number of
label entries / of sample-class pairs / of pixels), which keeps every relative weighting of
the paper and only rescales the loss, so learning rates and gradient clipping stay sane.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "alignment_loss",
    "alignment_loss_terms",
    "am_classification_loss",
    "attention_mining_loss",
    "blur_grid",
    "cia_loss",
    "knowledge_preservation_loss",
    "weighted_bce",
]

Reduction = Literal["mean", "sum"]
#: The perceptual term's feature maps of an image batch (stages 2-5 of a network).
FeatureExtractor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")


# ---- weighted BCE ---------------------------------------------------------------------
def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Weighted binary cross-entropy (disease-masks-attention.txt Eq. 10).

    ``L = w_P sum_{y=1} -ln p + w_N sum_{y=0} -ln(1 - p)`` with ``w_P = (|P|+|N|)/|P|`` and
    ``w_N = (|P|+|N|)/|N|`` counted over the whole label matrix of the batch; ``p = sigmoid(logits)``
    (computed stably from logits). A batch without positives (negatives) drops that term.
    ``reduction="sum"`` is Eq. 10 as printed; ``"mean"`` divides by ``|P|+|N|``.
    """
    _check_reduction(reduction)
    y = targets.to(logits.dtype) > 0.5
    n_pos = y.sum()
    n_tot = y.numel()
    n_neg = n_tot - n_pos
    zero = logits.new_zeros(())
    pos_term = F.softplus(-logits)[y].sum() if n_pos > 0 else zero  # -ln sigmoid(z)
    neg_term = F.softplus(logits)[~y].sum() if n_neg > 0 else zero  # -ln(1 - sigmoid(z))
    w_p = n_tot / n_pos.clamp_min(1).to(logits.dtype)
    w_n = n_tot / n_neg.clamp_min(1).to(logits.dtype)
    loss = w_p * pos_term + w_n * neg_term
    return loss / n_tot if reduction == "mean" else loss


# ---- attention mining + knowledge preservation --------------------------------------------
def am_classification_loss(branch_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``L_cls = 1/C sum_c 1/N sum_i BCE(sigmoid(w_c . GAP(X_i * M_i^c)), y_i^c)`` (attention-mining Eq. 2-3).

    ``branch_logits [N, C]`` from ``cxrviewer.core.explain.attention_mining.masked_class_logits``.
    """
    return F.binary_cross_entropy_with_logits(branch_logits, targets.to(branch_logits.dtype), reduction="mean")


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def knowledge_preservation_loss(
    features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``L_KP = 1/|K| sum_k ||g(X_A(k)) - g(X_B(k))||_2 / (N - n)`` (iterative-attention-mining.txt Eq. 4-5).

    ``features_a`` come from the frozen original network N_A (detached here), ``features_b`` from
    the network being trained, both for the ``N - n`` un-erased images only (the caller slices
    the batch). ``g`` is GAP over the spatial axes (2-D inputs such as logits are used as they
    are). The l2 norm is taken over the whole ``(N-n) x C`` GAP matrix, as Eq. 4 is written.
    """
    if len(features_a) != len(features_b) or not features_a:
        raise ValueError("knowledge preservation needs the same non-empty list of layers from both networks")
    terms = []
    for xa, xb in zip(features_a, features_b):
        if xa.shape != xb.shape:
            raise ValueError(f"layer shapes differ: {tuple(xa.shape)} vs {tuple(xb.shape)}")
        diff = _gap(xa.detach().to(xb.dtype)) - _gap(xb)
        terms.append(torch.linalg.vector_norm(diff) / xb.shape[0])
    return torch.stack(terms).mean()


def attention_mining_loss(l_cls: torch.Tensor, l_kp: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """``L = L_cls + lambda L_KP`` with lambda = 0.5 (iterative-attention-mining.txt Eq. 6)."""
    return l_cls + lam * l_kp


# ---- CIA-Net ----------------------------------------------------------------------------
def _log1mexp(s: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(s))`` for ``s <= 0``, stable (never -inf for s < 0)."""
    s = s.clamp(max=-torch.finfo(s.dtype).tiny)
    near = s > -0.6931
    # each branch only sees inputs where it is finite (no NaN gradients through torch.where)
    a = torch.log(-torch.expm1(torch.where(near, s, torch.full_like(s, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(s, -1.0), s)))
    return torch.where(near, a, b)


def cia_loss(
    grid_logits: torch.Tensor,
    image_labels: torch.Tensor,
    grid_labels: torch.Tensor | None = None,
    has_box: torch.Tensor | None = None,
    beta_b: float = 5.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """CIA-Net loss (cia-net-alignment-contrast-attention.txt Eq. 4-6).

    ``sum_i sum_k lambda_i^k beta_B L_i^k(B) + (1 - lambda_i^k) L_i^k(I)`` where

    - ``L(B) = sum_j BCE(p_ij^k, y_ij^k)`` over the grid cells (Eq. 4; labels from
      ``cxrviewer.core.explain.boxes.box_to_grid``),
    - ``L(I) = -y log(1 - prod_j (1 - p_j)) - (1 - y) log prod_j (1 - p_j)`` (Eq. 5, MIL), computed
      in log space from the logits (``log(1 - p) = -softplus(z)``) so the product never underflows.

    grid_logits ``[B, C, h, w]``, image_labels ``[B, C]``, grid_labels ``[B, C, h, w]``, has_box
    ``[B, C]`` (lambda). ``beta_b`` is not given in the CIA paper; 5 is our default
    (configurable). ``reduction="sum"`` is Eq. 6 as printed; ``"mean"`` divides by ``B * C``.
    """
    _check_reduction(reduction)
    b, c = grid_logits.shape[:2]
    z = grid_logits.flatten(2)  # [B, C, J]
    y_img = image_labels.to(z.dtype)
    log_q = -F.softplus(z).sum(dim=2)  # log prod_j (1 - p_j)
    mil = -(y_img * _log1mexp(log_q) + (1.0 - y_img) * log_q)  # [B, C]
    if has_box is None or grid_labels is None:
        lam = torch.zeros_like(mil)
        box = torch.zeros_like(mil)
    else:
        lam = has_box.to(z.dtype)
        yg = grid_labels.to(z.dtype).flatten(2)
        box = F.binary_cross_entropy_with_logits(z, yg, reduction="none").sum(dim=2)  # Eq. 4
    total = (lam * beta_b * box + (1.0 - lam) * mil).sum()
    return total / (b * c) if reduction == "mean" else total


# ---- alignment --------------------------------------------------------------------------
def blur_grid(x: torch.Tensor, kernel: int = 16) -> torch.Tensor:
    """``B(G(x))``: average pooling (kernel = stride = 16) then bilinear back to the input size (disease-masks Eq. 6)."""
    pooled = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
    return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


def alignment_loss_terms(anchor: torch.Tensor, warped: torch.Tensor,
                         feature_extractor: FeatureExtractor | None = None, *, kernel: int = 16,
                         reduction: Reduction = "mean") -> dict[str, torch.Tensor]:
    """Perceptual and Euclidean alignment losses (disease-masks-attention.txt Eq. 6-9).

    ``phi = B(G(warped))`` (Eq. 6, ``warped`` is the affine-warped input ``[B, ch, H, W]``);
    ``anchor`` is the canonical chest ``[1 or B, ch, H, W]``.

    - Euclidean (Eq. 8): ``sum_ij ||A^ij - phi^ij||_2`` (norm over channels at each pixel).
    - Perceptual (Eq. 7): ``sum_s ||F_s(A) - F_s(phi)||_2 / (C_s H_s W_s)`` over the feature maps
      returned by ``feature_extractor`` (stages 2-5 of a network; anchor features without grad).
    - Total (Eq. 9): ``L_e + L_p``. Per sample, averaged over the batch; ``reduction="mean"``
      additionally divides the per-sample values by ``H * W`` (the relative weighting of the
      two terms is the paper's either way).
    """
    _check_reduction(reduction)
    phi = blur_grid(warped, kernel)
    a = anchor.to(phi.dtype).expand_as(phi)
    euclid = torch.linalg.vector_norm(a - phi, dim=1).flatten(1).sum(dim=1)  # [B]
    perc = phi.new_zeros(phi.shape[0])
    if feature_extractor is not None:
        with torch.no_grad():
            fa = list(feature_extractor(anchor.to(phi.dtype)))
        fp = list(feature_extractor(phi))
        for xa, xp in zip(fa, fp):
            xa = xa.expand_as(xp)
            n = xp[0].numel()
            perc = perc + torch.linalg.vector_norm((xa - xp).flatten(1), dim=1) / n
    scale = 1.0 / (warped.shape[-2] * warped.shape[-1]) if reduction == "mean" else 1.0
    euclid = euclid.mean() * scale
    perc = perc.mean() * scale
    return {"loss": euclid + perc, "euclidean": euclid, "perceptual": perc}


def alignment_loss(anchor: torch.Tensor, warped: torch.Tensor,
                   feature_extractor: FeatureExtractor | None = None, *, kernel: int = 16,
                   reduction: Reduction = "mean") -> torch.Tensor:
    """``L_total = L_e + L_p`` (disease-masks-attention.txt Eq. 9); see :func:`alignment_loss_terms`."""
    return alignment_loss_terms(anchor, warped, feature_extractor, kernel=kernel, reduction=reduction)["loss"]
