"""``cxr-train card``: an evaluate metrics.json -> the model card in the bundle's manifest.

End to end on a tiny bundle and an 8-image phantom NIH folder (evaluate, then card), and on a
hand-made metrics.json whose below-prior classes are known.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cxrviewer.core.bundle import load_bundle, read_manifest
from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.model_card import BELOW_PRIOR, below_prior, card_lines, model_card
from training.cli import main
from training.commands.card import card_from_metrics
from training.commands.init_bundle import init_bundle
from training.phantoms import PhantomConfig, write_phantom_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from _tiny_bundles import make_tiny_bundles  # noqa: E402


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(bundle, metrics.json) of ``cxr-train evaluate --fold all`` on 8 phantoms."""
    root = tmp_path_factory.mktemp("card")
    data = write_phantom_dataset(root / "ph", 8, size=96, seed=0, config=PhantomConfig(normal_fraction=0.1))
    clf = make_tiny_bundles(root / "models", ("classifier",), input_size=64)["classifier"]
    assert main(["evaluate", "--data", str(data), "--model", str(clf), "--out", str(root / "ev"), "--fold", "all",
                 "--device", "cpu", "--map-size", "64", "--method", "cam", "gradcam"]) == 0
    return clf, root / "ev" / "metrics.json"


def _tab(acc: dict[str, float | None]) -> dict:
    return {"0.3": {c: {"acc": acc.get(c), "afp": 0.5, "n": 0 if acc.get(c) is None else 4}
                    for c in BOXED_CLASSES}}


def _metrics(cam: dict, prior: dict) -> dict:
    return {"models": {"classifier": {"bundle": "clf.cxrbundle"}}, "data": "nih", "n_images": 10,
            "n_boxed_images": 4, "fold": 0, "n_folds": 5, "seed": 0, "map_size": 256, "command": "cxr-train evaluate",
            "date": "2026-12-03", "auroc": {"Mass": 0.7}, "mean_auroc": 0.7, "boxed_classes": list(BOXED_CLASSES),
            "prior_source": "median box of the training folds' boxes",
            "methods": {"cam": {"title": "CAM", "iou": _tab(cam), "top1": {"iou": _tab(cam)}},
                        "prior": {"title": "prior (fold)", "iou": _tab(prior), "top1": {"iou": _tab(prior)}}}}


def test_below_prior_from_hand_made_metrics():
    m = _metrics({"Mass": 0.2, "Nodule": 0.5, "Effusion": 0.9}, {"Mass": 0.4, "Nodule": 0.5, "Effusion": 0.1})
    card = card_from_metrics(m, "clf.cxrbundle", provenance={"fold": 0, "n_folds": 5})
    assert card["below_prior"] == ["Mass"]  # strictly below; a tie (Nodule) and no data (Atelectasis) are not
    loc = card["localisation"]
    assert loc["method"] == "cam" and loc["t_iou"] == 0.3 and loc["budget"] == "one box per class"
    assert loc["per_class"]["Mass"] == {"method": 0.2, "prior": 0.4, "n": 4, "method_afp": 0.5, "prior_afp": 0.5}
    assert "caveat" not in card and "fold 0 of 5" in card["protocol"] and card["mean_auroc"] == 0.7
    assert card["protocol"].endswith("prior: median box of the training folds' boxes")
    # a bundle trained with another fold held out was tested on its training images: said on the card
    assert "tests on training images" in card_from_metrics(m, "clf.cxrbundle", provenance={"fold": 2})["caveat"]
    # a CIA bundle's card: its boxes, but no AUROC (the pipeline's probabilities are the classifier's)
    m["models"]["cia"] = {"bundle": "cia.cxrbundle"}
    m["methods"]["contrast"] = m["methods"]["cam"]
    cia = card_from_metrics(m, "cia.cxrbundle")
    assert cia["localisation"]["method"] == "contrast" and cia["below_prior"] == ["Mass"]
    assert cia["mean_auroc"] is None and "clf.cxrbundle" in cia["auroc_note"]
    assert any(line.startswith("AUROC: none on this card") for line in card_lines({"model_card": cia}))
    with pytest.raises(ValueError, match="does not use the cia bundle"):
        card_from_metrics(m, "cia.cxrbundle", method="cam")
    with pytest.raises(ValueError, match="did not evaluate other.cxrbundle"):
        card_from_metrics(m, "other.cxrbundle")
    with pytest.raises(ValueError, match="T\\(IoU\\) 0.5 was not evaluated"):
        card_from_metrics(m, "clf.cxrbundle", t_iou=0.5)
    with pytest.raises(ValueError, match="no top3 tables"):
        card_from_metrics(m, "clf.cxrbundle", budget="top3")
    with pytest.raises(ValueError, match="reference"):
        card_from_metrics(m, "clf.cxrbundle", method="prior")


def test_card_end_to_end(evaluated, capsys):
    clf, metrics_path = evaluated
    metrics = json.loads(metrics_path.read_text())
    capsys.readouterr()
    assert main(["card", "--bundle", str(clf), "--metrics", str(metrics_path), "--method", "gradcam",
                 "--t-iou", "0.1", "--budget", "top3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    card = model_card(read_manifest(clf))
    mine, prior = metrics["methods"]["gradcam"]["top3"]["iou"]["0.1"], metrics["methods"]["prior"]["top3"]["iou"]["0.1"]
    want = sorted(c for c in BOXED_CLASSES if mine[c]["acc"] is not None and mine[c]["acc"] < prior[c]["acc"])
    assert sorted(card["below_prior"]) == want == sorted(below_prior(read_manifest(clf))) == sorted(printed["below_prior"])
    assert {c: r["method"] for c, r in card["localisation"]["per_class"].items()} == {c: mine[c]["acc"] for c in BOXED_CLASSES}
    assert {c: r["n"] for c, r in card["localisation"]["per_class"].items()} == {c: mine[c]["n"] for c in BOXED_CLASSES}
    assert card["auroc"] == metrics["auroc"] and card["mean_auroc"] == metrics["mean_auroc"] is not None
    assert metrics["auroc_role"] == "classifier"
    assert card["command"] == metrics["command"] and card["card_command"].startswith("cxr-train card --bundle")
    assert "every image is a test image" in card["caveat"] and card["localisation"]["budget"] == "top-3 boxes per class"
    lines = card_lines(read_manifest(clf))
    assert any(line.startswith("Localisation (gradcam, T(IoU) 0.1, top-3 boxes per class)") for line in lines)
    assert sum(BELOW_PRIOR in line for line in lines) == len(want) and any(line.startswith("Caveat: every image")
                                                                           for line in lines)
    load_bundle(clf)  # the card keeps the bundle loadable
    # the default method: the app's first proposal source among the evaluated ones (CAM before Grad-CAM)
    assert main(["card", "--bundle", str(clf), "--metrics", str(metrics_path)]) == 0
    assert model_card(read_manifest(clf))["localisation"]["method"] == "cam"


@pytest.mark.parametrize("flags, message", [
    (["--method", "attention_mining"], "not in the metrics"),
    (["--method", "prior"], "reference"),
    (["--t-iou", "0.25"], "T(IoU) 0.25 was not evaluated"),
])
def test_card_refuses_what_the_metrics_cannot_give(evaluated, capsys, flags, message):
    clf, metrics_path = evaluated
    before = read_manifest(clf).model_card
    assert main(["card", "--bundle", str(clf), "--metrics", str(metrics_path), *flags]) == 2
    assert message in capsys.readouterr().err and read_manifest(clf).model_card == before


def test_card_for_a_bundle_the_metrics_did_not_evaluate(evaluated, tmp_path, capsys):
    clf, metrics_path = evaluated
    other = init_bundle("msa", tmp_path / "other", kwargs={"backbone": "tiny"}, input_size=64, canonical=False)
    assert main(["card", "--bundle", str(other), "--metrics", str(metrics_path)]) == 2
    assert "did not evaluate" in capsys.readouterr().err and read_manifest(other).model_card is None
    # the same folder name with other weights (retrained since the evaluation) is refused too
    same_name = init_bundle("msa", tmp_path / "x" / "classifier", kwargs={"backbone": "tiny"}, input_size=64,
                            seed=5, canonical=False)
    assert same_name.name == clf.name
    assert main(["card", "--bundle", str(same_name), "--metrics", str(metrics_path)]) == 2
    assert "not the evaluated ones" in capsys.readouterr().err
