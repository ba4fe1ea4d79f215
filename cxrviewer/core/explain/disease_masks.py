"""Disease masks (DM) and pseudo disease masks (PDM): disease-masks-attention.txt Eq. 2-3 and Sec. 4.4.

Eq. 3::

    psi_c = T( 1/N_c sum_d N(Lbar_c^d) ),  Lbar_c^d = L_c^d             if c is asymmetric
                                                     H(L_c^d) + L_c^d  otherwise

over the CAMs ``L_c^d`` of the (aligned) training images with ``P_c >= 0.8`` (Eq. 2). ``N``
rescales each map to [0, 1]; ``H`` is the horizontal flip; ``T`` thresholds.

Decisions where the paper is silent (documented, configurable):
- The paper builds masks for the eight boxed classes only (Fig. 3): the seven symmetric ones
  (``SYMMETRIC_CLASSES``) are flipped, Cardiomegaly is not. For the six unboxed classes the
  paper defines no mask; we use Eq. 3's asymmetric branch (no flip), the conservative choice.
- ``N`` is applied to ``Lbar`` (after the flip-sum), as Eq. 3 is written.
- The threshold value of ``T`` is not given; default 0.5, binary output (as the PDMs, which the
  paper fills with 0/1). A class with no image passing the 0.8 filter gets an all-zero mask,
  so ``f' = psi*f + f = f`` (Eq. 4): no attention rather than a made-up one.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.classes import CLASSES, SYMMETRIC_CLASSES
from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.labels import NIH_ONLY, nih_name
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

log = logging.getLogger(__name__)

__all__ = [
    "DiseaseMaskExplainer",
    "PDM_REGIONS",
    "class_disease_mask",
    "disease_masks_from_cams",
    "normalize_maps",
    "pseudo_disease_masks",
]

#: Minimum probability of an image for its CAM to enter the mask (disease-masks Sec. 3.1.1).
MIN_PROB = 0.8


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """``N()``: min-max rescale each map ``[..., h, w]`` to [0, 1] (constant map -> zeros)."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).double()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    rng = hi - lo
    out = torch.where(rng > 0, (flat - lo) / rng.clamp_min(1e-300), torch.zeros_like(flat))
    return out.reshape(maps.shape).to(maps.dtype if maps.is_floating_point() else torch.float32)


def class_disease_mask(
    cams: torch.Tensor, symmetric: bool, threshold: float = 0.5, binary: bool = True
) -> torch.Tensor:
    """``psi_c`` from the CAMs ``[D, h, w]`` of one class's selected images (disease-masks Eq. 3).

    ``symmetric`` adds the horizontal flip ``H(L) + L`` before ``N()``. Returns ``[h, w]``:
    0/1 when ``binary`` else the mean map with values below ``threshold`` set to 0.
    """
    if cams.dim() != 3:
        raise ValueError(f"class_disease_mask needs CAMs [D, h, w], got {tuple(cams.shape)}")
    if cams.shape[0] == 0:
        return torch.zeros(cams.shape[-2:], dtype=torch.float32)
    lbar = cams.float()
    if symmetric:
        lbar = torch.flip(lbar, dims=[-1]) + lbar
    mean = normalize_maps(lbar).mean(dim=0)
    if binary:
        return (mean >= threshold).float()
    return mean * (mean >= threshold).float()


def disease_masks_from_cams(
    cams: torch.Tensor,
    probs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    classes: Sequence[str] = CLASSES,
    min_prob: float = MIN_PROB,
    threshold: float = 0.5,
    binary: bool = True,
    symmetric_classes: Sequence[str] = SYMMETRIC_CLASSES,
) -> tuple[torch.Tensor, list[int]]:
    """All classes' masks ``psi [C, h, w]`` from CAMs ``[N, C, h, w]`` and probabilities ``[N, C]``.

    Image ``d`` enters class ``c`` when ``probs[d, c] >= min_prob`` (disease-masks Sec. 3.1.1);
    ``labels`` (optional, not in the paper) additionally requires a positive label. The flip is
    applied to exactly the classes in ``symmetric_classes``. Returns ``(psi, N_c per class)``.
    """
    if cams.dim() != 4 or probs.shape != cams.shape[:2]:
        raise ValueError(f"need cams [N,C,h,w] and probs [N,C]; got {tuple(cams.shape)}, {tuple(probs.shape)}")
    if len(classes) != cams.shape[1]:
        raise ValueError(f"{len(classes)} class names for {cams.shape[1]} CAM channels")
    keep = probs >= min_prob
    if labels is not None:
        keep = keep & (labels > 0.5)
    sym = set(symmetric_classes)
    out, counts = [], []
    for c, name in enumerate(classes):
        sel = cams[keep[:, c], c]
        counts.append(int(sel.shape[0]))
        if sel.shape[0] == 0:
            log.warning("disease mask for %s: no image with P >= %.2f; mask left empty", name, min_prob)
        out.append(class_disease_mask(sel, symmetric=name in sym, threshold=threshold, binary=binary))
    return torch.stack(out), counts


#: PDM region per class. Paper (Sec. 4.4): infiltrate, mass, nodule and pneumonia -> all lung
#: area. The paper draws the others from "external knowledge" (Fig. 7, not in the text); our
#: choices: Cardiomegaly -> heart; Effusion -> lower lungs (fluid collects at the bases);
#: Hernia (hiatal, retro-cardiac) -> heart; every other class -> whole lungs.
PDM_REGIONS: dict[str, str] = {
    "Atelectasis": "lungs",
    "Cardiomegaly": "heart",
    "Effusion": "lower_lungs",
    "Infiltration": "lungs",
    "Mass": "lungs",
    "Nodule": "lungs",
    "Pneumonia": "lungs",
    "Pneumothorax": "lungs",
    "Consolidation": "lungs",
    "Edema": "lungs",
    "Emphysema": "lungs",
    "Fibrosis": "lungs",
    "Pleural_Thickening": "lungs",
    "Hernia": "heart",
}


def _lower_part(mask: np.ndarray, fraction: float) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros_like(mask)
    top, bottom = rows[0], rows[-1] + 1
    cut = bottom - int(round(fraction * (bottom - top)))
    out = mask.copy()
    out[:cut] = False
    return out


def pseudo_disease_masks(
    left_lung: np.ndarray | torch.Tensor,
    right_lung: np.ndarray | torch.Tensor,
    heart: np.ndarray | torch.Tensor,
    *,
    classes: Sequence[str] = CLASSES,
    lower_fraction: float = 0.5,
    regions: Mapping[str, str] = PDM_REGIONS,
) -> np.ndarray:
    """Pseudo disease masks ``[C, H, W]`` (0/1) from anatomy (disease-masks Sec. 4.4, Fig. 7).

    Inputs are ``[H, W]`` masks (> 0.5 = inside). "lower_lungs" keeps the bottom
    ``lower_fraction`` of each lung's own vertical extent.
    """
    ll = np.asarray(left_lung) > 0.5
    rl = np.asarray(right_lung) > 0.5
    ht = np.asarray(heart) > 0.5
    if not (ll.shape == rl.shape == ht.shape) or ll.ndim != 2:
        raise ValueError("left lung, right lung and heart masks must be 2-D and the same shape")
    region_masks = {
        "lungs": ll | rl,
        "heart": ht,
        "lower_lungs": _lower_part(ll, lower_fraction) | _lower_part(rl, lower_fraction),
    }
    out = np.zeros((len(classes), *ll.shape), dtype=np.float32)
    for c, name in enumerate(classes):
        out[c] = region_masks[regions.get(name, "lungs")]
    return out


@register_explainer("disease_mask")
class DiseaseMaskExplainer(Explainer, title="Disease mask (DM prior)", short="ψ", order=60, families=("classifier",),
                           needs_model=True):
    """The class's disease mask psi_c of a DM model (disease-masks Eq. 3), resized to the CAM grid."""

    maps = (MapSpec("psi", "disease mask psi_c", "probability"),
            MapSpec("dm_probabilities", "the DM model's probabilities", "probability", frame="none",
                    per_class=False),
            MapSpec("dm_cam", "the DM model's CAM", "score"))
    panels = (PanelSpec("disease_mask", "Disease mask", "psi", quantity="probability",
                        fixed_range=(0.0, 1.0), order=60, caption="Disease mask ψ"),)

    @classmethod
    def applies(cls, roles: Any) -> bool:
        """psi from a DM bundle or the classifier, else pseudo masks (PDM) from the segmentation."""
        return "classifier" in roles or "dm" in roles or {"segmentation", "cia"} <= set(roles)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        res = ctx.results
        if "dm" in ctx.bundles:
            out, box = ctx.forward("dm")
            mp = ctx.mapper(box)
            return ExplainerOutput({"psi": mp(ctx.bundles["dm"].model.disease_masks), "dm_cam": mp(out["cam"][0]),
                                    "dm_probabilities": torch.sigmoid(out["logits"][0].float()).cpu().numpy()
                                    .astype(np.float32)},
                                   {"source": "dm", "classes": list(ctx.bundles["dm"].manifest.classes)})
        clf = ctx.bundles.get("classifier")
        psi = getattr(clf.model, "disease_masks", None) if clf is not None else None
        if psi is None and clf is not None and "disease_masks" in clf.extras:
            psi = torch.from_numpy(np.asarray(clf.extras["disease_masks"], np.float32))
        if psi is not None:
            return ExplainerOutput({"psi": ctx.mapper(ctx.classifier_pass().box)(psi)}, {"source": "classifier"})
        seg = res.get("segmentation", "masks")
        if seg is None or seg.shape[0] < 3 or not res.classes:
            return None
        names = list(res.attrs.get("segmentation", {}).get("classes", ()))
        try:
            ll, rl, ht = (seg[names.index(n)] for n in ("left_lung", "right_lung", "heart"))
        except ValueError:
            ll, rl, ht = seg[0], seg[1], seg[2]
        return self._pseudo(res, ll, rl, ht)

    @staticmethod
    def _pseudo(res: "Results", ll: Any, rl: Any, ht: Any) -> ExplainerOutput | None:
        """Pseudo masks of the results' NIH classes (the regions are defined for those only)."""
        covered = [c for c in res.classes if nih_name(c) in PDM_REGIONS]
        if not covered:
            res.notices.append(f"disease masks: pseudo masks exist for the {NIH_ONLY}; none of this model's "
                               "classes is one")
            return None
        psi = pseudo_disease_masks(ll, rl, ht, classes=[nih_name(c) for c in covered])
        return ExplainerOutput({"psi": psi.astype(np.float32)}, {"source": "pdm", "classes": covered})

    def missing(self, roles: Collection[str]) -> str:
        return "" if self.applies(roles) else ("needs a classifier, a DM model or a lung/heart segmentation model "
                                                "(not loaded)")

    def empty_reason(self, results: "Results") -> str:
        if "segmentation" not in results.models and "dm" not in results.models:
            return ("needs a DM model, a classifier with disease masks or a lung/heart segmentation "
                    "for pseudo masks (not loaded)")
        return super().empty_reason(results)

    def class_reason(self, results: "Results", name: str) -> str:
        if name in self.classes(results):
            return ""
        pdm = results.attrs.get(self.name, {}).get("source") == "pdm"
        return f"pseudo masks: {NIH_ONLY}" if pdm and nih_name(name) is None else "no mask from this model"

    def model_role(self, results: "Results") -> str:
        src = results.attrs.get(self.name, {}).get("source")
        return {"dm": "dm", "pdm": "segmentation"}.get(src, "classifier")

    def applies_to(self, model: torch.nn.Module | None = None, family: str | None = None) -> bool:
        return super().applies_to(model, family) and (model is None or hasattr(model, "disease_masks"))

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: torch.nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
        ref = output.get("cam") if hasattr(output, "get") else None
        if ref is None and hasattr(output, "get"):
            ref = output.get("features")
        psi = context.get("disease_masks")
        if psi is None and model is not None and ref is not None and hasattr(model, "masks_at"):
            psi = model.masks_at(tuple(ref.shape[-2:]))  # the model's own resize
        if psi is None:
            psi = getattr(model, "disease_masks", None)
        if psi is None:
            raise ExplainError("this model has no disease masks (it is not a DM model)")
        psi = torch.as_tensor(psi)[class_index].float().detach()
        batch = ref.shape[0] if ref is not None else 1
        if ref is not None and tuple(psi.shape) != tuple(ref.shape[-2:]):
            from cxrviewer.core.explain.cam import upsample_maps

            psi = upsample_maps(psi, tuple(ref.shape[-2:]))
        return {"disease_mask": to_numpy(psi.expand(batch, *psi.shape[-2:]))}
