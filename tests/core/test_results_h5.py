"""Results <-> HDF5: exact round trip, fixed top-level names, atomic writes."""
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


def assert_results_equal(a: Results, b: Results) -> None:
    for f in dataclasses.fields(Results):
        if f.name.startswith("_"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, f.name
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        elif f.name in ("am_steps", "am_erased"):
            assert x.keys() == y.keys(), f.name
            for k in x:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), (f.name, k)
        else:
            assert x == y, f.name


def test_round_trip_identical(results, tmp_path):
    p = write_results(results, tmp_path / "results.h5")
    back = read_results(p)
    assert_results_equal(results, back)
    assert back.boxes["cam"] and back.boxes["cam"][0] == results.boxes["cam"][0]
    with h5py.File(p, "r") as f:
        for name in ("probabilities", *GROUPS):
            assert name in f, name
        assert f["cam/cam"].shape == results.cam.shape
        assert f.attrs["study_id"] == results.study_id
        assert f.attrs["pixel_sha256"] == results.pixel_sha256


def test_on_demand_class_needs_a_fresh_run(results, tmp_path):
    back = read_results(write_results(results, tmp_path / "r.h5"))
    pl = Pipeline({}, "cpu")
    other = next(i for i, n in enumerate(back.classes) if n not in back.am_steps)
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
