"""Training losses against hand-computed numbers on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrviewer.core.explain.boxes import box_to_grid
from cxrviewer.core.geometry import Box
from training.losses import (
    alignment_loss,
    alignment_loss_terms,
    am_classification_loss,
    attention_mining_loss,
    blur_grid,
    cia_loss,
    knowledge_preservation_loss,
    weighted_bce,
)

LN2 = math.log(2.0)


def test_weighted_bce_eq10_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [-math.log(3.0), 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # |P| = 1, |N| = 3: w_P = 4, w_N = 4/3
    expected = 4 * LN2 + 4 / 3 * (math.log(4.0) + math.log(4 / 3) + LN2)
    assert float(weighted_bce(logits, y, reduction="sum")) == pytest.approx(expected, rel=1e-6)
    assert float(weighted_bce(logits, y)) == pytest.approx(expected / 4, rel=1e-6)


def test_weighted_bce_all_negative_batch_and_gradient() -> None:
    z = torch.zeros(2, 3, requires_grad=True)
    loss = weighted_bce(z, torch.zeros(2, 3), reduction="sum")
    assert float(loss.detach()) == pytest.approx(6 * LN2)  # w_N = 1, no positive term
    loss.backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        weighted_bce(z, torch.zeros(2, 3), reduction="none")  # type: ignore[arg-type]


def test_knowledge_preservation_by_hand() -> None:
    a1 = torch.stack([torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2)])  # GAP (1, 3)
    b1 = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]).requires_grad_(True)  # GAP (1, 0)
    a2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # logits
    b2 = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    loss = knowledge_preservation_loss([a1, a2], [b1, b2])
    # L^1 = ||(0, 3)|| / 2 = 1.5 ; L^2 = ||(0,0,0,4)|| / 2 = 2 ; mean = 1.75
    assert float(loss.detach()) == pytest.approx(1.75)
    loss.backward()
    assert b1.grad is not None and b2.grad is not None
    total = attention_mining_loss(torch.tensor(1.0), loss.detach())
    assert float(total) == pytest.approx(1.0 + 0.5 * 1.75)
    with pytest.raises(ValueError):
        knowledge_preservation_loss([a1], [b2])


def test_am_classification_loss_is_mean_bce() -> None:
    z = torch.tensor([[0.0, 0.0]])
    assert float(am_classification_loss(z, torch.tensor([[1.0, 0.0]]))) == pytest.approx(LN2)


def test_cia_loss_eq4_6_by_hand() -> None:
    z = torch.zeros(2, 2, 2, 2)  # every cell p = 0.5
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    grid = torch.zeros(2, 2, 2, 2)
    grid[0, 0] = torch.from_numpy(box_to_grid(Box("Atelectasis", 0, 0, 4, 4), (8, 8), (2, 2)))
    has_box = torch.tensor([[True, False], [False, False]])
    box_term = 4 * LN2  # Eq. 4: sum of 4 cell BCEs at p = 0.5
    mil_pos = -math.log(1 - 0.5**4)  # Eq. 5, y = 1
    mil_neg = 4 * LN2  # Eq. 5, y = 0: -log prod (1 - p)
    expected = 5.0 * box_term + mil_neg + mil_pos + mil_neg
    got = cia_loss(z, img, grid, has_box, beta_b=5.0, reduction="sum")
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(cia_loss(z, img, grid, has_box, beta_b=5.0)) == pytest.approx(expected / 4, rel=1e-6)
    # without box annotations everything is MIL
    mil_only = cia_loss(z, img, reduction="sum")
    assert float(mil_only) == pytest.approx(2 * mil_pos + 2 * mil_neg, rel=1e-6)


def test_cia_mil_is_stable_for_confident_grids() -> None:
    z = torch.full((1, 1, 16, 16), -50.0, requires_grad=True)
    loss = cia_loss(z, torch.ones(1, 1), reduction="sum")
    # 1 - prod(1 - p) ~ sum p = 256 sigmoid(-50)
    assert float(loss.detach()) == pytest.approx(-math.log(256) + 50.0, rel=1e-4)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    z2 = torch.full((1, 1, 16, 16), 30.0)
    assert math.isfinite(float(cia_loss(z2, torch.zeros(1, 1))))


def test_blur_grid_is_16x16_average_then_bilinear() -> None:
    x = torch.zeros(1, 1, 16, 32)
    x[..., :8] = 1.0  # left half of the first 16x16 block
    y = blur_grid(x)
    assert y.shape == x.shape
    assert torch.allclose(blur_grid(torch.full((1, 1, 16, 16), 0.25)), torch.full((1, 1, 16, 16), 0.25))
    assert float(y[0, 0, 0, 0]) == pytest.approx(0.5)  # block 1 averages to 0.5, block 2 to 0


def test_alignment_loss_eq6_9_by_hand() -> None:
    anchor = torch.ones(1, 1, 16, 16)
    warped = torch.zeros(1, 1, 16, 16)
    warped[..., 8:] = 1.0  # B(G(warped)) = 0.5 everywhere

    def feats(x: torch.Tensor) -> list[torch.Tensor]:
        return [x, 2 * F.avg_pool2d(x, 2)]

    t = alignment_loss_terms(anchor, warped, feats, reduction="sum")
    assert float(t["euclidean"]) == pytest.approx(256 * 0.5)  # Eq. 8
    # Eq. 7: ||1 - 0.5|| over 256 cells / 256  +  ||2 - 1|| over 64 cells / 64
    assert float(t["perceptual"]) == pytest.approx(8 / 256 + 8 / 64)
    assert float(t["loss"]) == pytest.approx(128 + 8 / 256 + 8 / 64)
    mean = alignment_loss(anchor, warped, feats)
    assert float(mean) == pytest.approx((128 + 8 / 256 + 8 / 64) / 256)


def test_alignment_euclidean_is_per_pixel_norm_over_channels_and_grad_safe() -> None:
    anchor = torch.zeros(1, 2, 2, 2)
    warped = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 4.0)])[None]
    assert float(alignment_loss(anchor, warped, kernel=1, reduction="sum")) == pytest.approx(4 * 5.0)
    w = torch.ones(2, 1, 32, 32, requires_grad=True)
    loss = alignment_loss(torch.ones(1, 1, 32, 32), w)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(w.grad).all()
