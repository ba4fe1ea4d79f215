"""Results <-> HDF5: round trip (float maps within 1e-3 of their range, the rest exact), fixed
top-level names, atomic writes."""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.errors import CxrError
from cxrviewer.core.io.results import GROUPS, ResultsFileError, read_results, write_results
from cxrviewer.core.pipeline import Pipeline, Results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    paths = make_tiny_bundles(tmp_path_factory.mktemp("b"), ("alignment", "segmentation", "classifier", "cia"),
                              input_size=64)
    pl = Pipeline({r: load_bundle(p) for r, p in paths.items()}, "cpu", map_max_side=64)
    return pl.run(synthetic_study())


def _assert_same(x, y, what) -> None:
    if isinstance(x, dict) or isinstance(y, dict):
        assert isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys(), what
        for k in x:
            _assert_same(x[k], y[k], (what, k))
    elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert x is not None and y is not None, what
        assert x.dtype == y.dtype and x.shape == y.shape, what
        if x.dtype.kind == "f" and x.ndim >= 2 and x.size >= 4096:  # stored native or quantised
            span = float(x.max() - x.min()) or 1.0
            assert np.abs(x.astype(np.float64) - y).max() <= 1e-3 * span, what
        else:
            assert np.array_equal(x, y), what
    else:
        assert x == y, what


def assert_results_equal(a: Results, b: Results) -> None:
    for f in dataclasses.fields(Results):
        if not f.compare:  # runtime only: state, the native-grid log
            continue
        _assert_same(getattr(a, f.name), getattr(b, f.name), f.name)


def test_round_trip_identical(results, tmp_path):
    p = write_results(results, tmp_path / "results.h5")
    back = read_results(p)
    assert_results_equal(results, back)
    assert back.boxes["cam"] and back.boxes["cam"][0] == results.boxes["cam"][0]
    with h5py.File(p, "r") as f:
        for name in ("probabilities", *GROUPS):
            assert name in f, name
        cam = f["explainers/cam/cam"]
        assert cam.attrs["encoding"] == "native" and cam.shape[0] == results.get("cam", "cam").shape[0]
        assert cam.shape[1:] < results.get("cam", "cam").shape[1:]  # the native grid, not the map
        assert f.attrs["study_id"] == results.study_id
        assert f.attrs["pixel_sha256"] == results.pixel_sha256


def test_on_demand_class_needs_a_fresh_run(results, tmp_path):
    back = read_results(write_results(results, tmp_path / "r.h5"))
    pl = Pipeline({}, "cpu")
    other = next(i for i, n in enumerate(back.classes) if n not in back.get("attention_mining", "steps"))
    with pytest.raises(CxrError, match="keep no features"):
        pl.compute_class(back, other)


def test_partial_results_round_trip(tmp_path):
    r = Results(study_id="x", source_path="/a/b.png", pixel_sha256="0" * 64, image_shape=(10, 12),
                map_shape=(5, 6), timings={"preprocess": 0.5}, notices=["hello"])
    back = read_results(write_results(r, tmp_path / "p.h5"))
    assert_results_equal(r, back)
    assert back.probabilities is None and back.boxes == {}


def test_atomic_write_keeps_old_file_on_failure(results, tmp_path, monkeypatch):
    p = write_results(results, tmp_path / "results.h5")
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(ResultsFileError, match="disk full"):
        write_results(results, p)
    assert p.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["results.h5"]  # no temp file left


def test_unreadable_and_future_files(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ResultsFileError, match="not a readable results file"):
        read_results(bad)
    fut = tmp_path / "future.h5"
    with h5py.File(fut, "w") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ResultsFileError, match="version 99"):
        read_results(fut)


def _write_v1(path, r) -> None:
    """A results file in the version 1 layout (one fixed group per method)."""
    with h5py.File(path, "w") as f:
        for k in ("study_id", "source_path", "pixel_sha256", "device"):
            f.attrs[k] = getattr(r, k)
        f.attrs["format_version"] = 1
        f.attrs["image_shape"] = np.asarray(r.image_shape)
        f.attrs["map_shape"] = np.asarray(r.map_shape)
        for k in ("classes", "models", "timings", "notices"):
            f.attrs[k] = __import__("json").dumps(list(r.classes) if k == "classes" else getattr(r, k))
        f["probabilities"] = r.probabilities
        f.create_group("cam")["cam"] = r.get("cam", "cam")
        f["cam/gradcam"] = r.get("gradcam", "gradcam")
        am = f.create_group("attention_mining")
        am["final"] = r.get("attention_mining", "final")
        am.attrs["steps"] = 3
        for name, arr in r.get("attention_mining", "steps").items():
            am[f"steps/{name}"] = arr
            am[f"erased/{name}"] = r.get("attention_mining", "erased")[name]
        c = f.create_group("contrast")
        c["map"] = r.get("contrast", "contrast")
        c.attrs["classes"] = __import__("json").dumps(r.attr("contrast", "classes"))
        c.attrs["paired_normal_id"] = r.attr("contrast", "paired_normal_id")
        f.create_group("disease_mask")
        al = f.create_group("alignment")
        al["affine"] = r.get("alignment", "affine")
        s = f.create_group("segmentation")
        s["masks"] = r.get("segmentation", "masks")
        s.attrs["classes"] = __import__("json").dumps(r.attr("segmentation", "classes"))
        b = f.create_group("boxes").create_group("am")
        boxes = r.boxes["attention_mining"]
        b["xywh"] = np.asarray([[x.x, x.y, x.w, x.h] for x in boxes], np.float64)
        b["score"] = np.asarray([x.score for x in boxes], np.float64)
        b.create_dataset("label", data=np.asarray([x.label for x in boxes], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))


def test_version_1_files_stay_readable(results, tmp_path):
    p = tmp_path / "v1.h5"
    _write_v1(p, results)
    back = read_results(p)
    assert back.format_version == 1
    for ex, name in (("cam", "cam"), ("gradcam", "gradcam"), ("attention_mining", "final"), ("contrast", "contrast"),
                     ("alignment", "affine"), ("segmentation", "masks")):
        np.testing.assert_array_equal(back.get(ex, name), results.get(ex, name), err_msg=name)
    assert back.get("attention_mining", "steps").keys() == results.get("attention_mining", "steps").keys()
    assert back.attr("contrast", "paired_normal_id") == results.attr("contrast", "paired_normal_id")
    assert back.attr("segmentation", "classes") == results.attr("segmentation", "classes")
    assert back.boxes["attention_mining"] == results.boxes["attention_mining"]
    from cxrviewer.core.display import build_display

    assert build_display(back).valid.shape == tuple(back.map_shape)  # computed from the stored affine
