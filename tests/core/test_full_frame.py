"""The models' frame is the whole registered chest (cxrviewer/core/canonical.py ``full_frame_theta``).

The alignment network and its NCC check work on the canonical lung crop; the classifier, DM and
CIA networks see the crop's full-frame extent (docs/field-of-view.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.canonical import (canonical_crop_box, crop_in_frame, crop_theta, default_canonical_path,
                                      full_frame_theta, full_to_crop_theta, model_frame_box)
from cxrviewer.core.explain.alignment import align_for_models
from cxrviewer.core.models.alignment import affine_matrix, invert_affine, raw_from_params, warp
from cxrviewer.core.pipeline import Pipeline
from cxrviewer.core.registration import compose

BOX = (0.18, 0.11, 0.81, 0.70)


def _apply(theta: torch.Tensor, u: float, v: float) -> tuple[float, float]:
    a = theta.double()[0]
    return float(a[0, 0] * u + a[0, 1] * v + a[0, 2]), float(a[1, 0] * u + a[1, 1] * v + a[1, 2])


def test_crop_corner_is_the_crop_box_fraction_of_the_full_frame():
    x0, y0, x1, y1 = BOX
    # the crop's top-left / bottom-right corners (-1, -1), (1, 1) sit at the box fractions of the full frame
    assert _apply(crop_theta(BOX), -1, -1) == pytest.approx((2 * x0 - 1, 2 * y0 - 1))
    assert _apply(crop_theta(BOX), 1, 1) == pytest.approx((2 * x1 - 1, 2 * y1 - 1))
    # and the map full -> crop (u_crop = u_full / w + (1 - x0 - x1) / w) sends them back
    assert _apply(full_to_crop_theta(BOX), 2 * x0 - 1, 2 * y0 - 1) == pytest.approx((-1, -1))
    assert _apply(full_to_crop_theta(BOX), 2 * x1 - 1, 2 * y1 - 1) == pytest.approx((1, 1))
    eye = compose(crop_theta(BOX).double(), full_to_crop_theta(BOX))
    np.testing.assert_allclose(eye[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_crop_in_frame_places_the_crop_in_a_wider_frame():
    frame = (-0.125, -0.05, 1.125, 1.375)
    theta_crop = affine_matrix(torch.tensor([[0.7, 0.65, 0.05, -0.08, 0.1]]))
    # the models' frame = the full frame widened: the same as composing with crop_theta(frame)
    wide = full_frame_theta(theta_crop, crop_in_frame(BOX, frame))
    np.testing.assert_allclose(wide.numpy(), compose(full_frame_theta(theta_crop, BOX), crop_theta(frame)).numpy(),
                               atol=1e-6)
    assert crop_in_frame(BOX, (0, 0, 1, 1)) == pytest.approx(BOX)


def test_full_frame_contains_the_lung_crop_and_maps_back():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((1, 1, 96, 96)).astype(np.float32))
    img = torch.nn.functional.avg_pool2d(img, 5, 1, 2)  # smooth: bilinear resampling stays exact enough
    theta_crop = affine_matrix(torch.tensor([[0.7, 0.65, 0.05, -0.08, 0.1]]))
    theta_full = full_frame_theta(theta_crop, BOX)
    assert full_frame_theta(theta_crop, None) is theta_crop
    # cropping the full frame at the box gives the lung crop the alignment network defines
    via_full = warp(warp(img, theta_full, out_size=192), crop_theta(BOX), out_size=64)
    direct = warp(img, theta_crop, out_size=64)
    assert float((via_full - direct).abs().mean()) < 0.01
    # map-back round trip: original point -> aligned frame -> original
    inv = invert_affine(theta_full.double())
    for p in ((0.3, -0.2), (-0.6, 0.7)):
        q = _apply(inv, *p)
        assert _apply(theta_full, *q) == pytest.approx(p, abs=1e-9)


@pytest.fixture(scope="module")
def whole_chest_run(tmp_path_factory):
    """Alignment (naming the canonical chest; its network says "this image is the registered frame")
    + classifier, DM and CIA; the inputs each network saw."""
    from training.commands.init_bundle import init_bundle

    path = default_canonical_path()
    box = canonical_crop_box(path) if path.is_file() else None
    if box is None:
        pytest.skip("resources/canonical_chest.png/.json are absent")
    folder = tmp_path_factory.mktemp("bundles")
    paths = make_tiny_bundles(folder, roles=("classifier", "dm", "cia"))
    align = load_bundle(init_bundle("alignment", folder / "alignment", kwargs={"backbone": "tiny"}, input_size=64,
                                    canonical=path))
    x0, y0, x1, y1 = box
    with torch.no_grad():
        align.model.fc.weight.zero_()
        align.model.fc.bias.copy_(raw_from_params(torch.tensor([[x1 - x0, y1 - y0, x0 + x1 - 1, y0 + y1 - 1, 0.0]]))[0])
    bundles = {"alignment": align, **{r: load_bundle(p) for r, p in paths.items()}}
    pl = Pipeline(bundles, "cpu", map_max_side=64, frame_max_side=128,
                  methods=("alignment", "cam", "disease_mask", "contrast"),
                  options={"align_refine": False, "align_min_quality": -1.0})
    seen: dict[str, torch.Tensor] = {}
    def hook(role: str):
        def fn(module, args) -> None:
            seen.setdefault(role, args[0].detach().clone())
        return fn

    for role in ("classifier", "dm", "cia"):
        pl.bundles[role].model.register_forward_pre_hook(hook(role))
    study = synthetic_study(128, 128)
    res = pl.run(study)
    res.__dict__["_bundles_for_test"] = align
    return res, seen, study, box


def test_classifier_dm_and_cia_see_the_whole_chest(whole_chest_run):
    res, seen, study, box = whole_chest_run
    assert res.attr("alignment", "rejected") is False and res.attr("alignment", "frame") == "full"
    # the network placed the lung crop at the canonical box, i.e. the image IS the registered full frame:
    # the models' frame is that frame widened by model_frame, so the whole image, lung bases and
    # costophrenic angles (below the crop's y1 = 0.70) included, lies inside it
    frame_box = model_frame_box(default_canonical_path())
    np.testing.assert_allclose(res.get("alignment", "affine"), crop_theta(frame_box)[0].numpy(), atol=1e-5)
    assert res.get("alignment", "valid").all()
    frame = torch.from_numpy(study.model_input)[None, None]
    for role, x in seen.items():
        x01 = (x.float() + 1) / 2  # minus1_1 inputs
        want = warp(frame, crop_theta(frame_box), out_size=tuple(x.shape[-2:])).clamp(0, 1)
        assert float((x01 - want).abs().mean()) < 0.02, role
        # the image's bottom rows (below the lung crop) are in the input, at their full-frame place
        h = x.shape[-2]
        fx0, fy0, fx1, fy1 = frame_box
        rows = slice(int((box[3] - fy0) / (fy1 - fy0) * h) + 2, int((1 - fy0) / (fy1 - fy0) * h) - 2)
        cols = slice(int(-fx0 / (fx1 - fx0) * h) + 2, int((1 - fx0) / (fx1 - fx0) * h) - 2)
        assert float(x01[..., rows, cols].mean()) > 0.3, role  # image content, not the black fill
        assert float((x01[..., rows, cols] - want[..., rows, cols]).abs().max()) < 0.15, role


def test_align_for_models_is_the_explainers_step(whole_chest_run):
    res, _, study, box = whole_chest_run
    theta_crop = torch.from_numpy(res.get("alignment", "crop_affine"))[None]
    in_frame = crop_in_frame(box, model_frame_box(default_canonical_path()))
    np.testing.assert_allclose(full_frame_theta(theta_crop, in_frame)[0].numpy(), res.get("alignment", "affine"),
                               atol=1e-6)
    align = whole_chest_run[0].__dict__.get("_bundles_for_test")
    assert align is not None
    frame = torch.from_numpy(study.model_input)[None, None]
    theta_full, check = align_for_models(frame, align, refine=False, min_quality=-1.0)
    assert check.crop_box == pytest.approx(in_frame) and not check.rejected
    np.testing.assert_allclose(theta_full[0].numpy(), res.get("alignment", "affine"), atol=1e-5)
