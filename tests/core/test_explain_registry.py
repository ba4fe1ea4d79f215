"""The explainer registry (the GUI's method list is generated from it)."""
from __future__ import annotations

import pytest

from cxrviewer.core.errors import CxrError, ExplainError
from cxrviewer.core.explain import Explainer, get_explainer, list_explainers

EXPECTED = {"cam", "attention_mining", "contrast", "disease_mask", "gradcam"}


def test_all_methods_registered() -> None:
    assert EXPECTED <= set(list_explainers())
    assert "contrast" in list_explainers("cia") and "cam" not in list_explainers("cia")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_explainer_has_metadata(name: str) -> None:
    ex = get_explainer(name)
    assert isinstance(ex, Explainer)
    assert ex.name == name and ex.title and ex.families
    assert ex.applies_to(family=ex.families[0])
    assert not ex.applies_to(family="segmentation")


def test_unknown_method_is_a_typed_error() -> None:
    with pytest.raises(ExplainError, match="unknown explanation method") as info:
        get_explainer("nope")
    assert isinstance(info.value, CxrError)


def test_missing_output_key_is_a_typed_error() -> None:
    with pytest.raises(ExplainError, match="attention"):
        get_explainer("contrast").explain({"logits": None}, 0)


def test_class_boxes_runs_the_rule_on_the_named_classes_only() -> None:
    """``class_boxes(results, names)``: the box rule on those classes' maps (at box resolution),
    equal to the matching part of ``propose_boxes``; a method with its own ``propose_boxes``
    (the prior) is filtered by label."""
    import numpy as np

    from cxrviewer.core.results import Results

    classes = ("Atelectasis", "Cardiomegaly", "Effusion")
    maps = np.zeros((3, 256, 200), np.float32)
    maps[0, 20:60, 30:90] = 1.0
    maps[1, 100:200, 40:160] = 2.0
    maps[2, 10:30, 150:190] = 0.5
    res = Results("s", "s.png", "0" * 64, (1024, 800), (256, 200), classes, maps={"cam": {"cam": maps}})
    cam = get_explainer("cam")
    every = cam.propose_boxes(res)
    assert sorted(b.label for b in every) == sorted(classes)
    box = next(b for b in every if b.label == "Cardiomegaly")
    assert (box.x, box.y, box.w, box.h) == (160.0, 400.0, 480.0, 400.0)  # 256-px map -> 128 px -> original pixels
    only = cam.class_boxes(res, {"Cardiomegaly", "Effusion"})
    assert only == [b for b in every if b.label in ("Cardiomegaly", "Effusion")]
    assert cam.class_boxes(res, set()) == [] and cam.class_boxes(res) == every
    res.attrs["prior"] = {"boxes": {c: [0.1, 0.2, 0.3, 0.4] for c in classes}}
    prior = get_explainer("prior")
    assert len(prior.propose_boxes(res)) == 3
    assert [b.label for b in prior.class_boxes(res, {"Effusion"})] == ["Effusion"]
