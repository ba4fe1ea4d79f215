"""Contrast-induced attention (CIA-Net): cia-net-alignment-contrast-attention.txt Eq. 3 and its test procedure.

``dM = |M+ - M-|`` between the attention maps of a positive image and its paired normal
image, rescaled so that ``sum_k dm_k = w * h``; the weighted feature map is ``dM * F+``.
The pair is the normal image whose 16x16 "hash code" is nearest by cosine distance (Sec. 4.3.2).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.registry import Explainer, register_explainer, to_numpy

__all__ = ["ContrastExplainer", "ContrastResult", "apply_contrast", "contrast_attention", "pair_and_contrast"]

_EPS = 1e-12


def contrast_attention(m_pos: torch.Tensor, m_neg: torch.Tensor) -> torch.Tensor:
    """``dM = |M+ - M-|`` scaled so each sample's map sums to ``w * h`` (cia-net Eq. 3).

    Accepts ``[B, h, w]`` or ``[B, 1, h, w]`` (returned in the same shape). A zero difference
    (identical images) gives the uniform map of ones, i.e. no re-weighting.
    """
    d = (m_pos - m_neg).abs()
    h, w = d.shape[-2:]
    flat = d.reshape(d.shape[0], -1)
    s = flat.sum(dim=1, keepdim=True)
    uniform = torch.ones_like(flat)
    scaled = torch.where(s > _EPS, flat * (h * w) / s.clamp_min(_EPS), uniform)
    return scaled.reshape(d.shape)


def apply_contrast(features: torch.Tensor, d_m: torch.Tensor) -> torch.Tensor:
    """Weighted feature map ``F = dM * F+`` cell by cell (cia-net Eq. 3); features ``[B, K, h, w]``."""
    if d_m.dim() == 3:
        d_m = d_m.unsqueeze(1)
    return features * d_m


@dataclass
class ContrastResult:
    """Contrast map ``[B, h, w]``, grid probabilities ``[B, C, gh, gw]`` and the paired normal indices."""

    attention: torch.Tensor
    grid_probs: torch.Tensor
    pair_index: list[int]


def pair_and_contrast(
    model: torch.nn.Module,
    x_pos: torch.Tensor,
    bank_images: torch.Tensor,
    bank_codes: torch.Tensor | None = None,
) -> ContrastResult:
    """CIA-Net test procedure (cia-net Sec. 3.3, 4.3.2): pair each positive with its nearest normal, run the model.

    ``bank_images [M, 1, H, W]`` are normal images (same preprocessing as ``x_pos``); their hash
    codes are computed with ``cxrviewer.core.models.cia.hash_codes`` unless given.
    """
    try:
        from cxrviewer.core.models.cia import hash_codes, nearest_normal
    except ImportError as exc:  # pragma: no cover - depends on the models package
        raise ExplainError(f"the CIA model family is not available: {exc}") from exc
    with torch.no_grad():
        codes = bank_codes if bank_codes is not None else hash_codes(bank_images)
        q = hash_codes(x_pos)
        idx = [int(nearest_normal(q[i], codes)) for i in range(q.shape[0])]
        x_neg = bank_images[idx].to(x_pos.device, x_pos.dtype)
        out = model(x_pos, x_neg)
    att = out["attention"]
    if att.dim() == 4:
        att = att[:, 0]
    return ContrastResult(attention=att, grid_probs=out["grid_probs"], pair_index=idx)


@register_explainer("contrast")
class ContrastExplainer(Explainer):
    """CIA-Net's contrast map dM and the class's grid probabilities (cia-net Eq. 3, test at 0.5)."""

    title = "Contrast-induced attention (CIA)"
    families = ("cia",)

    def explain(
        self,
        output: Mapping[str, torch.Tensor],
        class_index: int,
        *,
        model: torch.nn.Module | None = None,
        inputs: Any = None,
        **context: Any,
    ) -> dict[str, np.ndarray]:
        att = self._require(output, "attention")
        if att.dim() == 4:
            att = att[:, 0]
        maps = {"contrast": to_numpy(att)}
        if "grid_probs" in output:
            maps["grid"] = to_numpy(output["grid_probs"][:, class_index])
        pair = context.get("pair_index", output.get("pair_index") if hasattr(output, "get") else None)
        if pair is not None:
            maps["pair_index"] = np.asarray(torch.as_tensor(pair).reshape(-1).tolist(), dtype=np.int64)
        return maps
