"""Disease masks (disease-masks Eq. 3) and pseudo disease masks (Sec. 4.4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.classes import CLASSES, SYMMETRIC_CLASSES
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.disease_masks import (
    class_disease_mask,
    disease_masks_from_cams,
    normalize_maps,
    pseudo_disease_masks,
)


def test_normalize_maps_each_to_unit_range() -> None:
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    n = normalize_maps(m)
    assert torch.allclose(n[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))


def test_class_mask_by_hand() -> None:
    # two 1x4 CAMs; the hot spot is at the left edge in one and 2nd cell in the other
    cams = torch.tensor([[[4.0, 0.0, 0.0, 0.0]], [[0.0, 2.0, 0.0, 0.0]]])
    asym = class_disease_mask(cams, symmetric=False, threshold=0.5, binary=False)
    assert torch.allclose(asym, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    sym = class_disease_mask(cams, symmetric=True, threshold=0.5)
    assert torch.equal(sym, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # mirrored to the right lung


def test_flip_applies_to_exactly_the_seven_symmetric_classes() -> None:
    n, c, h, w = 3, len(CLASSES), 4, 6
    cams = torch.zeros(n, c, h, w)
    cams[:, :, :, 0] = 1.0  # every class hot at the left border only
    probs = torch.ones(n, c)
    psi, counts = disease_masks_from_cams(cams, probs)
    assert counts == [3] * c
    flipped = [CLASSES[k] for k in range(c) if psi[k, :, -1].eq(1).all()]
    assert sorted(flipped) == sorted(SYMMETRIC_CLASSES)
    assert len(flipped) == 7 and "Cardiomegaly" not in flipped and "Hernia" not in flipped
    assert psi[:, :, 0].eq(1).all()  # the original side is in every mask


def test_probability_filter_and_empty_class() -> None:
    cams = torch.zeros(2, 14, 2, 2)
    cams[0, 1, 0, 0] = 1.0  # image 0: hot top-left (kept, P=0.9)
    cams[1, 1, 1, 1] = 1.0  # image 1: hot bottom-right (dropped, P=0.5)
    probs = torch.zeros(2, 14)
    probs[0, 1], probs[1, 1] = 0.9, 0.5
    psi, counts = disease_masks_from_cams(cams, probs)
    assert counts[1] == 1 and counts[0] == 0
    assert torch.equal(psi[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(psi[0], torch.zeros(2, 2))  # no image passed: empty mask (f' = f)


def test_pseudo_disease_masks_from_anatomy() -> None:
    h, w = 20, 20
    left = np.zeros((h, w))
    right = np.zeros((h, w))
    heart = np.zeros((h, w))
    right[2:18, 2:8] = 1  # image-left = patient's right lung
    left[2:18, 12:18] = 1
    heart[10:16, 8:13] = 1
    pdm = pseudo_disease_masks(left, right, heart)
    assert pdm.shape == (14, h, w)
    lungs = (left + right) > 0
    for name in ("Infiltration", "Mass", "Nodule", "Pneumonia", "Atelectasis", "Pneumothorax"):
        assert np.array_equal(pdm[CLASSES.index(name)] > 0, lungs)
    assert np.array_equal(pdm[CLASSES.index("Cardiomegaly")] > 0, heart > 0)
    eff = pdm[CLASSES.index("Effusion")]
    assert eff[2:10].sum() == 0 and eff[10:18, 2:8].all() and eff[10:18, 12:18].all()


def test_disease_mask_explainer_needs_dm_model() -> None:
    class Dm(torch.nn.Module):
        family = "classifier"

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("disease_masks", torch.zeros(14, 2, 2))
            self.disease_masks[4, 0, 1] = 1.0

    ex = get_explainer("disease_mask")
    assert ex.applies_to(Dm()) and not ex.applies_to(torch.nn.Linear(1, 1))
    out = ex.explain({"cam": torch.zeros(3, 14, 4, 4)}, 4, model=Dm())["disease_mask"]
    assert out.shape == (3, 4, 4) and out[:, 0, -1].min() > 0.5 and out[:, -1, 0].max() == pytest.approx(0.0)
