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
