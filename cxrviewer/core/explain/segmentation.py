"""Lung and heart masks (lung-heart-feature-weighting.txt Sec. 3.2) as a pipeline step.

The U-Net is trained on unaligned radiographs (JSRT), so it segments the ORIGINAL working
frame; its masks are warped into the aligned frame for the lung/heart-weighted classifier
(``ExplainContext.seg_work``, lung-heart Eq. 3) and stored unaligned at ``map_shape``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer
from cxrviewer.core.preprocess import maps_to_frame

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext

__all__ = ["SegmentationExplainer"]


@register_explainer("segmentation")
class SegmentationExplainer(Explainer, title="Lung / heart segmentation", short="seg", order=20,
                            requires=("segmentation",)):
    """Binary masks ``[3, h, w]`` (left lung, right lung, heart; names in the ``classes`` attribute)."""

    maps = (MapSpec("masks", "left lung, right lung, heart", "mask", per_class=False),)
    panels = (PanelSpec("lung_heart", "Lung / heart", "masks", kind="masks", order=70, per_class=False,
                        caption="Lung / heart:"),)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        out, box = ctx.forward("segmentation", ctx.frame)  # the original frame (see the module docstring)
        probs = torch.sigmoid(out["logits"].float())[0]
        seg_frame = maps_to_frame(probs, ctx.frame_shape, box)[None]
        if ctx.theta is not None:
            from cxrviewer.core.models.alignment import warp

            ctx.seg_work = warp(seg_frame, ctx.theta)
        else:
            ctx.seg_work = seg_frame
        masks = (ctx.mapper(box, aligned=False)(probs) > 0.5).astype(np.uint8)
        b = ctx.bundles["segmentation"]
        names = getattr(b.model, "classes", None) or b.manifest.classes
        return ExplainerOutput({"masks": masks}, {"classes": list(names)})

    def caption(self, results, panel: PanelSpec, class_index: int | None) -> str:  # noqa: ANN001
        return "L red, R green, heart blue"
