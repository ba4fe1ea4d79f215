"""Grad-CAM (Selvaraju et al., cited as [23] in disease-masks-attention.txt Sec. 2.1): the one implementation.

``alpha_k = mean_{ij} d y_c / d A_k^{ij}``, ``L = ReLU(sum_k alpha_k A_k)`` at a target layer.
:func:`~cxrviewer.core.explain.context.capture_activation` (the classifier pass's hook) hooks the
layer and re-attaches its output as a leaf that requires grad; :func:`gradcam_from_activation`
takes the gradients of any number of class scores from ONE forward (a backward through the head
only). The pipeline, :func:`grad_cam` (any ``nn.Module``), :func:`head_gradcam` (the registry's
single-model form: from a forward already run, through ``model.head`` only) and the evaluation all
go through these functions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.context import ExplainContext, capture_activation
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

__all__ = ["GradCamExplainer", "capture_activation", "grad_cam", "gradcam_from_activation", "head_gradcam"]


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    raise ExplainError("Grad-CAM needs a model returning a tensor or a dict with 'logits'")


def gradcam_from_activation(logits: torch.Tensor, act: torch.Tensor,
                            classes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Raw Grad-CAM maps from one forward: ``[B, len(classes), h, w]`` (ReLU'd, not normalised).

    ``classes`` is one class per sample (``len == B``) when given as a tensor of shape ``[B]``
    by :func:`grad_cam`, else the list of classes computed for every sample. The gradients of
    every class come from one batched backward through the layers after ``act`` (the head),
    falling back to one backward per class where the head has no batching rule.
    """
    if act.dim() != 4:
        raise ExplainError(f"Grad-CAM target layer output must be [B,K,h,w], got {tuple(act.shape)}")
    cls = [int(c) for c in torch.as_tensor(classes).reshape(-1).tolist()]
    if not cls:
        return act.new_zeros(act.shape[0], 0, *act.shape[-2:]).float()
    with torch.enable_grad():  # the class scores below need the graph even under a caller's no_grad
        alpha = _class_gradients(logits, act, cls).float().mean(dim=(-2, -1))  # [N, B, K]
    return torch.relu(torch.einsum("nbk,bkhw->bnhw", alpha, act.detach().float()))


def _class_gradients(logits: torch.Tensor, act: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """``d logits[:, c] / d act`` for each ``c`` of ``cls``: ``[len(cls), *act.shape]``."""
    if len(cls) > 1:
        onehot = torch.zeros(len(cls), *logits.shape, dtype=logits.dtype, device=logits.device)
        onehot[torch.arange(len(cls)), :, torch.tensor(cls)] = 1.0
        try:
            (g,) = torch.autograd.grad(logits, act, grad_outputs=onehot, is_grads_batched=True, retain_graph=True)
            return g
        except RuntimeError:  # an op of the head without a vmap rule: one backward per class
            pass
    grads = [torch.autograd.grad(logits[:, c].sum(), act, retain_graph=True)[0] for c in cls]
    return torch.stack(grads, 0)


def head_gradcam(model: nn.Module, output: Mapping[str, torch.Tensor], classes: Sequence[int],
                 feature_masks: torch.Tensor | None = None) -> torch.Tensor | None:
    """Grad-CAM ``[B, len(classes), h, w]`` at ``model.feature_layer()`` from a forward already run:
    ``output["features"]`` (that layer's output) goes through ``model.head`` only, no backbone.
    None when the model has no ``head`` or the output no ``features`` (use :func:`grad_cam`)."""
    head = getattr(model, "head", None)
    feats = output.get("features") if isinstance(output, Mapping) else None
    if not callable(head) or not isinstance(feats, torch.Tensor) or feats.dim() != 4:
        return None
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), feats.dtype)
    with torch.enable_grad():  # features of an autocast forward are cast to the head's own dtype
        f = feats.detach().to(dtype).requires_grad_(True)
        logits = _logits_of(head(f, {}, feature_masks))
        return gradcam_from_activation(logits, f, classes).detach()


def grad_cam(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], target_layer: nn.Module,
             class_index: int | Sequence[int] | torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """Raw Grad-CAM maps ``[B, h, w]`` at ``target_layer`` for ``class_index`` (one class for the
    batch or one per sample), from one forward and one head backward per distinct class."""
    with capture_activation(target_layer) as store, torch.enable_grad():
        args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        logits = _logits_of(model(*args, **forward_kwargs))
    if "act" not in store:
        raise ExplainError("Grad-CAM target layer was not run by the model's forward pass")
    b = logits.shape[0]
    idx = torch.as_tensor(class_index).reshape(-1)
    idx = idx.expand(b) if idx.numel() == 1 else idx
    if idx.numel() != b:
        raise ExplainError(f"need one class per sample: {idx.numel()} classes for batch {b}")
    distinct = sorted({int(c) for c in idx.tolist()})
    maps = gradcam_from_activation(logits, store["act"], distinct)  # [B, K, h, w]
    pick = torch.tensor([distinct.index(int(c)) for c in idx.tolist()])
    return maps[torch.arange(b), pick].detach()


@register_explainer("gradcam")
class GradCamExplainer(Explainer, title="Grad-CAM", short="gcam", order=40, requires=("classifier",),
                       families=("classifier",), needs_model=True, box_map="gradcam", box_priority=3):
    """Grad-CAM of every class at ``model.feature_layer()``, from the pipeline's one forward."""

    maps = (MapSpec("gradcam", "Grad-CAM", "score"),)
    panels = (PanelSpec("gradcam", "Grad-CAM", "gradcam", quantity="gradcam", order=100, caption="Grad-CAM"),)
    box_rule = BoxRule("threshold")
    box_score = "map"  # mean raw Grad-CAM inside the box

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        p = ctx.classifier_pass()
        if p.act is None or not p.logits.requires_grad:
            ctx.results.notices.append("Grad-CAM skipped: the classifier has no feature_layer() output")
            return None
        maps = gradcam_from_activation(p.logits, p.act, range(p.logits.shape[1]))[0]
        return ExplainerOutput({"gradcam": p.mapper(maps)})

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
        if model is None or inputs is None:
            raise ExplainError("Grad-CAM needs the model and its input (it runs a backward pass)")
        layer = context.get("target_layer")
        fwd = dict(context.get("forward_kwargs", {}))
        if layer is None and set(fwd) <= {"feature_masks"}:  # the head-only path the pipeline takes
            maps = head_gradcam(model, output, [class_index], fwd.get("feature_masks"))
            if maps is not None:
                return {"gradcam": to_numpy(maps[:, 0])}
        if layer is None:
            if not hasattr(model, "feature_layer"):
                raise ExplainError("Grad-CAM needs target_layer= or a model with feature_layer()")
            layer = model.feature_layer()
        cam = grad_cam(model, inputs, layer, class_index, **fwd)
        return {"gradcam": to_numpy(cam)}
