"""Lung/heart U-Net: data split, augmentation, loss, a learning test and the bundled model on JSRT."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.segmentation import (PREPROCESS, SEG_CLASSES, SegAugment, SegDataset, SegRecord,
                                        augment_batch, load_jsrt_records, percentile_stretch, split_folds,
                                        synthetic_chests)
from training.trainers.loop import TrainConfig
from training.trainers.segment import (evaluate_arrays, evaluate_segmentation, soft_dice_loss,
                                       train_segmentation)

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "resources" / "models" / "segmentation.cxrbundle"


def _fake_records(n: int) -> list[SegRecord]:
    return [SegRecord(f"IMG{i:03d}", Path(f"/x/IMG{i:03d}.jpg")) for i in range(n)]


def test_split_folds_partition_and_seed():
    recs = _fake_records(247)
    held = []
    for k in range(5):
        tr, va = split_folds(recs, fold=k, n_folds=5, seed=0)
        assert len(tr) + len(va) == 247
        assert not {r.stem for r in tr} & {r.stem for r in va}
        held += [r.stem for r in va]
    assert sorted(held) == sorted(r.stem for r in recs)  # every image held out exactly once
    assert [r.stem for r in split_folds(recs, 0, 5, 0)[1]] == [r.stem for r in split_folds(recs[::-1], 0, 5, 0)[1]]
    assert [r.stem for r in split_folds(recs, 0, 5, 0)[1]] != [r.stem for r in split_folds(recs, 0, 5, 1)[1]]
    with pytest.raises(ValueError):
        split_folds(recs, fold=5, n_folds=5)


def test_percentile_stretch_spans_unit_range():
    x = 0.4 + 0.1 * torch.rand(2, 1, 32, 32)  # low-contrast image
    y = percentile_stretch(x)
    assert y.shape == x.shape
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert float((y - 0.5).abs().mean()) > 2 * float((x - 0.45).abs().mean())
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.equal(percentile_stretch(flat), flat)
    assert PREPROCESS["kind"] == "percentile_stretch"


def test_augmentation_keeps_masks_on_the_image():
    # image = its own mask: after the same warp the image still matches the mask
    x, y = synthetic_chests(4, size=48, seed=1, noise=0.0)
    img = y[:, :1] * 2 - 1  # left-lung mask as the image, in [-1, 1]
    cfg = SegAugment(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise=0.0, rotate_deg=10)
    xa, ya = augment_batch(img, y, cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(ya, y)  # something moved
    assert torch.allclose((xa + 1) / 2, ya[:, :1], atol=1e-5)
    assert float(ya.min()) >= 0 and float(ya.max()) <= 1


def test_soft_dice_loss_perfect_and_wrong():
    t = torch.zeros(2, 3, 16, 16)
    t[:, :, 4:12, 4:12] = 1
    good, d = soft_dice_loss(t * 40 - 20, t)
    bad, _ = soft_dice_loss(20 - t * 40, t)
    assert float(good) < 0.01 and float(bad) > 0.95
    assert d.shape == (3,)


#: Acceptance of the learning test: Dice on held-out toy chests, every class.
MIN_DICE = 0.8


def learning_run(work: Path, seed: int = 0) -> dict:
    """A small U-Net on synthetic chests (initial weights and data order from ``seed``)."""
    from cxrviewer.core.models import create_model

    x, y = synthetic_chests(48, size=32, seed=0)
    xv, yv = synthetic_chests(16, size=32, seed=99)
    train = SegDataset(x, y, augment=None, seed=seed)
    val = SegDataset(xv, yv)
    torch.manual_seed(seed)
    model = create_model("unet", width=8, depth=2)
    # 20 epochs (cosine schedule): at 15 one seed of 0-5 stopped at Dice 0.84 on a lung; at 20 all >= 0.94
    cfg = TrainConfig(epochs=20, batch_size=8, lr=1e-2, out_dir=str(work / "run"), device="cpu",
                      log_every=0, seed=seed)
    model, hist = train_segmentation(model, train, val, cfg)
    res = evaluate_arrays(model, val)
    return {"dice": res["dice"], "min_dice": min(res["dice"][c] for c in SEG_CLASSES),
            "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"]}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning test is from failing (> 0: passes)."""
    return {"min_dice - MIN_DICE": m["min_dice"] - MIN_DICE, "first_loss - last_loss": m["first_loss"] - m["last_loss"]}


def test_unet_learns_synthetic_chests(tmp_path):
    """Learning test: a small U-Net reaches Dice > 0.8 per class on held-out toy chests."""
    m = learning_run(tmp_path)
    assert all(m["dice"][c] > MIN_DICE for c in SEG_CLASSES), m["dice"]
    assert m["last_loss"] < m["first_loss"]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_segment_command_registered():
    from training.cli import COMMANDS, build_parser

    assert "segment" in COMMANDS
    args = build_parser().parse_args(["segment", "--data", "d", "--out", "o"])
    assert args.size == 160 and args.width == 16 and args.epochs == 10


def test_bundle_round_trip_fp16(tmp_path):
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.models import create_model
    from training.trainers.segment import save_segmentation_bundle

    model = create_model("unet", width=4, depth=2).eval()
    p = save_segmentation_bundle(model, tmp_path / "seg.cxrbundle", input_size=32,
                                 provenance={"preprocess": dict(PREPROCESS)})
    b = load_bundle(p)
    assert b.manifest.family == "segmentation" and b.classes == SEG_CLASSES
    assert b.manifest.provenance["preprocess"]["kind"] == "percentile_stretch"
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)["logits"]
        got = b.model(x)["logits"]
    assert got.dtype == torch.float32
    assert torch.allclose(ref, got, atol=5e-2)


# -- real data ---------------------------------------------------------------------------
def test_jsrt_records_and_fold0(jsrt_dir):
    recs = load_jsrt_records(jsrt_dir)
    assert len(recs) == 247
    tr, va = split_folds(recs, fold=0, n_folds=5, seed=0)
    assert len(va) in (49, 50) and len(tr) == 247 - len(va)


def test_bundled_unet_dice_on_heldout_fold(jsrt_dir):
    """Acceptance: the bundled U-Net on JSRT fold 0 (never trained on): lungs >= 0.95, heart >= 0.88."""
    if not BUNDLE.is_dir():
        pytest.skip("resources/models/segmentation.cxrbundle is absent")
    from cxrviewer.core.bundle import load_bundle

    b = load_bundle(BUNDLE)
    prov = b.manifest.provenance
    assert prov.get("research_use_only") is True and prov["preprocess"]["kind"] == "percentile_stretch"
    assert prov["data"]["split"].startswith("image-wise fold 0 of 5"), prov["data"]
    _, held = split_folds(load_jsrt_records(jsrt_dir), fold=0, n_folds=5,
                          seed=int(prov.get("config", {}).get("seed", 0)))
    res = evaluate_segmentation(b.model, held, size=b.manifest.input_size[0], preprocess=prov["preprocess"])
    d = res["dice"]
    assert res["n_images"] == len(held)
    assert d["left_lung"] >= 0.95 and d["right_lung"] >= 0.95, d
    assert res["dice_lungs_mean"] >= 0.95, res
    assert d["heart"] >= 0.88, d
    assert np.isfinite(list(d.values())).all()
