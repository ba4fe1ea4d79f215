"""Models with any label set: every explainer follows the model's classes, and what a model cannot
show is said with its reason (issue 16, item 3): ``cxrviewer analyze`` on a torchxrayvision-style
18-class bundle, ``--classes`` through the model's label set, NIH-only parts (anatomy boxes, the
location prior, pseudo disease masks) for NIH classes only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.__main__ import main
from cxrviewer.core.bundle import load_bundle, save_bundle
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.io.results import read_results
from cxrviewer.core.labelsets import NIH14, TORCHXRAYVISION18
from cxrviewer.core.models import create_model
from cxrviewer.core.panels import not_available, not_available_lines, panel_data
from cxrviewer.core.pipeline import Pipeline, UnknownClassError, assign_roles, class_named
from cxrviewer.core.results import Results

XRV = list(TORCHXRAYVISION18.labels)
EXTRA = ["Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]  # not NIH classes
PHANTOM = Path(__file__).resolve().parents[2] / "resources" / "demo" / "images" / "phantom_000.png"


def save_classifier(folder: Path, classes: list[str], label_set, name: str = "xrv18", seed: int = 0) -> Path:
    """A random-weight tiny CAM classifier over ``classes`` saved as a bundle in ``folder``."""
    torch.manual_seed(seed)
    model = create_model("cam_classifier", num_classes=len(classes), backbone="tiny")
    return save_bundle(model, folder / name, classes=classes, input_size=64, label_set=label_set)


@pytest.fixture(scope="module")
def xrv_models(tmp_path_factory) -> Path:
    """An 18-class torchxrayvision-style classifier with our (NIH-14) CIA model and segmentation."""
    d = tmp_path_factory.mktemp("xrv_models")
    save_classifier(d, XRV, "torchxrayvision18")
    make_tiny_bundles(d, roles=("segmentation", "cia"), input_size=64)
    return d


@pytest.fixture(scope="module")
def analysed(xrv_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    rc = main(["analyze", str(PHANTOM), "--models", str(xrv_models), "--out", str(out), "--device", "cpu",
               "--map-size", "64", "--classes", "lung opacity"])
    assert rc == 0
    return out / PHANTOM.stem


def test_analyze_18_class_bundle_maps_and_boxes(analysed):
    res = read_results(analysed / "results.h5")
    assert list(res.classes) == XRV
    h, w = res.map_shape
    for ex, key in (("cam", "cam"), ("gradcam", "gradcam"), ("attention_mining", "final")):
        arr = res.get(ex, key)
        assert arr.shape == (18, h, w), ex
        assert np.isfinite(arr).all() and float(arr[16].std()) > 0, ex  # Lung Opacity has a real map
    # --classes "lung opacity" chose the model's own class: its attention-mining steps were mined
    assert "Lung Opacity" in res.get("attention_mining", "steps")
    assert res.get("attention_mining", "steps")["Lung Opacity"].shape == (3, h, w)
    for src in ("cam", "gradcam", "attention_mining"):
        assert res.boxes[src] and {b.label for b in res.boxes[src]} <= set(XRV)
    assert {b.label for b in res.boxes["cam"]} & set(EXTRA)  # boxes of non-NIH classes are labelled with them
    # the prior: NIH classes only (8 boxed NIH classes), never a box for Lung Opacity
    assert {b.label for b in res.boxes["prior"]} <= set(CLASSES)
    # CIA (an NIH-14 model) proposes boxes of its own classes only
    assert {b.label for b in res.boxes.get("contrast", [])} <= set(CLASSES)
    assert (analysed / "panels.png").stat().st_size > 1000


def test_summary_names_what_is_not_available(analysed):
    s = json.loads((analysed / "summary.json").read_text())
    na = s["not_available"]
    assert s["classes"] == XRV and set(s["probabilities"]) == set(XRV)
    assert na["aligned"] == "needs an alignment model (not loaded)"
    assert "contrast" not in na and "normal" not in na  # the CIA model is loaded
    assert na["contrast boxes"].startswith("not a CIA model class: not for ")
    assert all(c in na["contrast boxes"] for c in EXTRA)
    assert "NIH classes only: not for Lung Lesion, Fracture, Lung Opacity, Enlarged Cardiomediastinum" \
        in na["prior boxes"]
    assert "Atelectasis" not in na["prior boxes"]  # an NIH boxed class has its prior box


def test_unknown_class_exits_2_listing_the_model_classes(xrv_models, tmp_path, capsys):
    rc = main(["analyze", str(PHANTOM), "--models", str(xrv_models), "--out", str(tmp_path / "o"),
               "--device", "cpu", "--classes", "Lung Opaque"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class 'Lung Opaque'" in err[0]
    assert err[0].endswith(", ".join(XRV))
    assert not (tmp_path / "o").exists()  # nothing written


def test_class_names_match_through_the_label_set():
    assert class_named("lung opacity", XRV, TORCHXRAYVISION18) == "Lung Opacity"
    assert class_named("Opacity", XRV, TORCHXRAYVISION18) == "Lung Opacity"  # the set's synonym
    assert class_named("INFILTRATE", XRV, TORCHXRAYVISION18) == "Infiltration"
    assert class_named("pleural-thickening", XRV, TORCHXRAYVISION18) == "Pleural_Thickening"
    assert class_named("Infiltrate", list(CLASSES), NIH14) == "Infiltration"  # NIH-14 as before
    with pytest.raises(UnknownClassError, match="Lung Opacity"):
        class_named("Lung Opacity", list(CLASSES), NIH14)  # not a class of an NIH-14 model


def test_users_label_set_prior_by_synonym_and_reasons(tmp_path):
    """A user's set: 'Infiltrate' gets Infiltration's prior box (NIH synonym), 'Lung Opacity' none."""
    own = {"name": "mine", "labels": ["Infiltrate", "Lung Opacity"]}
    save_classifier(tmp_path, own["labels"], own, name="mine")
    pl = Pipeline(assign_roles([load_bundle(tmp_path / "mine.cxrbundle")]), "cpu", map_max_side=64)
    assert pl.class_named("lung_opacity") == "Lung Opacity" and pl.class_named("infiltration") == "Infiltrate"
    res = pl.run(synthetic_study(120, 100))
    assert res.get("cam", "cam").shape[0] == 2 and res.get("gradcam", "gradcam").shape[0] == 2
    assert [b.label for b in res.boxes["prior"]] == ["Infiltrate"]
    na = not_available(res.models, res)
    assert na["prior boxes"] == "NIH classes only: not for Lung Opacity"
    assert na["contrast"] == na["normal"] == "needs a CIA model with a normal bank (not loaded)"
    assert "Contrast attention dM: needs a CIA model with a normal bank (not loaded)" in not_available_lines(
        res.models, res)


def _results(classes, **attrs) -> Results:
    return Results("s", "x", "0" * 64, (100, 80), (20, 16), classes=tuple(classes),
                   probabilities=np.linspace(0.1, 0.9, len(classes)).astype(np.float32),
                   models={"classifier": {"name": "m"}, "segmentation": {"name": "s"}}, attrs=attrs)


def test_anatomy_panel_says_nih_classes_only():
    res = _results(XRV, anatomy={"source": "x", "boxes": {"Nodule": [1, 2, 3, 4]}, "scores": {"Nodule": 0.5}})
    res.maps["anatomy"] = {"posterior": np.ones((18, 20, 16), np.float32)}
    d = panel_data("anatomy", res, XRV.index("Lung Opacity"))
    assert not d.filled and d.caption == "Anatomy · Lung Opacity: NIH classes only"
    d = panel_data("anatomy", res, XRV.index("Hernia"))  # an NIH class without training boxes
    assert not d.filled and d.caption == "Anatomy · Hernia: no NIH training boxes"
    assert panel_data("anatomy", res, XRV.index("Nodule")).filled
    assert "NIH classes only: not for Lung Lesion" in not_available(res.models, res)["anatomy"]


def test_pseudo_disease_masks_cover_nih_classes_only():
    from cxrviewer.core.explain.disease_masks import DiseaseMaskExplainer

    res = _results(XRV)
    lung = np.zeros((20, 16), np.float32)
    lung[4:16, 2:7] = 1
    out = DiseaseMaskExplainer._pseudo(res, lung, lung[:, ::-1].copy(), np.zeros_like(lung))
    assert out.attrs["classes"] == XRV[:14] and out.maps["psi"].shape == (14, 20, 16)
    res.maps["disease_mask"], res.attrs["disease_mask"] = out.maps, out.attrs
    d = panel_data("disease_mask", res, XRV.index("Fracture"))
    assert not d.filled and d.caption.endswith("Fracture: pseudo masks: NIH classes only")
    assert panel_data("disease_mask", res, XRV.index("Effusion")).filled
    only = _results(["Fracture"])
    assert DiseaseMaskExplainer._pseudo(only, lung, lung, lung) is None and "NIH classes only" in only.notices[0]


def test_roles_alone_say_which_panels_cannot_be_made():
    na = not_available({"classifier"})
    assert na["contrast"] == "needs a CIA model with a normal bank (not loaded)"
    assert na["anatomy"] == na["lung_heart"] == "needs a lung/heart segmentation model (not loaded)"
    assert not {"original", "gradcam", "am_final", "disease_mask"} & set(na)  # a classifier alone makes these


def test_imported_torchvision_classifier_gets_every_classifier_map(tmp_path):
    """An imported 3-channel torchvision network (ImageNet mean/std) with 18 classes: CAM, Grad-CAM
    and attention mining over its 18 classes, boxes labelled with them."""
    from cxrviewer.core.errors import ModelError
    from cxrviewer.core.models.registry import list_models

    if "imported_classifier" not in {s.name for s in list_models()}:
        pytest.skip("no imported_classifier in the model registry")
    torch.manual_seed(0)
    try:
        model = create_model("imported_classifier", library="torchvision", model="resnet18", num_classes=18,
                             in_channels=3)
    except ModelError as exc:
        pytest.skip(str(exc))
    norm = {"kind": "channel_mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    save_bundle(model, tmp_path / "tv", classes=XRV, input_size=64, normalisation=norm, label_set="torchxrayvision18")
    pl = Pipeline(assign_roles([load_bundle(tmp_path / "tv.cxrbundle")]), "cpu", map_max_side=48,
                  am_classes=("Fracture",))
    res = pl.run(synthetic_study(96, 80))
    h, w = res.map_shape
    for ex, key in (("cam", "cam"), ("gradcam", "gradcam"), ("attention_mining", "final")):
        assert res.get(ex, key).shape == (18, h, w) and np.isfinite(res.get(ex, key)).all(), ex
    assert res.get("attention_mining", "steps")["Fracture"].shape[0] == 3
    assert {b.label for b in res.boxes["cam"]} <= set(XRV) and res.boxes["cam"]
    na = not_available(res.models, res)
    assert not {"original", "gradcam", "am_final", "am1"} & set(na)
