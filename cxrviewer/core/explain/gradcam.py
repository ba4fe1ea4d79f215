"""Grad-CAM (Selvaraju et al., cited as [23] in disease-masks-attention.txt Sec. 2.1).

``alpha_k = mean_{ij} d y_c / d A_k^{ij}``, ``L = ReLU(sum_k alpha_k A_k)`` at a target layer.
A forward hook captures the layer's output; gradients are taken with ``torch.autograd.grad``
(so parameters' ``.grad`` is never touched); the hook is removed after every call.
Works for any ``nn.Module`` returning a tensor ``[B, C]`` or the contract's dict with "logits".
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.registry import Explainer, register_explainer, to_numpy

__all__ = ["GradCamExplainer", "grad_cam"]


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    raise ExplainError("Grad-CAM needs a model returning a tensor or a dict with 'logits'")


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    target_layer: nn.Module,
    class_index: int | Sequence[int] | torch.Tensor,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """Raw Grad-CAM maps ``[B, h, w]`` (ReLU'd, not normalised) at ``target_layer`` for ``class_index``.

    ``class_index`` is one class for the whole batch or one per sample. Gradients are enabled
    inside even when called under ``torch.no_grad()``; frozen models work because the captured
    activation is re-attached as a leaf that requires grad.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        act = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(act, torch.Tensor):
            raise ExplainError("Grad-CAM target layer does not output a tensor")
        if not act.requires_grad:  # frozen model / no_grad caller: re-attach as a grad leaf
            act = act.detach().requires_grad_(True)
            store["act"] = act
            if isinstance(out, (tuple, list)):
                return type(out)([act, *out[1:]])
            return act
        store["act"] = act
        return None

    handle = target_layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
            logits = _logits_of(model(*args, **forward_kwargs))
            if "act" not in store:
                raise ExplainError("Grad-CAM target layer was not run by the model's forward pass")
            b = logits.shape[0]
            idx = torch.as_tensor(class_index, device=logits.device).reshape(-1)
            if idx.numel() == 1:
                idx = idx.expand(b)
            score = logits.gather(1, idx.view(-1, 1).long()).sum()
            act = store["act"]
            (grads,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    if act.dim() != 4:
        raise ExplainError(f"Grad-CAM target layer output must be [B,K,h,w], got {tuple(act.shape)}")
    alpha = grads.mean(dim=(-2, -1), keepdim=True)
    return torch.relu((alpha * act).sum(dim=1)).detach()


@register_explainer("gradcam")
class GradCamExplainer(Explainer):
    """Grad-CAM at ``model.feature_layer()`` (the layer whose output is "features")."""

    title = "Grad-CAM"
    families = ("classifier",)
    needs_model = True

    def explain(
        self,
        output: Mapping[str, torch.Tensor],
        class_index: int,
        *,
        model: nn.Module | None = None,
        inputs: Any = None,
        **context: Any,
    ) -> dict[str, np.ndarray]:
        if model is None or inputs is None:
            raise ExplainError("Grad-CAM needs the model and its input (it runs a backward pass)")
        layer = context.get("target_layer")
        if layer is None:
            if not hasattr(model, "feature_layer"):
                raise ExplainError("Grad-CAM needs target_layer= or a model with feature_layer()")
            layer = model.feature_layer()
        cam = grad_cam(model, inputs, layer, class_index, **context.get("forward_kwargs", {}))
        return {"gradcam": to_numpy(cam)}
