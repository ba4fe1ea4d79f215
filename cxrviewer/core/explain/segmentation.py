"""Lung and heart masks (lung-heart-feature-weighting.txt Sec. 3.2) as a pipeline step.

The U-Net is trained on unaligned radiographs (JSRT), so it segments the ORIGINAL working
frame; its masks are warped into the aligned frame for the lung/heart-weighted classifier
(``ExplainContext.seg_work``, lung-heart Eq. 3) and stored unaligned at ``map_shape``.

Run size (:func:`run_size`): the U-Net runs at the size it was trained at (the manifest's
``input_size``) unless the manifest key ``inference.run_size`` (a longest side in pixels, 0 = the
trained size) or the pipeline option ``segmentation_size`` (same meaning, wins) says otherwise;
the size used is the output's ``run_size`` attribute. It is never scaled down by default: the
masks are stored at map resolution and a 256 px input has the detail they need, but a U-Net is
tied to the scale it was trained at. Measured with the shipped JSRT U-Net (trained at 160 px,
50 held-out images, Dice vs the SCR masks, left lung / right lung / heart): 0.965 / 0.974 /
0.947 at 160 px; the images reduced to 80 px and enlarged back to 160 px (80 px of detail at
the trained scale) 0.960 / 0.970 / 0.947; run at 80 px (half the trained scale) 0.695 / 0.800 /
0.005. So a U-Net is made fast by training it small (``cxr-train segment`` trains at 160 px);
a bundle trained at 512 runs at 512 unless its maker validated a smaller ``run_size``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer
from cxrviewer.core.preprocess import maps_to_frame

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext

__all__ = ["SegmentationExplainer", "run_size"]

_MIN_SIDE = 16


def run_size(trained: Sequence[int], inference: Any = None, option: Any = None) -> tuple[int, int]:
    """The U-Net's input ``(H, W)``: the trained size, or scaled (aspect kept) to the longest side
    ``option`` or else ``inference["run_size"]`` when given (0 = the trained size; module docstring)."""
    h, w = int(trained[0]), int(trained[1])
    side = option
    if side is None and isinstance(inference, dict):
        side = inference.get("run_size")
    if side is None:
        return h, w
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 0 \
            or 0 < side < _MIN_SIDE or side > 4096:
        raise ExplainError(f"segmentation run size must be 0 (the trained size) or {_MIN_SIDE}..4096 px, "
                           f"got {side!r}")
    if side == 0 or side == max(h, w):
        return h, w
    s = float(side) / max(h, w)
    return max(_MIN_SIDE, int(round(h * s))), max(_MIN_SIDE, int(round(w * s)))


@register_explainer("segmentation")
class SegmentationExplainer(Explainer, title="Lung / heart segmentation", short="seg", order=20,
                            requires=("segmentation",)):
    """Binary masks ``[3, h, w]`` (left lung, right lung, heart; names in the ``classes`` attribute)."""

    maps = (MapSpec("masks", "left lung, right lung, heart", "mask", per_class=False),)
    panels = (PanelSpec("lung_heart", "Lung / heart", "masks", kind="masks", order=70, per_class=False,
                        caption="Lung / heart:"),)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        b = ctx.bundles["segmentation"]
        size = run_size(b.manifest.input_size, b.manifest.inference, ctx.option("segmentation_size", None))
        out, box = ctx.forward("segmentation", ctx.frame, input_size=size)  # the original frame (module docstring)
        probs = torch.sigmoid(out["logits"].float())[0]
        seg_frame = maps_to_frame(probs, ctx.frame_shape, box)[None]
        if ctx.theta is not None:
            from cxrviewer.core.models.alignment import warp

            ctx.seg_work = warp(seg_frame, ctx.theta)
        else:
            ctx.seg_work = seg_frame
        masks = (ctx.mapper(box, aligned=False)(probs, record=False) > 0.5).astype(np.uint8)
        names = getattr(b.model, "classes", None) or b.manifest.classes
        return ExplainerOutput({"masks": masks}, {"classes": list(names), "run_size": list(size)})

    def caption(self, results, panel: PanelSpec, class_index: int | None) -> str:  # noqa: ANN001
        return "L red, R green, heart blue"
