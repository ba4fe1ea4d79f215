"""Contrast-induced attention (cia-net Eq. 3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.contrast import apply_contrast, contrast_attention


def test_contrast_sums_to_w_times_h_and_is_abs_difference() -> None:
    torch.manual_seed(0)
    mp = torch.rand(3, 1, 16, 16)
    mn = torch.rand(3, 1, 16, 16)
    dm = contrast_attention(mp, mn)
    assert dm.shape == (3, 1, 16, 16)
    sums = dm.flatten(1).sum(dim=1)
    assert torch.allclose(sums, torch.full((3,), 256.0), atol=1e-3)
    # proportional to |M+ - M-|
    d = (mp - mn).abs()
    ratio = dm / d
    assert torch.allclose(ratio[0], ratio[0].flatten()[0].expand_as(ratio[0]), rtol=1e-4)


def test_contrast_by_hand_and_degenerate_pair() -> None:
    mp = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mn = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    dm = contrast_attention(mp, mn)
    assert torch.allclose(dm, torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]))  # |d| = (1,0,0,1), sum 2 -> x 4/2
    same = contrast_attention(mp, mp)
    assert torch.equal(same, torch.ones_like(mp))
    f = torch.ones(1, 3, 2, 2)
    assert torch.allclose(apply_contrast(f, dm)[0, 2], dm[0])


def test_contrast_explainer_maps_and_pair_index() -> None:
    att = contrast_attention(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))
    out = {"attention": att, "grid_probs": torch.rand(2, 14, 4, 4)}
    ex = get_explainer("contrast")
    assert ex.families == ("cia",)
    maps = ex.explain(out, 3, pair_index=[7, 2])
    assert maps["contrast"].shape == (2, 4, 4)
    assert maps["contrast"].sum(axis=(1, 2)) == pytest.approx([16.0, 16.0], rel=1e-4)
    np.testing.assert_allclose(maps["grid"], out["grid_probs"][:, 3].numpy())
    assert maps["pair_index"].tolist() == [7, 2]
