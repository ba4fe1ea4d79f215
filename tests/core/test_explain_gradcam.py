"""Grad-CAM on a tiny GAP -> linear network, where it must equal ReLU(CAM) / (h*w)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.cam import class_activation_maps
from cxrviewer.core.explain.gradcam import grad_cam


class Tiny(nn.Module):
    family = "classifier"

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x):
        f = self.conv(x)
        logits = self.fc(f.mean(dim=(2, 3)))
        return {"logits": logits, "features": f} if self.as_dict else logits

    def feature_layer(self) -> nn.Module:
        return self.conv


@pytest.mark.parametrize("as_dict", [False, True])
def test_gradcam_equals_relu_cam_for_gap_linear(as_dict: bool) -> None:
    torch.manual_seed(0)
    m = Tiny(as_dict).eval()
    x = torch.randn(2, 1, 6, 6)
    g = grad_cam(m, x, m.conv, 1)
    f = m.conv(x)
    cam = class_activation_maps(f, m.fc.weight)[:, 1]
    assert g.shape == (2, 6, 6)
    assert torch.allclose(g, torch.relu(cam) / 36.0, atol=1e-6)
    assert not m.conv._forward_hooks  # hook removed
    assert all(p.grad is None for p in m.parameters())  # parameters untouched


def test_gradcam_works_frozen_under_no_grad_and_per_sample_classes() -> None:
    torch.manual_seed(1)
    m = Tiny(True).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        g = grad_cam(m, x, m.conv, [0, 2])
    f = m.conv(x)
    cam = class_activation_maps(f, m.fc.weight)
    assert torch.allclose(g[0], torch.relu(cam[0, 0]) / 25.0, atol=1e-6)
    assert torch.allclose(g[1], torch.relu(cam[1, 2]) / 25.0, atol=1e-6)


def test_gradcam_explainer_and_errors() -> None:
    m = Tiny(True)
    x = torch.randn(1, 1, 4, 4)
    maps = get_explainer("gradcam").explain(m(x), 0, model=m, inputs=x)
    assert maps["gradcam"].shape == (1, 4, 4) and maps["gradcam"].dtype == np.float32
    assert (maps["gradcam"] >= 0).all()
    with pytest.raises(ExplainError):
        get_explainer("gradcam").explain({}, 0)
    with pytest.raises(ExplainError):
        grad_cam(m, x, nn.Conv2d(1, 1, 1), 0)  # a layer the model never runs
    assert not m.conv._forward_hooks


def _classifiers():
    """Small instances of the registered classifiers (those with a ``head`` and one without)."""
    from cxrviewer.core.models import create_model, get_spec

    for name in ("cam_classifier", "msa", "dm", "lung_heart", "space_attention", "attention_gated"):
        torch.manual_seed(0)
        yield name, create_model(name, **dict(get_spec(name).test_kwargs), num_classes=5).eval().requires_grad_(False)


@pytest.mark.parametrize("name,model", list(_classifiers()))
def test_registry_gradcam_is_head_only_and_equals_the_forward_path(name, model) -> None:
    """The registry's Grad-CAM (``cxr-train evaluate --method gradcam``'s single-model form) takes the
    pipeline's head-only path: from the forward already run, no backbone pass, same maps."""
    from cxrviewer.core.explain.gradcam import head_gradcam

    torch.manual_seed(3)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
    ex = get_explainer("gradcam")
    calls: list[int] = []
    hook = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = {c: ex.explain(out, c, model=model, inputs=x)["gradcam"] for c in range(5)}
    finally:
        hook.remove()
    has_head = callable(getattr(model, "head", None))
    assert len(calls) == (0 if has_head else 5)  # head-only: no backbone forward at all
    for c in range(5):
        ref = grad_cam(model, x, model.feature_layer(), c).numpy()
        assert got[c].shape == ref.shape == (2, *out["features"].shape[-2:])
        np.testing.assert_allclose(got[c], ref, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(ref).max())))
    if has_head:
        both = head_gradcam(model, out, [4, 1]).numpy()
        np.testing.assert_allclose(both[:, 0], got[4], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(both[:, 1], got[1], rtol=1e-5, atol=1e-7)
    else:
        assert head_gradcam(model, out, [0]) is None


def test_batched_class_gradients_equal_one_backward_per_class() -> None:
    from cxrviewer.core.explain.gradcam import capture_activation, gradcam_from_activation

    torch.manual_seed(4)
    m = Tiny(True).eval().requires_grad_(False)
    x = torch.randn(2, 1, 6, 6)
    with capture_activation(m.conv) as store, torch.enable_grad():
        out = m(x)
    act = store["act"]
    both = gradcam_from_activation(out["logits"], act, [2, 0, 1])
    assert both.shape == (2, 3, 6, 6)
    for i, c in enumerate([2, 0, 1]):
        (g,) = torch.autograd.grad(out["logits"][:, c].sum(), act, retain_graph=True)
        ref = torch.relu((g.mean(dim=(-2, -1), keepdim=True) * act.detach()).sum(1))
        assert torch.allclose(both[:, i], ref, atol=1e-6)
    assert gradcam_from_activation(out["logits"], act, []).shape == (2, 0, 6, 6)


def test_head_gradcam_takes_features_of_a_bf16_forward() -> None:
    from cxrviewer.core.explain.gradcam import head_gradcam

    _, model = next(iter(_classifiers()))
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
    low = {**out, "features": out["features"].to(torch.bfloat16)}
    got = head_gradcam(model, low, [0, 1])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), head_gradcam(model, out, [0, 1]).numpy(), rtol=0.05,
                               atol=0.02 * float(got.abs().max()))
