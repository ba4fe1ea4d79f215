"""Class activation maps (CAM): disease-masks-attention.txt Eq. 1-2 (after Zhou et al.).

``S_c = sum_k w_k^c f_k`` over the last feature map; the class probability is the sigmoid
of the pooled map. Maps keep raw values; normalisation is only for display/box extraction.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

__all__ = ["CamExplainer", "cam_probability", "class_activation_maps", "upsample_maps"]


def class_activation_maps(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw CAMs ``S_c = sum_k W[c, k] f_k`` (disease-masks-attention.txt Eq. 1).

    features ``[B, K, h, w]``, weight ``[C, K]`` -> ``[B, C, h, w]``. Eq. 1 has no bias; when
    ``bias [C]`` is given it is added at every location, so that the spatial mean of the map
    equals the classifier logit (GAP -> linear) and Eq. 2 gives the model's probability.
    """
    if features.dim() != 4 or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"CAM needs features [B,K,h,w] and weight [C,K]; got {tuple(features.shape)} and {tuple(weight.shape)}"
        )
    cam = torch.einsum("bkhw,ck->bchw", features, weight.to(features.dtype))
    if bias is not None:
        cam = cam + bias.to(cam.dtype).view(1, -1, 1, 1)
    return cam


def cam_probability(
    cam: torch.Tensor, pooling: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Class probability ``P_c = sigmoid(pool(S_c))`` (disease-masks-attention.txt Eq. 2).

    The paper's Eq. 2 writes a double *sum* over the ``p x p`` map but its text says "after
    performing global averaging pooling"; the default follows the text (``"mean"``, which
    matches a GAP -> linear classifier); ``pooling="sum"`` gives the formula as printed.
    ``cam [B, C, h, w]`` -> ``[B, C]``.
    """
    if pooling == "mean":
        pooled = cam.mean(dim=(-2, -1))
    elif pooling == "sum":
        pooled = cam.sum(dim=(-2, -1))
    else:
        raise ValueError(f"pooling must be 'mean' or 'sum', not {pooling!r}")
    return torch.sigmoid(pooled)


def upsample_maps(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps ``[..., h, w]`` to ``size = (H, W)``, keeping raw values.

    No normalisation or clipping is applied (bilinear interpolation never leaves the
    input's range). Accepts ``[h,w]``, ``[C,h,w]`` or ``[B,C,h,w]`` (numpy or torch).
    """
    t = torch.as_tensor(maps)
    if not t.is_floating_point():
        t = t.float()
    lead = t.shape[:-2]
    x = t.reshape(-1, 1, *t.shape[-2:])
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-2:])


@register_explainer("cam")
class CamExplainer(Explainer, title="Class activation map (CAM)", short="cls", order=30, requires=("classifier",),
                   families=("classifier",), box_map="cam", box_priority=1):
    """The model's own class activation map (output "cam"; computed from "features" if absent)."""

    maps = (MapSpec("cam", "CAM S_c", "score"),)
    panels = (PanelSpec("original", "Original + CAM", "cam", quantity="activation", order=0, caption="CAM"),)
    box_rule = BoxRule("threshold")
    box_score = "map"  # mean raw CAM inside the box

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        p = ctx.classifier_pass()  # the classifier's one forward: probabilities + CAM
        cam = p.out.get("cam")
        cw = getattr(p.bundle.model, "cam_weights", None)
        if cam is None and "features" in p.out and callable(cw):  # a head without its own "cam" output
            cam = class_activation_maps(p.out["features"].detach().float(), cw()[0].detach().float())
        if cam is None:
            return ExplainerOutput({})
        return ExplainerOutput({"cam": p.mapper(cam[0].detach())})

    def empty_reason(self, results: "Results") -> str:
        return "the classifier gives no CAM (it needs a linear head after global pooling)"

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: torch.nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
        if "cam" in output:
            cam = output["cam"][:, class_index]
        elif model is not None and "features" in output and hasattr(model, "cam_weights"):
            w, _b = model.cam_weights()
            cam = class_activation_maps(output["features"], w[class_index : class_index + 1])[:, 0]
        else:
            cam = self._require(output, "cam")
        return {"cam": to_numpy(cam)}
