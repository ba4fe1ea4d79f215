"""Attention mining (iterative-attention-mining Eq. 1-3, 7-8) on hand-made feature maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.attention_mining import (
    attention_mining,
    erase_features,
    erasure_masks,
    erasure_step,
    masked_class_logits,
)


def _two_blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """One channel, 12x12: a strong blob (value 1.0) top-left, a weaker one (0.4) bottom-right."""
    x = torch.zeros(1, 1, 12, 12)
    x[0, 0, 1:4, 1:4] = 1.0
    x[0, 0, 8:11, 7:10] = 0.4
    w = torch.tensor([[1.0]])
    return x, w


def test_step_one_erases_the_stronger_blob_and_final_keeps_both() -> None:
    x, w = _two_blobs()
    res = attention_mining(x, w, 0, steps=3)
    assert res.steps == 3
    erased1 = res.erased[0][0]
    assert erased1[1:4, 1:4].eq(1).all()  # strong blob erased at t=1
    assert erased1[8:11, 7:10].eq(0).all()  # weak blob untouched at t=1
    assert int(erased1.sum()) == 9
    erased2 = res.erased[1][0]
    assert erased2[8:11, 7:10].eq(1).all()  # t=2 mines the weak blob (cumulative mask)
    assert erased2[1:4, 1:4].eq(1).all()
    # H_2 does not see the erased strong blob
    assert float(res.heatmaps[1][0, 1:4, 1:4].abs().max()) == 0.0
    hf = res.final[0]
    background = float(hf[5, 5])
    assert float(hf[1:4, 1:4].min()) > background + 0.5
    assert float(hf[8:11, 7:10].min()) > background + 0.2
    # with a single step the final map is H_1 itself, rescaled to [0, 1]
    one = attention_mining(x, w, 0, steps=1)
    h = one.heatmaps[0]
    assert torch.allclose(one.final, (h - h.min()) / (h.max() - h.min()))


def test_eq8_by_hand() -> None:
    """Eq. 8 on the per-step maps rescaled to [0, 1] over the cells kept at that step."""
    x, w = _two_blobs()
    res = attention_mining(x, w, 0, steps=2)
    h1, h2 = res.heatmaps[0], res.heatmaps[1]
    m1 = res.masks[0]
    n1 = (h1 - h1.min()) / (h1.max() - h1.min())  # all cells kept at t=1
    kept = m1 > 0.5
    lo, hi = h2[kept].min(), h2[kept].max()
    n2 = torch.where(kept, (h2 - lo) / (hi - lo), torch.zeros_like(h2))
    expected = 0.5 * (n1 + (n2 + n1 * (1 - m1)))
    assert torch.allclose(res.final, expected, atol=1e-6)


def test_mining_lifts_the_weaker_finding() -> None:
    """What mining is for: relative to the strong blob, the weak one is brighter in H_f than in H_1."""
    x, w = _two_blobs()
    res = attention_mining(x, w, 0, steps=3)
    h1, hf = res.heatmaps[0][0], res.final[0]
    ratio_h1 = float(h1[8:11, 7:10].max() / h1[1:4, 1:4].max())
    ratio_hf = float(hf[8:11, 7:10].max() / hf[1:4, 1:4].max())
    assert ratio_h1 == np.float32(0.4)
    assert ratio_hf > ratio_h1 + 0.3


def test_erasure_step_ignores_already_erased_cells_and_constant_maps() -> None:
    # as in Eq. 7, an erased cell's heat is 0; a kept negative cell ranks below it
    heat = np.array([[0.0, -1.0, -1.0], [-1.0, -1.0, 2.0], [-1.0, -1.0, 2.0]])
    keep = np.ones((3, 3), bool)
    keep[0, 0] = False
    new = erasure_step(heat, keep)
    assert not new[0, 0]  # stays erased
    assert not new[1, 2] and not new[2, 2]  # max over kept cells is the (1..2, 2) component
    assert new.sum() == 6
    assert erasure_step(np.ones((3, 3)), np.ones((3, 3), bool)).all()
    # every kept cell negative: the global max is the erased 0, the search stays on kept cells
    neg = np.array([[0.0, -2.0, -2.0], [-2.0, -2.0, -1.0], [-2.0, -2.0, -1.0]])
    out = erasure_step(neg, keep)
    assert not out[1, 2] and not out[2, 2] and out.sum() == 6


def test_training_erasure_is_class_specific_and_batched() -> None:
    x = torch.zeros(2, 2, 6, 6, requires_grad=False)
    x[:, 0, 0:2, 0:2] = 1.0  # channel 0 lives top-left
    x[:, 1, 4:6, 4:6] = 1.0  # channel 1 lives bottom-right
    w = torch.eye(2)  # class c reads channel c
    x.requires_grad_(True)
    erased, mask = erase_features(x, w, torch.tensor([0, 1]))
    assert mask.shape == (2, 6, 6)
    assert mask[0, 0:2, 0:2].eq(0).all() and mask[0, 4:6, 4:6].eq(1).all()
    assert mask[1, 4:6, 4:6].eq(0).all() and mask[1, 0:2, 0:2].eq(1).all()
    assert float(erased[0, 0].detach().abs().sum()) == 0.0 and float(erased[1, 1].detach().abs().sum()) == 0.0
    erased.sum().backward()
    assert x.grad is not None and float(x.grad[0, 0, 0, 0]) == 0.0 and float(x.grad[0, 0, 3, 3]) == 1.0
    all_masks = erasure_masks(x, w)
    assert all_masks.shape == (2, 2, 6, 6)
    assert torch.equal(all_masks[0, 0], mask[0]) and torch.equal(all_masks[1, 1], mask[1])


def test_masked_class_logits_equal_gap_of_erased_features() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(3, 4)
    b = torch.randn(3)
    masks = (torch.rand(2, 3, 5, 5) > 0.3).float()
    got = masked_class_logits(x, w, b, masks)
    for i in range(2):
        for c in range(3):
            ref = (x[i] * masks[i, c]).mean(dim=(1, 2)) @ w[c] + b[c]
            assert torch.allclose(got[i, c], ref, atol=1e-5)


def test_explainer_returns_named_step_maps() -> None:
    x, w = _two_blobs()
    maps = get_explainer("attention_mining").explain({"features": x}, 0, weight=w)
    assert set(maps) == {"final", "step1", "step2", "step3", "erased1", "erased2", "erased3"}
    assert maps["final"].shape == (1, 12, 12)
    assert maps["erased1"][0, 2, 2] == 1.0


def _reference_mining(x: torch.Tensor, w: torch.Tensor, c: int, steps: int):
    """The previous implementation: Eq. 7 on the erased feature map ``(X * M_{t-1}) . w^c`` each step."""
    keep = torch.ones(x.shape[0], *x.shape[-2:])
    heat, masks = [], []
    for _ in range(steps):
        ht = torch.einsum("bkhw,k->bhw", x * keep.unsqueeze(1), w[c])
        keep = torch.from_numpy(np.stack([erasure_step(ht[i].numpy(), keep[i].numpy() > 0.5)
                                          for i in range(x.shape[0])]).astype(np.float32))
        heat.append(ht)
        masks.append(keep)
    return heat, masks


def test_mining_from_the_class_map_equals_mining_the_erased_features() -> None:
    """Eq. 7 is linear in X: H_t = M_{t-1} * H_1, so every class's steps come from one X . W einsum."""
    from cxrviewer.core.explain.attention_mining import mine_cam

    torch.manual_seed(5)
    x = torch.relu(torch.randn(2, 16, 10, 12))
    w = torch.randn(4, 16)
    for c in range(4):
        heat, masks = _reference_mining(x, w, c, 3)
        res = attention_mining(x, w, c, steps=3)
        from_cam = mine_cam(torch.einsum("bkhw,k->bhw", x, w[c]), steps=3)
        for got in (res, from_cam):
            for t in range(3):
                assert torch.equal(got.masks[t], masks[t])  # the same cells erased at every step
                assert torch.allclose(got.heatmaps[t], heat[t], atol=1e-5)
        assert torch.allclose(res.final, from_cam.final, atol=1e-6)
    with pytest.raises(ValueError):
        mine_cam(torch.zeros(3, 3), steps=0)
