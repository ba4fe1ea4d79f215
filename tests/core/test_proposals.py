"""core/proposals.py: which proposals the annotator sees and how their scores read (issue 14)."""
from __future__ import annotations

import pytest

from cxrviewer.core.explain.registry import (BOX_SCORES, Explainer, registered_explainers)
from cxrviewer.core.geometry import Box
from cxrviewer.core.proposals import (MIN_PROBABILITY, box_score_kind, min_score_for, proposal_source,
                                      score_text, select_proposals)


def test_every_explainer_declares_what_its_box_score_is() -> None:
    kinds = {c.name: c.box_score for c in registered_explainers()}
    assert set(kinds.values()) <= set(BOX_SCORES)
    assert kinds["anatomy"] == "probability" and kinds["contrast"] == "probability"
    assert kinds["cam"] == kinds["gradcam"] == kinds["attention_mining"] == "map"


def test_the_default_box_score_is_map_and_a_wrong_kind_is_refused() -> None:
    class Toy(Explainer):
        pass

    assert Toy.box_score == "map"
    with pytest.raises(TypeError):
        class Bad(Explainer, box_score="logit"):  # noqa: F841
            pass


def test_score_text_says_what_the_score_is() -> None:
    assert score_text("anatomy", Box("Mass", 0, 0, 5, 5, 0.623)) == "p 0.62"
    assert score_text("contrast", Box("Mass", 0, 0, 5, 5, 0.5)) == "p 0.50"
    assert score_text("cam", Box("Mass", 0, 0, 5, 5, 1.94)) == "map 1.94"
    assert score_text("demo:attention_mining", Box("Mass", 0, 0, 5, 5, -1.08)) == "map -1.08"
    assert score_text("unknown_method", Box("Mass", 0, 0, 5, 5, 0.3)) == "map 0.30"  # never claimed a p
    assert score_text("cam", Box("Mass", 0, 0, 5, 5)) == ""


def test_source_of_a_stored_model_name() -> None:
    assert proposal_source("demo_models:cam") == "cam"
    assert proposal_source("cam") == "cam"
    assert box_score_kind("models:anatomy") == "probability"
    assert min_score_for("anatomy") == MIN_PROBABILITY and min_score_for("cam") == 0.0


def _grid(label: str, n: int, score0: float, step: float = -0.3) -> list[Box]:
    """``n`` disjoint boxes of ``label`` with falling scores."""
    return [Box(label, 30.0 * i, 0.0, 20.0, 20.0, score0 + step * i) for i in range(n)]


def test_top_k_per_class_over_sources_in_preference_order() -> None:
    groups = {"m:cam": _grid("Mass", 5, 1.9) + _grid("Nodule", 5, 1.5),
              "m:anatomy": [Box("Mass", 200, 200, 40, 40, 0.62), Box("Nodule", 300, 300, 10, 10, 0.01)],
              "m:prior": [Box("Mass", 400, 400, 40, 40)]}
    got = select_proposals(groups, classes=None)
    by_class: dict[str, list[tuple[str, Box]]] = {}
    for key, box in got:
        by_class.setdefault(box.label, []).append((key, box))
    assert set(by_class) == {"Mass", "Nodule"}
    assert all(len(v) <= 3 for v in by_class.values())
    assert by_class["Mass"][0] == ("m:anatomy", groups["m:anatomy"][0])  # the preferred method first
    assert [b.score for _, b in by_class["Mass"][1:]] == pytest.approx([1.9, 1.6])
    assert all(k != "m:prior" for k, _ in got)  # a reference is never a proposal
    assert all(k != "m:anatomy" for k, _ in by_class["Nodule"])  # p 0.01 is below the floor


def test_classes_filter_thresholds_and_duplicates() -> None:
    cam = [Box("Mass", 0, 0, 100, 100, 1.0), Box("Mass", 2, 2, 100, 100, 0.9),  # IoU > 0.7: a duplicate
           Box("Mass", 300, 0, 50, 50, -0.4), Box("Effusion", 0, 300, 50, 50, 2.0)]
    got = select_proposals({"cam": cam}, classes=["Mass"])
    assert [b for _, b in got] == [cam[0]]  # duplicate and negative map score dropped, Effusion not asked
    got = select_proposals({"cam": cam}, classes={"Mass"}, min_score=-1.0, top_k=5)
    assert [b for _, b in got] == [cam[0], cam[2]]
    assert select_proposals({"cam": cam}, classes=["Mass"], top_k=0) == []
    assert select_proposals({}, classes=None) == []


def test_a_box_over_most_of_the_image_is_not_shown() -> None:
    am = [Box("Mass", 0, 0, 1024, 1024, 0.9), Box("Mass", 700, 600, 100, 90, 0.6)]
    assert len(select_proposals({"attention_mining": am}, classes=None)) == 2
    got = select_proposals({"attention_mining": am}, classes=None, image_shape=(1024, 1024))
    assert [b for _, b in got] == [am[1]]
