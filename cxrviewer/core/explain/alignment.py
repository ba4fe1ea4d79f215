"""Alignment to the canonical chest (cia-net Eq. 1, disease-masks Eq. 6) as a pipeline step.

The alignment network predicts an affine ``theta`` (``F.affine_grid`` convention, normalised
coordinates, original -> aligned sampling); from then on the classifier, DM and CIA networks
see the aligned working frame (:meth:`~cxrviewer.core.explain.context.ExplainContext.set_alignment`)
and their maps are drawn back through the inverse warp. ``valid`` marks where those maps land
on the original (outside it they hold no data and are drawn transparent).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext

__all__ = ["AlignmentExplainer", "valid_region"]


def valid_region(theta_inv: torch.Tensor, map_shape: tuple[int, int]) -> np.ndarray:
    """Bool ``map_shape``: where maps computed on the aligned frame land on the original."""
    from cxrviewer.core.models.alignment import warp

    ones = torch.ones(1, 1, *map_shape)
    with torch.no_grad():
        return (warp(ones, theta_inv.float())[0, 0] > 0.5).numpy()


@register_explainer("alignment")
class AlignmentExplainer(Explainer, title="Alignment to the canonical chest", short="align", order=10,
                         requires=("alignment",)):
    """The aligned image, the affine and its parameters (s_x, s_y, t_x, t_y, theta)."""

    maps = (MapSpec("aligned_image", "aligned image in [0, 1]", "image", frame="aligned", per_class=False),
            MapSpec("affine", "affine [2, 3], original -> aligned sampling", "affine", frame="none",
                    per_class=False),
            MapSpec("params", "s_x, s_y, t_x, t_y, theta", "vector", frame="none", per_class=False),
            MapSpec("valid", "where aligned-frame maps land on the original", "mask", per_class=False))
    panels = (PanelSpec("aligned", "Aligned", "aligned_image", kind="image", order=10, per_class=False,
                        caption="Aligned"),)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        out, _ = ctx.forward("alignment", ctx.frame)
        theta = out["theta"][:1].float()
        ctx.set_alignment(theta)
        return ExplainerOutput({
            "aligned_image": ctx.work[0, 0].cpu().numpy().astype(np.float32),
            "affine": theta[0].cpu().double().numpy(),
            "params": out["params"][0].float().cpu().numpy().astype(np.float32),
            "valid": valid_region(ctx.theta_inv, ctx.map_shape),
        })

    def caption(self, results, panel: PanelSpec, class_index: int | None) -> str:  # noqa: ANN001
        return "to the canonical chest"
