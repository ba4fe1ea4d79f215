"""Explanation methods (registry), heat map -> box extraction and metrics.

Method modules are imported explicitly here so that each registers itself (explicit imports
survive PyInstaller; package scanning does not). A new method: one file + one line below.
"""
from __future__ import annotations

from cxrviewer.core.explain import alignment as alignment  # registers "alignment"
from cxrviewer.core.explain import anatomy as anatomy  # registers "anatomy" (the default box method)
from cxrviewer.core.explain import attention_mining as attention_mining  # registers "attention_mining"
from cxrviewer.core.explain import cam as cam  # registers "cam"
from cxrviewer.core.explain import contrast as contrast  # registers "contrast"
from cxrviewer.core.explain import disease_masks as disease_masks  # registers "disease_mask"
from cxrviewer.core.explain import gradcam as gradcam  # registers "gradcam"
from cxrviewer.core.explain import prior as prior  # registers "prior" (the fixed median box)
from cxrviewer.core.explain import segmentation as segmentation  # registers "segmentation"
from cxrviewer.core.explain import boxes as boxes
from cxrviewer.core.explain import labels as labels
from cxrviewer.core.explain import metrics as metrics
from cxrviewer.core.explain.registry import (
    ExplainError,
    Explainer,
    ExplainerOutput,
    MapSpec,
    PanelSpec,
    applicable_explainers,
    get_explainer,
    list_explainers,
    register_explainer,
)

__all__ = [
    "ExplainError",
    "Explainer",
    "ExplainerOutput",
    "MapSpec",
    "PanelSpec",
    "alignment",
    "anatomy",
    "applicable_explainers",
    "attention_mining",
    "boxes",
    "cam",
    "contrast",
    "disease_masks",
    "get_explainer",
    "gradcam",
    "labels",
    "list_explainers",
    "metrics",
    "prior",
    "register_explainer",
    "segmentation",
]
