"""Model cards in bundle manifests (cxrviewer/core/model_card.py)."""
from __future__ import annotations

import json

import pytest

from cxrviewer.core.bundle import BundleError, load_bundle, read_manifest
from cxrviewer.core.model_card import BELOW_PRIOR, below_prior, card_lines, model_card, write_model_card

from _tiny_bundles import make_tiny_bundles

CARD = {"data": "NIH test", "protocol": "5-fold CV", "mean_auroc": 0.61,
        "auroc": {"Atelectasis": 0.6, "Cardiomegaly": 0.8},
        "localisation": {"t_iou": 0.3, "method": "cam", "budget": "one box per class",
                         "per_class": {"Atelectasis": {"method": 0.05, "prior": 0.10, "n": 20},
                                       "Cardiomegaly": {"method": 0.95, "prior": 0.90, "n": 15}}}}


def test_card_round_trip_keeps_the_bundle_loadable(tmp_path):
    path = make_tiny_bundles(tmp_path, ("classifier",))["classifier"]
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "manifest.json"}
    assert model_card(read_manifest(path)) is None
    assert "model_card" not in json.loads((path / "manifest.json").read_text())
    write_model_card(path, CARD)
    m = read_manifest(path)
    assert model_card(m)["localisation"]["per_class"]["Cardiomegaly"]["prior"] == 0.90
    assert below_prior(m) == {"Atelectasis"}
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name != "manifest.json"} == before
    load_bundle(path)  # checksums of weights untouched
    text = "\n".join(card_lines(m))
    assert "Atelectasis: 0.050 / 0.100" in text and BELOW_PRIOR in text and "Mean AUROC: 0.610" in text


def test_explicit_below_prior_list_wins_and_no_card_is_empty(tmp_path):
    assert below_prior({"model_card": {**CARD, "below_prior": ["Mass"]}}) == {"Mass"}
    assert below_prior(None) == frozenset()
    assert card_lines({})[0].startswith("No model card")


def test_card_on_a_broken_bundle_is_refused_and_leaves_it(tmp_path):
    (tmp_path / "x.cxrbundle").mkdir()
    with pytest.raises(BundleError):
        write_model_card(tmp_path / "x.cxrbundle", CARD)
    assert list((tmp_path / "x.cxrbundle").iterdir()) == []


def test_card_curves_are_checked_and_malformed_ones_dropped():
    from cxrviewer.core.model_card import card_curves

    curves = {"roc": {"A": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1], "auc": 0.8},
                      "B": {"fpr": [0, 1], "tpr": [0]}, "C": {"fpr": [0, "x"], "tpr": [0, 1]}},
              "pr": {"A": {"recall": [0, 1], "precision": [1, None], "ap": 0.5, "prevalence": 0.2}},
              "calibration": {"all": {"mean_predicted": [0.1, None], "fraction_positive": [0.2, None],
                                      "ece": 0.1, "count": [3, 0]}}}
    got = card_curves({"model_card": {**CARD, "curves": curves}})
    assert list(got["roc"]) == ["A"] and got["roc"]["A"] == {"x": [0, 0.5, 1], "y": [0, 0.8, 1], "area": 0.8}
    assert got["pr"]["A"]["prevalence"] == 0.2 and got["calibration"]["all"]["count"] == [3, 0]
    assert card_curves({"model_card": CARD}) == {"roc": {}, "pr": {}, "calibration": {}}
    assert card_curves({"model_card": {**CARD, "curves": "junk"}}) == {"roc": {}, "pr": {}, "calibration": {}}
    assert "Curves: ROC, precision-recall, reliability" in "\n".join(card_lines({"model_card": {**CARD,
                                                                                               "curves": curves}}))
