"""The ``prior`` explainer: the fixed median box per class as a reference in results, files and proposals."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.device import select_device
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.context import ExplainContext
from cxrviewer.core.explain.prior import PROVENANCE_KEY, load_prior, location_prior
from cxrviewer.core.geometry import Box
from cxrviewer.core.io.results import read_results, results_summary, write_results
from cxrviewer.core.panels import default_box_method, proposal_sources
from cxrviewer.core.pipeline import Pipeline
from cxrviewer.core.results import Results

REPO = Path(__file__).resolve().parents[2]


def _prior_boxes(shape: tuple[int, int], classes: tuple[str, ...], bundles: dict | None = None) -> tuple[dict, list]:
    """The prior's attributes and boxes for an image of ``shape`` with ``classes``."""
    res = Results("s", "", "", shape, (64, 64), classes=classes)
    ctx = ExplainContext(res, bundles or {}, select_device("cpu"), torch.zeros(1, 1, 64, 64))
    ex = get_explainer("prior")
    out = ex.compute(ctx)
    if out is None:
        return {}, []
    res.attrs["prior"] = out.attrs
    return out.attrs, ex.propose_boxes(res)


def test_boxes_scale_with_the_image_and_follow_the_classes():
    shipped = load_prior()["boxes"]
    classes = ("Nodule", "Hernia", "Mass")  # Hernia has no official box: skipped
    attrs, small = _prior_boxes((200, 100), classes)
    _, big = _prior_boxes((400, 200), classes)
    assert attrs["source"] == "shipped" and attrs["classes"] == ["Nodule", "Mass"]
    assert [b.label for b in small] == ["Nodule", "Mass"] and all(b.score is None for b in small)
    x, y, w, h = shipped["Nodule"]
    assert (small[0].x, small[0].y, small[0].w, small[0].h) == pytest.approx((x * 100, y * 200, w * 100, h * 200))
    for a, b in zip(small, big):
        assert (b.x, b.y, b.w, b.h) == pytest.approx((2 * a.x, 2 * a.y, 2 * a.w, 2 * a.h))
    assert _prior_boxes((200, 100), ()) == ({}, [])  # no classes (no classifier): no prior


def test_a_bundle_prior_wins_over_the_shipped_one():
    manifest = SimpleNamespace(name="clf", provenance={PROVENANCE_KEY: {"boxes": {"Mass": [0.1, 0.2, 0.3, 0.4]}}})
    attrs, boxes = _prior_boxes((100, 100), ("Mass", "Nodule"),
                                {"classifier": SimpleNamespace(manifest=manifest, path=Path("clf.cxrbundle"))})
    assert attrs["source"] == "bundle" and attrs["bundle"] == "clf"
    assert [(b.label, b.x, b.y, b.w, b.h) for b in boxes] == [("Mass", 10.0, 20.0, 30.0, 40.0)]


def test_location_prior_is_the_floor_median_and_the_shipped_file_is_fractions():
    boxes = [Box("Mass", 0.1, 0.2, 0.3, 0.4), Box("Mass", 0.3, 0.4, 0.1, 0.2), Box("Mass", 0.2, 0.3, 0.2, 0.3),
             Box("Nodule", 0.5, 0.5, 0.1, 0.1)]
    prior = location_prior(boxes)
    assert prior["boxes"] == {"Mass": [0.2, 0.3, 0.2, 0.3], "Nodule": [0.5, 0.5, 0.1, 0.1]}
    assert prior["count"] == {"Mass": 3, "Nodule": 1}
    shipped = load_prior()
    assert set(shipped["boxes"]) == set(BOXED_CLASSES) and sum(shipped["count"].values()) == shipped["n_boxes"]
    for x, y, w, h in shipped["boxes"].values():
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= 1 and y + h <= 1
    assert {"data", "command", "date"} <= set(shipped)


def test_the_prior_is_never_the_viewers_proposal_source():
    assert "prior" not in proposal_sources()
    assert get_explainer("prior").proposes_boxes and get_explainer("prior").box_rule is None
    assert default_box_method({"cam", "contrast", "prior"}) == "cam"
    assert default_box_method({"attention_mining", "cam", "prior"}) == "attention_mining"
    assert default_box_method({"contrast"}) == "contrast" and default_box_method({"prior"}) is None


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory):
    paths = make_tiny_bundles(tmp_path_factory.mktemp("b"), ("classifier",), input_size=64)
    bundles = {"classifier": load_bundle(paths["classifier"])}
    study = synthetic_study()
    with_prior = Pipeline(bundles, "cpu", map_max_side=64).run(study)
    others = [e.name for e in Pipeline(bundles, "cpu").explainers if e.name != "prior"]
    without = Pipeline(bundles, "cpu", map_max_side=64, methods=others).run(study)
    return with_prior, without


def test_the_prior_changes_no_other_method(classifier_runs):
    res, ref = classifier_runs
    assert set(res.boxes) == set(ref.boxes) | {"prior"} and res.boxes["prior"]
    np.testing.assert_array_equal(res.probabilities, ref.probabilities)
    for name in ref.maps:
        for key, arr in ref.maps[name].items():
            if isinstance(arr, np.ndarray):
                np.testing.assert_array_equal(res.maps[name][key], arr, err_msg=f"{name}/{key}")
        assert res.boxes[name] == ref.boxes[name], name


def test_results_h5_keeps_the_prior_and_the_default_box_method(classifier_runs, tmp_path):
    res, _ = classifier_runs
    path = write_results(res, tmp_path / "r.h5", default_box_method=default_box_method(res.boxes))
    back = read_results(path)
    assert back.boxes["prior"] == res.boxes["prior"]
    assert back.attr("prior", "boxes") == res.attr("prior", "boxes")
    assert results_summary(path)["default_box_method"] == "attention_mining"
    with h5py.File(path, "r") as f:
        assert f.attrs["default_box_method"] == "attention_mining" and "prior" in f["boxes"]
    old = write_results(res, tmp_path / "old.h5")  # a file without the attribute still reads: None
    assert results_summary(old)["default_box_method"] is None and read_results(old).boxes["prior"]


@pytest.mark.shared
def test_the_shipped_prior_is_the_official_boxes_median(nih_dir):
    spec = importlib.util.spec_from_file_location("make_location_prior", REPO / "benchmarks" / "make_location_prior.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    boxes, n_images = mod.official_boxes(nih_dir)
    shipped = load_prior()
    assert len(boxes) == shipped["n_boxes"] and n_images == shipped["n_images"]
    assert location_prior(boxes) == {"boxes": shipped["boxes"], "count": shipped["count"]}
