"""The aligned training cache: images as the app feeds them to the classifier/DM/CIA networks."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.canonical import default_canonical_path, load_canonical
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box
from cxrviewer.core.models.alignment import raw_from_params
from training.data import CachedDataset, Record, build_cache
from training.data.aligned import boxes_through_affine

SIZE = 64
SQUARE = Box("Nodule", 40.0, 50.0, 24.0, 20.0)  # in the 128 px originals


@pytest.fixture(scope="module")
def align_bundle(tmp_path_factory):
    """A tiny alignment bundle naming the canonical chest; its network rotates by 0.1 rad, shifts a bit."""
    from training.commands.init_bundle import init_bundle

    path = default_canonical_path()
    if not path.is_file() or not path.with_suffix(".json").is_file():
        pytest.skip("resources/canonical_chest.png/.json are absent")
    folder = tmp_path_factory.mktemp("align")
    b = load_bundle(init_bundle("alignment", folder / "alignment", kwargs={"backbone": "tiny"}, input_size=64,
                                canonical=path))
    with torch.no_grad():
        b.model.fc.weight.zero_()
        b.model.fc.bias.copy_(raw_from_params(torch.tensor([[0.95, 0.9, 0.05, -0.04, 0.1]]))[0])
    return b


def _write(folder: Path, name: str, img: np.ndarray) -> Path:
    p = folder / f"{name}.png"
    Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)).save(p)
    return p


def _records(folder: Path) -> list[Record]:
    chest = load_canonical(default_canonical_path(), 128)[0, 0].numpy().copy()
    x, y = int(SQUARE.x), int(SQUARE.y)
    chest[y:y + int(SQUARE.h), x:x + int(SQUARE.w)] = 1.0  # a bright finding exactly at its box
    noise = np.random.default_rng(0).random((128, 128))
    lab = np.zeros(len(CLASSES), np.float32)
    lab[CLASSES.index("Nodule")] = 1
    return [Record(_write(folder, "chest", chest), "chest", lab, [SQUARE], "p0"),
            Record(_write(folder, "noise", noise), "noise", lab, [SQUARE], "p1")]


def _bright_bbox(img: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(img > 0.97)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, align_bundle):
    folder = tmp_path_factory.mktemp("imgs")
    records = _records(folder)
    return records, build_cache(records, folder / "aligned.h5", SIZE, align=align_bundle)


def test_boxes_land_where_the_warped_image_has_them(cache):
    records, path = cache
    ds = CachedDataset(path)
    assert ds.alignment is not None and ds.alignment["canonical_chest"] == "canonical_chest.png"
    with h5py.File(path) as f:
        rejected, theta = f["align_rejected"][()], f["align_theta"][()]
        assert bool(f.attrs["aligned"])
    assert not rejected[0]
    assert not np.allclose(theta[0], [[1, 0, 0], [0, 1, 0]], atol=0.05)  # really warped
    img = ds.image_u8(0).astype(np.float32) / 255
    (box,) = ds.boxes_of(0)
    bx0, by0, bx1, by1 = _bright_bbox(img)
    # the stored box is the bounding box of the warped square (1.5 px: bilinear edges at 64 px)
    assert box.x == pytest.approx(bx0, abs=1.5) and box.y == pytest.approx(by0, abs=1.5)
    assert box.x2 == pytest.approx(bx1, abs=1.5) and box.y2 == pytest.approx(by1, abs=1.5)


def test_rejected_alignment_is_stored_unaligned(cache):
    records, path = cache
    ds = CachedDataset(path)
    with h5py.File(path) as f:
        assert bool(f["align_rejected"][1]) and f["align_quality"][1] < 0.7
        np.testing.assert_allclose(f["align_theta"][1], [[1, 0, 0], [0, 1, 0]])
    noise = np.asarray(Image.open(records[1].path), np.float32) / 255
    plain = torch.nn.functional.interpolate(torch.from_numpy(noise)[None, None], size=(SIZE, SIZE), mode="bilinear",
                                            align_corners=False, antialias=True)[0, 0].numpy()
    assert np.abs(ds.image_u8(1).astype(np.float32) / 255 - plain).max() < 2 / 255
    (box,) = ds.boxes_of(1)
    assert (box.x, box.y, box.w, box.h) == pytest.approx((20.0, 25.0, 12.0, 10.0))


def test_a_second_size_reuses_the_stored_alignment(cache, tmp_path):
    records, path = cache
    other = build_cache(records, tmp_path / "aligned32.h5", 32, align=path)
    with h5py.File(path) as a, h5py.File(other) as b:
        np.testing.assert_array_equal(a["align_theta"][()], b["align_theta"][()])
        np.testing.assert_array_equal(a["align_rejected"][()], b["align_rejected"][()])
    assert CachedDataset(other).alignment["reused_from"] == str(path)


def test_boxes_through_affine_identity_and_shift():
    b = Box("Mass", 10.0, 20.0, 30.0, 40.0)
    (same,) = boxes_through_affine([b], np.array([[1, 0, 0], [0, 1, 0]], float), (100, 100), 100)
    assert (same.x, same.y, same.w, same.h) == pytest.approx((10, 20, 30, 40))
    # sampling at u + 0.2 moves the content 10 % of the width to the left
    (moved,) = boxes_through_affine([b], np.array([[1, 0, 0.2], [0, 1, 0]], float), (100, 100), 100)
    assert (moved.x, moved.y) == pytest.approx((0, 20)) and moved.w == pytest.approx(30)
