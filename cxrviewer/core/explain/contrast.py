"""Contrast-induced attention (CIA-Net): cia-net-alignment-contrast-attention.txt Eq. 3 and its test procedure.

``dM = |M+ - M-|`` between the attention maps of a positive image and its paired normal
image, rescaled so that ``sum_k dm_k = w * h``; the weighted feature map is ``dM * F+``.
The pair is the normal image whose 16x16 "hash code" is nearest by cosine distance (Sec. 4.3.2).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.context import accepts
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

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
class ContrastExplainer(Explainer, title="Contrast-induced attention (CIA)", short="CIA", order=70,
                        requires=("cia",), families=("cia",), box_map="grid", box_priority=2):
    """CIA-Net's contrast map dM and the class's grid probabilities (cia-net Eq. 3, test at 0.5)."""

    maps = (MapSpec("contrast", "contrast attention dM", "score", per_class=False),
            MapSpec("grid", "grid probabilities (nearest-upsampled)", "probability"),
            MapSpec("grid_raw", "grid probabilities as the network gave them", "probability", frame="own"),
            MapSpec("paired_normal", "the paired normal image (bank frame)", "image", frame="own",
                    per_class=False))
    panels = (PanelSpec("contrast", "Contrast attention dM", "contrast", quantity="contrast",
                        order=40, per_class=False, caption="Contrast dM"),
              PanelSpec("normal", "Paired normal", "paired_normal", kind="image", order=50, per_class=False,
                        caption="Paired normal"))
    box_rule = BoxRule("grid", 0.5)
    box_score = "probability"  # mean grid probability inside the box

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        from cxrviewer.core.models.cia import hash_codes, nearest_normal
        from cxrviewer.core.preprocess import resize

        b = ctx.bundles["cia"]
        pre = ctx.preprocess("cia")
        bank = np.asarray(b.extras["normal_bank_images"])
        x01, box = pre.crop_resize(ctx.work)
        code = hash_codes(x01.float().cpu())[0]
        codes = b.extras.get("normal_bank_codes")
        codes_t = (torch.from_numpy(np.asarray(codes, np.float32)) if codes is not None
                   else hash_codes(torch.from_numpy(bank.astype(np.float32) / 255.0)[:, None]))
        idx = nearest_normal(code, codes_t)
        neg01 = resize(torch.from_numpy(bank[idx].astype(np.float32) / 255.0)[None, None].to(x01.device),
                       tuple(b.manifest.input_size))
        kw = {}
        up = b.manifest.inference.get("upsample_to")
        if up and accepts(b.model, "upsample_to"):
            kw["upsample_to"] = int(up)  # cia-net Sec. 3.3 test-time upsampling of F before the head
        with torch.no_grad(), ctx.device.autocast():
            out = b.model(pre.normalise(x01), pre.normalise(neg01), **kw)
        att = out["attention"][0].float()
        att = att[0] if att.dim() == 3 else att
        grid = out["grid_probs"][0].float()
        mp = ctx.mapper(box)
        ids = b.extras.get("normal_bank_ids")
        pair_id = str(ids[idx]) if ids is not None and len(ids) > idx else f"bank[{idx}]"
        if not ctx.results.classes:
            ctx.results.classes = tuple(b.manifest.classes)
        return ExplainerOutput(
            {"contrast": mp(att)[0], "grid": mp(grid, nearest=True),
             "grid_raw": grid.cpu().numpy().astype(np.float32), "paired_normal": bank[idx].astype(np.uint8)},
            {"classes": list(b.manifest.classes), "paired_normal_id": pair_id})

    def missing(self, roles: Collection[str]) -> str:
        return "" if self.applies(roles) else "needs a CIA model with a normal bank (not loaded)"

    def class_reason(self, results: "Results", name: str) -> str:
        return "" if name in self.classes(results) else "not a CIA model class"

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        if panel.key == "normal":
            return str(results.attrs.get(self.name, {}).get("paired_normal_id") or "")
        raw = results.get(self.name, "grid_raw")
        names = self.classes(results)
        if raw is None or class_index is None or class_index >= len(results.classes):
            return ""
        name = results.classes[class_index]
        if name not in names:
            return ""
        return f"· {name} grid max p={float(raw[names.index(name)].max()):.2f}"

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: torch.nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
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
