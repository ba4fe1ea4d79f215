"""Classical NCC registration (cxrviewer/core/registration.py) and the pipeline's alignment check."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.canonical import (canonical_crop_box, crop_in_frame, default_canonical_path, full_frame_theta,
                                      load_canonical, model_frame_box)
from cxrviewer.core.explain.alignment import MIN_QUALITY, check_alignment
from cxrviewer.core.models.alignment import affine_matrix, invert_affine, raw_from_params, warp
from cxrviewer.core.pipeline import Pipeline
from cxrviewer.core.registration import (affine_params, alignment_quality, compose, decompose, ncc,
                                         refine_affine)
from cxrviewer.core.study import Study, StudyMeta

EYE = affine_matrix(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def canonical() -> torch.Tensor:
    path = default_canonical_path()
    if not path.is_file():
        pytest.skip("resources/canonical_chest.png is absent")
    return load_canonical(path)


def _blobs(size: int = 64) -> torch.Tensor:
    """A smooth asymmetric chest-like image [1, 1, S, S] in [0, 1] (two dark lobes)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 0.8 - 0.5 * torch.exp(-(((xx + 0.4) / 0.22) ** 2 + ((yy + 0.05) / 0.45) ** 2))
    img = img - 0.45 * torch.exp(-(((xx - 0.38) / 0.2) ** 2 + ((yy + 0.1) / 0.4) ** 2))
    img = img + 0.15 * torch.exp(-(((xx - 0.1) / 0.15) ** 2 + ((yy - 0.55) / 0.12) ** 2))
    return img.clamp(0, 1)[None, None]


def _error(theta: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Rotation (deg) and shift (% of the size) between two affines."""
    d = decompose(compose(invert_affine(truth), theta))
    return float(d["rotation_deg"].abs()[0]), float(torch.hypot(d["tx"], d["ty"])[0] * 50)


def test_ncc_mask_ignores_pixels_outside():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 16, 16, generator=g)
    b = a.clone()
    b[..., :, 8:] = torch.rand(1, 1, 16, 8, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1
    assert float(ncc(a, b)) < 0.9
    assert float(ncc(a, b, mask=mask)) == pytest.approx(1.0, abs=1e-5)


def test_refine_recovers_a_known_small_affine_better_than_the_start():
    torch.manual_seed(0)
    fixed = _blobs(96)
    truth = affine_matrix(torch.tensor([[1.05, 1.05, 0.06, -0.04, math.radians(4)]]))
    moving = warp(fixed, invert_affine(truth), padding_mode="border")  # warp(moving, truth) ~ fixed
    theta, q = refine_affine(moving, fixed, EYE, time_budget_s=None)
    rot0, shift0 = _error(EYE, truth)
    rot, shift = _error(theta, truth)
    assert rot < 0.5 * rot0 and rot < 1.0, (rot, rot0)
    assert shift < 0.5 * shift0, (shift, shift0)
    assert float(q[0]) > float(alignment_quality(moving, fixed, EYE)[0])
    again, _ = refine_affine(moving, fixed, EYE, time_budget_s=None)
    assert torch.equal(theta, again)  # deterministic


def test_refinement_stays_within_its_trust_region_and_never_scores_worse():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(1, 1, 64, 64, generator=g)
    theta, q = refine_affine(noise, _blobs(64), EYE, time_budget_s=None)
    p = affine_params(theta)[0]
    assert abs(math.degrees(float(p[4]))) <= 8.0 + 1e-3 and float(p[2:4].abs().max()) <= 0.16 + 1e-4
    assert float(q[0]) >= float(alignment_quality(noise, _blobs(64), EYE)[0]) - 1e-6


def test_quality_high_when_aligned_low_for_noise_and_a_90_degree_rotation(canonical):
    good = check_alignment(canonical, canonical, EYE)
    assert good.quality > 0.95 and not good.rejected
    noise = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(2))
    bad = check_alignment(noise, canonical, EYE)
    assert bad.quality < MIN_QUALITY and bad.rejected
    turned = check_alignment(torch.rot90(canonical, 1, (2, 3)), canonical, EYE)
    assert turned.network_quality < MIN_QUALITY and turned.quality < MIN_QUALITY and turned.rejected
    assert "alignment rejected: NCC" in bad.notice() and "maps use the unaligned image" in bad.notice()


def test_real_nih_images_pass_the_check(nih_dir: Path, canonical):
    """A few real radiographs, aligned by the bundled network, score above the threshold."""
    from PIL import Image

    bundle = Path(__file__).resolve().parents[2] / "resources" / "models" / "alignment.cxrbundle"
    if not bundle.is_dir():
        pytest.skip("the bundled alignment network is absent")
    model = load_bundle(bundle).model.float().eval()
    for name in sorted(p.name for p in (nih_dir / "images").iterdir())[:3]:
        with Image.open(nih_dir / "images" / name) as im:
            x = torch.from_numpy(np.asarray(im.convert("L").resize((256, 256)), np.float32) / 255)[None, None]
        with torch.no_grad():
            theta = model(x * 2 - 1)["theta"]
        check = check_alignment(x, canonical, theta)
        assert not check.rejected and check.quality >= check.network_quality, (name, check.attrs())


# ---- the pipeline's alignment step -------------------------------------------------------------
def _study(img: np.ndarray, sid: str) -> Study:
    stored = (np.clip(img, 0, 1) * 4095).astype(np.uint16)
    return Study(stored=stored, modality=stored.astype(np.float32), model_input=img.astype(np.float32),
                 window=(2048.0, 4096.0), invert_display=False, meta=StudyMeta(source_path=sid, format="png"),
                 study_id=sid)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, canonical):
    """Alignment (naming the canonical chest, its affine pushed off the identity) + classifier."""
    from training.commands.init_bundle import init_bundle

    folder = tmp_path_factory.mktemp("bundles")
    paths = make_tiny_bundles(folder, roles=("classifier",))
    align = load_bundle(init_bundle("alignment", folder / "alignment", kwargs={"backbone": "tiny"}, input_size=128,
                                    canonical=default_canonical_path()))
    with torch.no_grad():
        align.model.fc.bias.copy_(raw_from_params(torch.tensor([[0.9, 0.9, 0.04, 0.0, 0.1]]))[0])
    pl = Pipeline({"alignment": align, "classifier": load_bundle(paths["classifier"])}, "cpu", map_max_side=64,
                  frame_max_side=128, methods=("alignment", "cam"))
    seen: list[torch.Tensor] = []
    pl.bundles["classifier"].model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return pl, seen


def _run(pipeline, study: Study, **options):
    pl, seen = pipeline
    seen.clear()
    saved = dict(pl.options)
    pl.options.update(options)
    try:
        res = pl.run(study)
    finally:
        pl.options.clear()
        pl.options.update(saved)
    return res, seen[0]


def test_rejected_alignment_leaves_later_maps_unaligned_and_says_so(pipeline):
    noise = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    res, seen = _run(pipeline, _study(noise, "noise"))
    assert res.attr("alignment", "rejected") is True and res.attr("alignment", "quality") < MIN_QUALITY
    assert any(n.startswith("alignment rejected: NCC") and "unaligned image" in n for n in res.notices)
    assert res.get("alignment", "valid").all() and res.get("alignment", "network_affine").shape == (2, 3)
    accepted, seen_aligned = _run(pipeline, _study(noise, "noise"), align_min_quality=-1.0)
    assert accepted.attr("alignment", "rejected") is False and not accepted.notices
    # the classifier saw the unaligned frame when rejected, the warped one when accepted
    frame = torch.from_numpy(noise)[None, None]
    aligned = warp(frame, torch.from_numpy(accepted.get("alignment", "affine"))[None].float()).clamp(0, 1)
    unaligned_in, aligned_in = (seen + 1) / 2, (seen_aligned + 1) / 2  # classifier input is minus1_1
    assert float((unaligned_in - frame).abs().mean()) < 0.02
    assert float((aligned_in - aligned).abs().mean()) < 0.02
    assert float((aligned_in - unaligned_in).abs().mean()) > 0.1


def test_a_chest_passes_and_refinement_is_optional(pipeline, canonical):
    chest = canonical[0, 0].numpy()
    res, _ = _run(pipeline, _study(chest, "chest"))
    assert res.attr("alignment", "rejected") is False and res.attr("alignment", "refined") is True
    assert res.attr("alignment", "quality") >= max(MIN_QUALITY, res.attr("alignment", "network_quality"))
    assert not res.notices and "NCC" in pipeline[0].explainers[0].caption(res, None, None)
    plain, _ = _run(pipeline, _study(chest, "chest"), align_refine=False)
    assert plain.attr("alignment", "refined") is False
    np.testing.assert_allclose(plain.get("alignment", "crop_affine"), plain.get("alignment", "network_affine"),
                               atol=1e-6)
    # the later networks see the whole registered chest: the checked lung-crop affine composed onto the full frame
    box = crop_in_frame(canonical_crop_box(default_canonical_path()), model_frame_box(default_canonical_path()))
    full = full_frame_theta(torch.from_numpy(plain.get("alignment", "network_affine"))[None], box)
    np.testing.assert_allclose(plain.get("alignment", "affine"), full[0].numpy(), atol=1e-6)
    assert plain.attr("alignment", "frame") == "full"
