"""Every registered explainer on every registered model it applies to (registry-parametrised).

Uses the small ``test_kwargs`` instances of ``cxrviewer.core.models``; skips cleanly if the
models package cannot be imported.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.explain import get_explainer, list_explainers
from cxrviewer.core.explain.cam import class_activation_maps

models = pytest.importorskip("cxrviewer.core.models")

SPECS = [s for s in models.list_models() if s.family in ("classifier", "cia")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_explainers_on_registered_models(spec) -> None:
    torch.manual_seed(0)
    model = models.create_model(spec.name, **spec.test_kwargs).eval()
    inputs = spec.example_inputs(batch=2, size=64)
    with torch.no_grad():
        out = model(*inputs)
    ran = []
    for name in list_explainers():
        ex = get_explainer(name)
        if not ex.applies_to(model):
            continue
        maps = ex.explain(out, 1, model=model, inputs=inputs)
        assert maps, name
        for key, arr in maps.items():
            if key == "pair_index":
                continue
            assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[0] == 2, (name, key, arr.shape)
            assert np.isfinite(arr).all(), (name, key)
        ran.append(name)
    expected = {"cia": {"contrast"}, "classifier": {"cam", "attention_mining", "gradcam"}}[spec.family]
    assert expected <= set(ran)


def test_baseline_cam_output_matches_features_times_weights() -> None:
    """Contract: cam[:, c] = sum_k W[c,k] features[:, k] for the plain CAM classifier."""
    spec = models.get_spec("cam_classifier")
    model = models.create_model("cam_classifier", **spec.test_kwargs).eval()
    with torch.no_grad():
        out = model(*spec.example_inputs(batch=2, size=64))
    w, _ = model.cam_weights()
    assert torch.allclose(out["cam"], class_activation_maps(out["features"], w), atol=1e-5)


def test_pair_and_contrast_with_the_cia_model() -> None:
    from cxrviewer.core.explain.contrast import pair_and_contrast

    spec = models.get_spec("cia")
    model = models.create_model("cia", **spec.test_kwargs).eval()
    x_pos, _ = spec.example_inputs(batch=2, size=64)
    bank = torch.rand(5, 1, 64, 64) * 2 - 1
    bank[3] = x_pos[0]  # an identical normal image must be chosen as the pair
    res = pair_and_contrast(model, x_pos, bank)
    assert res.pair_index[0] == 3
    h, w = res.attention.shape[-2:]
    assert res.attention.flatten(1).sum(dim=1).allclose(torch.full((2,), float(h * w)), rtol=1e-3)


def test_attention_mining_step1_is_the_dm_models_cam() -> None:
    """For a DM model H_1 must be its attention-guided CAM (disease-masks Eq. 5), via 1 + psi_c."""
    spec = models.get_spec("dm")
    model = models.create_model("dm", **spec.test_kwargs).eval()
    psi = torch.rand(model.disease_masks.shape)
    model.set_disease_masks(psi)
    with torch.no_grad():
        out = model(*spec.example_inputs(batch=2, size=64))
    maps = get_explainer("attention_mining").explain(out, 2, model=model)
    np.testing.assert_allclose(maps["step1"], out["cam"][:, 2].numpy(), rtol=1e-4, atol=1e-5)
    dm = get_explainer("disease_mask").explain(out, 2, model=model)["disease_mask"]
    assert dm.shape == tuple(out["cam"][:, 2].shape)
