"""Alignment module (CIA-Net M4): affine algebra, canonical chest builder, learning on phantoms."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cxrviewer.core.models.alignment import affine_matrix, invert_affine, warp
from training.canonical import (build_canonical, compose, crop_theta, decompose, lung_bounds, ncc,
                                register_affine, sharpness)
from training.trainers.align import (affine_errors, phantom_pose, random_affines, recovered_perturbation)


def _blobs(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth asymmetric test image [1, 1, S, S] in [0, 1] (chest-like: two dark lobes)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 0.8 - 0.5 * torch.exp(-(((xx + 0.4) / 0.22) ** 2 + ((yy + 0.05) / 0.45) ** 2))
    img = img - 0.45 * torch.exp(-(((xx - 0.38) / 0.2) ** 2 + ((yy + 0.1) / 0.4) ** 2))
    img = img + 0.15 * torch.exp(-(((xx - 0.1) / 0.15) ** 2 + ((yy - 0.55) / 0.12) ** 2))
    img = img * (1 - 0.3 * (yy < -0.7).float())
    return img.clamp(0, 1)[None, None]


def test_compose_matches_two_warps():
    torch.manual_seed(0)
    img = _blobs(64)
    r1 = affine_matrix(torch.tensor([[1.0, 1.0, 0.3, 0.0, 0.0]]))  # shift
    r2 = affine_matrix(torch.tensor([[0.9, 0.9, 0.0, 0.1, math.radians(30)]]))  # rotation + zoom
    two = warp(warp(img, r1), r2)
    one = warp(img, compose(r1, r2))
    inner = (slice(None), slice(None), slice(16, 48), slice(16, 48))
    assert torch.allclose(two[inner], one[inner], atol=0.03)
    # and the wrong order is measurably different
    assert (warp(img, compose(r2, r1))[inner] - two[inner]).abs().max() > 0.05


def test_consistency_recovers_perturbation_exactly():
    """If T(I_R) = R^-1 T(I) then R_hat = T(I) T(I_R)^-1 equals R (the benchmark's definition)."""
    t = affine_matrix(torch.tensor([[0.7, 0.6, 0.05, -0.1, 0.05]] * 4))
    r = random_affines(4, rotation_deg=10, generator=torch.Generator().manual_seed(1))
    t_pert = compose(invert_affine(r), t)
    r_hat = recovered_perturbation(t, t_pert)
    assert torch.allclose(r_hat, r, atol=1e-5)
    err = affine_errors(r_hat, r)
    assert float(err["rotation_deg"].max()) < 1e-3 and float(err["shift_pct"].max()) < 1e-3
    # and the aligned images coincide: warp(I_R, T(I_R)) == warp(I, T(I)) in the interior
    img = _blobs(64).expand(4, 1, 64, 64)
    a = warp(warp(img, r), t_pert)
    b = warp(img, t)
    assert (a - b)[..., 20:44, 20:44].abs().max() < 0.03


def test_random_affines_ranges_and_decompose():
    r = random_affines(500, rotation_deg=10, scale=(0.9, 1.1), shift=0.08,
                       generator=torch.Generator().manual_seed(0))
    d = decompose(r)
    assert d["rotation_deg"].abs().max() <= 10.0 + 1e-4 and d["rotation_deg"].abs().max() > 9.0
    assert 0.9 - 1e-5 <= float(d["scale"].min()) and float(d["scale"].max()) <= 1.1 + 1e-5
    assert d["tx"].abs().max() <= 0.16 + 1e-6
    # shift errors are reported in % of the size: 0.16 normalised = 8 %
    e = affine_errors(torch.eye(2, 3).expand_as(r), r)
    assert float(e["shift_pct"].max()) <= 8.0 * math.sqrt(2) + 1e-3


def test_crop_theta_selects_box():
    img = torch.zeros(1, 1, 40, 40)
    img[..., 10:20, 20:30] = 1.0
    out = warp(img, crop_theta((0.5, 0.25, 0.75, 0.5)), out_size=10)
    assert float(out.mean()) > 0.95


def register_metrics() -> dict:
    fixed = _blobs(64)
    r = affine_matrix(torch.tensor([[1.05, 1.05, 0.06, -0.04, math.radians(7)]]))
    moving = warp(fixed, invert_affine(r), padding_mode="border")  # warp(moving, r) ~ fixed
    theta, score = register_affine(moving, fixed, iters=60)
    err = affine_errors(theta, r)
    return {"rotation_err_deg": float(err["rotation_deg"][0]), "ncc": float(score[0])}


def register_slack(m: dict) -> dict[str, float]:
    return {"1.5 - rotation_err_deg": 1.5 - m["rotation_err_deg"], "ncc - 0.95": m["ncc"] - 0.95}


def test_register_affine_recovers_rotation():
    m = register_metrics()
    assert m["rotation_err_deg"] < 1.5, m
    assert m["ncc"] > 0.95, m


def test_lung_bounds_finds_two_dark_regions():
    yy, xx = np.mgrid[0:100, 0:100] / 100.0
    img = np.full((100, 100), 0.7)
    img[:8] = 0.05  # air above the shoulders (touches the border: excluded)
    for cx in (0.3, 0.7):
        img[((xx - cx) / 0.12) ** 2 + ((yy - 0.45) / 0.25) ** 2 < 1] = 0.25
    x0, y0, x1, y1 = lung_bounds(img, margin=0.0, bottom_margin=0.0)
    assert abs(x0 - 0.18) < 0.04 and abs(x1 - 0.82) < 0.04
    assert abs(y0 - 0.20) < 0.04 and abs(y1 - 0.70) < 0.04


def canonical_metrics(seed: int = 3) -> dict:
    """Re-averaging 12 posed, noisy copies of a template (poses and noise from ``seed``)."""
    template = _blobs(64)
    g = torch.Generator().manual_seed(seed)
    r = random_affines(12, rotation_deg=12, scale=(0.9, 1.1), shift=0.08, generator=g)
    imgs = warp(template.expand(12, 1, 64, 64), r, padding_mode="border")
    imgs = (imgs + 0.02 * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
    res = build_canonical(imgs, size=64, iterations=2, crop=False, reg_levels=(32,), reg_iters=40)
    plain = torch.from_numpy(res["plain_mean"])[None, None]
    canon = torch.from_numpy(res["image"])[None, None]
    return {"sharpness_gain": res["sharpness"][-1] / res["sharpness"][0],
            "sharpness_vs_plain": float(sharpness(canon) / sharpness(plain)),
            "ncc_first": res["ncc"][0], "ncc_last": res["ncc"][-1],
            "ncc_template_canon": float(ncc(canon, template)), "ncc_template_plain": float(ncc(plain, template))}


def canonical_slack(m: dict) -> dict[str, float]:
    return {"sharpness_gain - 1.3": m["sharpness_gain"] - 1.3,
            "sharpness_vs_plain - 1.3": m["sharpness_vs_plain"] - 1.3,
            "ncc_last - ncc_first": m["ncc_last"] - m["ncc_first"],
            "ncc(canon) - ncc(plain) - 0.01": m["ncc_template_canon"] - m["ncc_template_plain"] - 0.01}


def test_canonical_reaveraging_is_sharper_than_plain_mean():
    m = canonical_metrics()
    assert m["sharpness_gain"] > 1.3, m
    assert m["sharpness_vs_plain"] > 1.3, m
    assert m["ncc_last"] > m["ncc_first"], m
    # closer to the true template (up to the frame, which is the mean pose ~ identity)
    assert m["ncc_template_canon"] > m["ncc_template_plain"] + 0.01, m


def test_phantom_pose_matches_written_image(tmp_path):
    phantoms = pytest.importorskip("training.phantoms")
    out = phantoms.write_phantom_dataset(tmp_path / "ph", 3, size=64, seed=2)
    truth = json.loads((out / phantoms.TRUTH_FILE).read_text())
    key = sorted(truth["images"])[0]
    g = phantom_pose(truth, key[:-4])
    assert g is not None
    aff = truth["images"][key]["affine"]
    d = decompose(g[None])
    # the written image shows the upright chest turned by rotation_deg (matrix and record agree)
    assert abs(abs(float(d["rotation_deg"][0])) - abs(aff["rotation_deg"])) < 1e-3
    assert abs(float(d["scale"][0]) - aff["scale"]) < 1e-3


#: Acceptance of the learning test (issue 4): the held-out rotation error drops >= 60 % vs identity.
MIN_IDENTITY_ROTATION_DEG = 2.0
MAX_ROTATION_ERROR_RATIO = 0.4


def learning_run(work, seed: int = 0) -> dict:
    """Train the tiny alignment network on posed phantoms (initial weights, data order and the
    random perturbations from ``seed``); mean held-out rotation error before and after."""
    from cxrviewer.core.models import create_model
    from training import phantoms
    from training.data import CachedDataset, build_cache, load_records, split_records
    from training.trainers.align import AlignConfig, evaluate_alignment, train_alignment
    from training.trainers.loop import TrainConfig

    size = 48
    cfg_ph = phantoms.PhantomConfig(affine_rotation=12.0, affine_scale=0.08, affine_shift=0.05)
    data = phantoms.write_phantom_dataset(work / "ph", 72, size=size, seed=5, config=cfg_ph)
    truth = json.loads((data / phantoms.TRUTH_FILE).read_text())
    records = load_records(data)
    train_r, val_r = split_records(records, fold=0, n_folds=4)
    cache = build_cache(train_r, work / "c.h5", size)
    train_ds = CachedDataset(cache)
    canonical = torch.stack([train_ds[i]["image"] for i in range(len(train_ds))]).mean(0, keepdim=True)
    canonical = (canonical + 1) / 2
    torch.manual_seed(seed)
    model = create_model("alignment", backbone="tiny")
    # lr / 10 for the last 10 epochs: at a constant 3e-3 the end point was a noisy draw (error ratio
    # 0.16-0.41 over seeds 0-5, seed 5 above the 0.4 acceptance); with the step 0.09-0.14
    cfg = TrainConfig(epochs=40, batch_size=16, lr=3e-3, lr_step_epochs=30, out_dir=str(work / "run"),
                      log_every=0, seed=seed, device="cpu")
    acfg = AlignConfig(rotation_deg=8.0, shift=0.05, image_weight=0.1)
    model, history, info = train_alignment(model, train_ds, canonical, cfg, acfg=acfg, truth=truth,
                                           train_keys=[r.key for r in train_r], register_iters=20)
    res = evaluate_alignment(model, val_r, canonical, truth=truth, size=size)
    return {"info": info, "identity_deg": res["phantom"]["identity"]["mean_rotation_deg"],
            "trained_deg": res["phantom"]["model"]["mean_rotation_deg"]}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning test is from failing (> 0: passes)."""
    return {"identity_deg - MIN": m["identity_deg"] - MIN_IDENTITY_ROTATION_DEG,
            "0.4 x identity_deg - trained_deg": MAX_ROTATION_ERROR_RATIO * m["identity_deg"] - m["trained_deg"]}


def test_alignment_training_cuts_phantom_rotation_error(tmp_path):
    """Acceptance (issue 4): trained on phantoms, the held-out rotation error drops >= 60 % vs identity."""
    m = learning_run(tmp_path)
    assert m["info"]["anchor"] == "phantom_truth"
    before, after = m["identity_deg"], m["trained_deg"]
    print(f"phantom rotation error: identity {before:.2f} deg, trained {after:.2f} deg")
    assert before > MIN_IDENTITY_ROTATION_DEG
    assert after <= MAX_ROTATION_ERROR_RATIO * before, (before, after)


def test_bundle_roundtrip_and_evaluate_defaults(tmp_path):
    """The bundle records the canonical chest; evaluate_alignment finds it and the phantom truth."""
    phantoms = pytest.importorskip("training.phantoms")
    from PIL import Image

    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.models import create_model
    from training.data import load_records
    from training.trainers.align import evaluate_alignment, save_alignment_bundle, sha256_file

    canon = tmp_path / "canonical_chest.png"
    Image.fromarray((_blobs(64)[0, 0].numpy() * 255).astype(np.uint8)).save(canon)
    model = create_model("alignment", backbone="tiny")
    path = save_alignment_bundle(model, tmp_path / "models" / "al", canonical=canon, input_size=64,
                                 provenance={"command": "test"}, half=True)
    b = load_bundle(path)
    assert b.manifest.family == "alignment"
    assert b.manifest.canonical_chest == {"file": "canonical_chest.png", "sha256": sha256_file(canon)}
    assert b.model.fc.weight.dtype == torch.float32  # fp16 storage is cast back on load
    data = phantoms.write_phantom_dataset(tmp_path / "ph", 4, size=64, seed=1)
    res = evaluate_alignment(b, load_records(data), data_dir=data)
    assert set(res["phantom"]) == {"model", "identity"}
    assert res["recovery"]["identity_median_rotation_deg"] > 0
    with pytest.raises(Exception):
        evaluate_alignment(b.model, load_records(data))  # a bare model needs the canonical chest


def test_cli_canonical_then_align(tmp_path):
    """`cxr-train canonical` then `cxr-train align` on small phantoms: PNG + provenance, loadable bundle."""
    phantoms = pytest.importorskip("training.phantoms")
    from cxrviewer.core.bundle import load_bundle
    from training.cli import main

    data = phantoms.write_phantom_dataset(tmp_path / "ph", 24, size=64, seed=4)
    canon = tmp_path / "res" / "canonical_chest.png"
    assert main(["canonical", "--data", str(data), "--out", str(canon), "--size", "64", "--work-size", "64",
                 "--iterations", "1"]) == 0
    meta = json.loads(canon.with_suffix(".json").read_text())
    assert meta["count"] >= 2 and len(meta["crop_box"]) == 4 and meta["sha256"]
    out = tmp_path / "res" / "models" / "al.cxrbundle"
    assert main(["align", "--data", str(data), "--canonical", str(canon), "--arch-kwargs",
                 '{"backbone": "tiny"}', "--size", "64", "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu", "--out", str(out)]) == 0
    b = load_bundle(out)
    assert b.manifest.canonical_chest["file"] == "canonical_chest.png"
    assert b.manifest.provenance["anchors"]["anchor"] == "phantom_truth"
    assert "recovery" in b.manifest.provenance["held_out"]
