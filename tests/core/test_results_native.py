"""Results format version 3: maps stored on their native grid (redrawn on read by numpy exactly
as the Mapper draws them with torch) or quantised, within 1e-3 of each map's range; old files
still read."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from cxrviewer.core.explain.context import Mapper
from cxrviewer.core.io.results import QUANT_LEVELS, read_results, write_results
from cxrviewer.core.results import MapRecipe, NativeLog, Results, remap, slice_digest

CLASSES = ("Atelectasis", "Nodule", "Mass")


def _rot(rng: np.random.Generator) -> torch.Tensor:
    a, s = rng.normal(0, 0.15), rng.uniform(0.85, 1.15)
    return torch.tensor([[[s * np.cos(a), -s * np.sin(a), rng.normal(0, 0.1)],
                          [s * np.sin(a), s * np.cos(a), rng.normal(0, 0.1)]]], dtype=torch.float32)


def _span(a: np.ndarray) -> float:
    return float(a.max() - a.min()) or 1.0


@pytest.mark.parametrize("seed", range(12))
def test_numpy_remap_matches_the_torch_mapper(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    H, W = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    fh, fw = int(rng.integers(40, 400)), int(rng.integers(40, 400))
    box = None
    if seed % 2:
        y0, x0 = int(rng.integers(0, fh // 3)), int(rng.integers(0, fw // 3))
        box = (y0, int(rng.integers(y0 + fh // 3, fh + 1)), x0, int(rng.integers(x0 + fw // 3, fw + 1)))
    theta = _rot(rng) if seed % 3 else None
    log = NativeLog()
    mp = Mapper((H, W), (fh, fw), box, theta, log)
    x = torch.randn(4, int(rng.integers(2, 9)), int(rng.integers(2, 9)))
    for nearest in (False, True):
        out = mp(x, nearest=nearest)
        back = remap(x.numpy(), mp.recipe("nearest" if nearest else "bilinear"))
        assert back.shape == out.shape and back.dtype == np.float32
        assert np.abs(back - out).max() <= 1e-4 * _span(out), (seed, nearest)
        hits = log.find(out[1])  # the log knows where each slice came from
        assert any(np.array_equal(n, x[1].numpy()) and c == slice_digest(out[1]) for n, _, c in hits)


def _results(rng: np.random.Generator, map_shape=(96, 80)) -> tuple[Results, Mapper, torch.Tensor]:
    r = Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(480, 400), map_shape=map_shape,
                classes=CLASSES, probabilities=np.asarray([0.1, 0.8, 0.3], np.float32))
    r.native = NativeLog()
    mp = Mapper(map_shape, (240, 200), (10, 230, 5, 190), _rot(rng), r.native)
    native = torch.from_numpy(rng.normal(size=(3, 8, 8)).astype(np.float32))
    return r, mp, native


def test_mapper_maps_are_stored_native_and_read_back_within_tolerance(tmp_path):
    rng = np.random.default_rng(0)
    r, mp, native = _results(rng)
    cam = mp(native)
    r.maps = {"cam": {"cam": cam}, "contrast": {"grid": mp(native, nearest=True), "contrast": mp(native[1])[0]},
              "attention_mining": {"final": np.stack([mp(native[i:i + 1])[0] for i in range(3)]),
                                   "steps": {"Nodule": mp(native[:2])}}}
    p = write_results(r, tmp_path / "r.h5")
    with h5py.File(p, "r") as f:
        assert f.attrs["format_version"] == 3
        for name in ("cam/cam", "contrast/grid", "contrast/contrast", "attention_mining/final",
                     "attention_mining/steps/Nodule"):
            ds = f["explainers/" + name]
            assert ds.attrs["encoding"] == "native" and ds.shape[-2:] == (8, 8), name
    back = read_results(p)
    for ex, m in r.maps.items():
        for k, v in m.items():
            for a, b in ([(v[c], back.maps[ex][k][c]) for c in v] if isinstance(v, dict) else [(v, back.maps[ex][k])]):
                assert b.shape == a.shape and b.dtype == np.float32
                assert np.abs(b - a).max() <= 2e-4 * _span(a), (ex, k)
    # nearest-mode grids come back piecewise constant with the native values
    assert set(np.unique(back.get("contrast", "grid")[0])) <= set(np.unique(r.get("contrast", "grid")[0]))


def test_a_map_changed_after_mapping_is_quantised_not_redrawn(tmp_path):
    rng = np.random.default_rng(1)
    r, mp, native = _results(rng)
    cam = mp(native)
    cam[:, :10] = 5.0  # post-processing in place: the native grid no longer describes it
    r.maps = {"cam": {"cam": cam}}
    p = write_results(r, tmp_path / "r.h5")
    with h5py.File(p, "r") as f:
        ds = f["explainers/cam/cam"]
        assert ds.attrs["encoding"] == "quantised" and ds.dtype == np.uint16 and ds.shape == cam.shape
    back = read_results(p).get("cam", "cam")
    for a, b in zip(cam, back):
        assert np.abs(b - a).max() <= 0.5 / QUANT_LEVELS * _span(a) * 1.001
    assert np.abs(back - cam).max() <= 1e-3 * _span(cam)


def test_a_slice_changed_off_the_fingerprint_is_caught_by_its_digest(tmp_path):
    """One pixel of the third slice changed where the log's sparse fingerprint does not look: the
    slice's digest no longer matches its drawing, so it is redrawn and compared, and the stack is
    quantised; the untouched stack beside it is stored native from its digests."""
    rng = np.random.default_rng(4)
    r, mp, native = _results(rng)
    cam, kept = mp(native), mp(native * 2)
    y, x = 5, 5  # the fingerprint samples rows and columns 0, 8, 16, ... of a 96 x 80 map
    assert y % (96 // 12) and x % (80 // 12)  # off the sampled rows and columns
    cam[2, y, x] += 10 * _span(cam[2])
    r.maps = {"cam": {"cam": cam}, "gradcam": {"gradcam": kept}}
    with h5py.File(write_results(r, tmp_path / "r.h5"), "r") as f:
        assert f["explainers/cam/cam"].attrs["encoding"] == "quantised"
        assert f["explainers/gradcam/gradcam"].attrs["encoding"] == "native"


def test_maps_without_a_native_grid_are_quantised_masks_kept_exact(tmp_path):
    rng = np.random.default_rng(2)
    r, _, _ = _results(rng)
    smooth = np.cumsum(rng.random((3, 96, 80), dtype=np.float32), axis=-1)
    nan_map = smooth.copy()
    nan_map[0, 0, 0] = np.nan
    masks = (rng.random((3, 96, 80)) > 0.5).astype(np.uint8)
    r.maps = {"anatomy": {"posterior": smooth}, "x": {"nan": nan_map}, "segmentation": {"masks": masks},
              "alignment": {"valid": masks[0] > 0, "aligned_image": rng.random((200, 160), dtype=np.float32)}}
    back = read_results(write_results(r, tmp_path / "r.h5"))
    assert np.abs(back.get("anatomy", "posterior") - smooth).max() <= 1e-3 * _span(smooth)
    img = r.get("alignment", "aligned_image")
    assert np.abs(back.get("alignment", "aligned_image") - img).max() <= 1e-3 * _span(img)
    np.testing.assert_array_equal(back.get("x", "nan"), nan_map)  # NaN: stored as is
    np.testing.assert_array_equal(back.get("segmentation", "masks"), masks)
    assert back.get("alignment", "valid").dtype == bool
    np.testing.assert_array_equal(back.get("alignment", "valid"), masks[0] > 0)


def test_snapshot_keeps_the_native_log(tmp_path):
    rng = np.random.default_rng(3)
    r, mp, native = _results(rng)
    r.maps = {"cam": {"cam": mp(native)}}
    r.state["features"] = object()
    snap = r.snapshot()
    assert snap.state == {} and snap.native is r.native  # runtime state dropped, the log shared
    with h5py.File(write_results(snap, tmp_path / "s.h5"), "r") as f:
        assert f["explainers/cam/cam"].attrs["encoding"] == "native"


def test_version_2_file_reads_and_ignores_an_encoding_attribute(tmp_path):
    r = Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(64, 64), map_shape=(8, 8),
                classes=CLASSES[:2], maps={"cam": {"cam": np.arange(128, dtype=np.float32).reshape(2, 8, 8)}})
    p = write_results(r, tmp_path / "v2.h5")  # small maps are stored as they are, as version 2 did
    with h5py.File(p, "r+") as f:
        f.attrs["format_version"] = 2
        f["explainers/cam/cam"].attrs["encoding"] = "native"  # meaningless before version 3
    back = read_results(p)
    assert back.format_version == 2
    np.testing.assert_array_equal(back.get("cam", "cam"), r.get("cam", "cam"))


def test_recipe_json_round_trip_and_checks():
    rec = MapRecipe((64, 48), (300, 200), (0, 300, 10, 190), (1.0, 0.0, 0.1, 0.0, 1.0, -0.1), "nearest")
    assert MapRecipe.from_json(rec.to_json(), 4096, 65536) == rec
    for bad in ({**rec.to_json(), "mode": "cubic"}, {**rec.to_json(), "box": [0, 400, 0, 10]},
                {**rec.to_json(), "theta_inv": [1, 2]}, {**rec.to_json(), "map_shape": [0, 5]}, [1, 2]):
        with pytest.raises(ValueError):
            MapRecipe.from_json(bad, 4096, 65536)


def test_results_read_back_are_written_native_again(tmp_path):
    rng = np.random.default_rng(4)
    r, mp, native = _results(rng)
    r.maps = {"cam": {"cam": mp(native)}}
    back = read_results(write_results(r, tmp_path / "a.h5"))
    assert back.state == {} and back.native is not None  # no runtime state: the app mines no class from it
    again = write_results(back, tmp_path / "b.h5")
    with h5py.File(again, "r") as f:
        assert f["explainers/cam/cam"].attrs["encoding"] == "native"
    np.testing.assert_array_equal(read_results(again).get("cam", "cam"), back.get("cam", "cam"))
