"""CAM (disease-masks Eq. 1-2) on hand-made tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.cam import cam_probability, class_activation_maps, upsample_maps


def test_cam_is_weighted_sum_of_feature_maps() -> None:
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f[0, 1] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 10.0], [-1.0, 0.0]])
    cam = class_activation_maps(f, w)
    assert cam.shape == (1, 2, 2, 2)
    assert torch.allclose(cam[0, 0], torch.tensor([[1.0, 12.0], [3.0, 14.0]]))
    assert torch.allclose(cam[0, 1], -f[0, 0])


def test_bias_makes_pooled_cam_equal_the_gap_linear_logit() -> None:
    torch.manual_seed(0)
    f = torch.randn(3, 5, 4, 4)
    w = torch.randn(7, 5)
    b = torch.randn(7)
    logits = f.mean(dim=(2, 3)) @ w.T + b
    cam = class_activation_maps(f, w, b)
    assert torch.allclose(cam_probability(cam), torch.sigmoid(logits), atol=1e-6)
    # the printed formula (sum) differs by the factor h*w inside the sigmoid
    assert torch.allclose(cam_probability(cam, pooling="sum"), torch.sigmoid(16 * cam.mean(dim=(2, 3))), atol=1e-6)


def test_cam_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        class_activation_maps(torch.zeros(1, 3, 2, 2), torch.zeros(2, 4))


def test_upsample_keeps_raw_values() -> None:
    m = torch.tensor([[[-3.0, 5.0], [1.0, 7.0]]])
    up = upsample_maps(m, (8, 8))
    assert up.shape == (1, 8, 8)
    assert float(up.min()) == pytest.approx(-3.0)  # corners keep the raw extremes, no [0,1] rescale
    assert float(up.max()) == pytest.approx(7.0)
    assert upsample_maps(np.ones((2, 2), np.float32), (4, 6)).shape == (4, 6)


class _Fake(torch.nn.Module):
    family = "classifier"

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))

    def cam_weights(self):
        return self.w, None


def test_cam_explainer_uses_output_cam_or_features() -> None:
    feats = torch.arange(8.0).view(1, 2, 2, 2)
    cam = class_activation_maps(feats, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    ex = get_explainer("cam")
    a = ex.explain({"cam": cam, "features": feats}, 1)["cam"]
    b = ex.explain({"features": feats}, 1, model=_Fake())["cam"]
    assert a.shape == (1, 2, 2) and a.dtype == np.float32
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a[0], 2 * feats[0, 1].numpy())
