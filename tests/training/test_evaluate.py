"""training/evaluate.py and ``cxr-train evaluate``: the app's pipeline scored on phantoms.

Every explainer that proposes boxes is scored (a toy one registered here too, without touching
training/evaluate.py, and the fixed-box prior), boxes are compared with the ground truth in
original pixels, the floor sits beside every method, and the command's folds (N, all, -1) behave as documented.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.classes import BOXED_CLASSES, CLASSES
from cxrviewer.core.explain import get_explainer
from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.gradcam import grad_cam
from cxrviewer.core.explain.metrics import localization_table
from cxrviewer.core.explain.prior import SHIPPED_TITLE
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, register_explainer,
                                             unregister_explainer)
from cxrviewer.core.geometry import Box
from cxrviewer.core.io import read_nih_folder
from cxrviewer.core.pipeline import Pipeline
from training.cli import main
from training.commands.init_bundle import init_bundle
from training.data import load_records, patient_folds
from training.evaluate import FLOOR_TITLE, evaluate_pipeline, markdown_tables, single_model_boxes
from training.phantoms import PhantomConfig, write_phantom_dataset

SIZE = 96  # phantom pixels: differs from the maps' 64 px and the network's 64 px input


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", 8, size=SIZE, seed=0,
                                 config=PhantomConfig(normal_fraction=0.1))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return init_bundle("msa", tmp_path_factory.mktemp("models") / "clf", kwargs={"backbone": "tiny"},
                       input_size=64, canonical=False)


#: file name -> ground-truth boxes (original pixels) the oracle method draws
_TRUTH: dict[str, list[Box]] = {}


class _Oracle(Explainer):
    """A toy method that draws the ground-truth boxes into its map (at map resolution), so its
    boxes match the ground truth only when they are brought back to original pixels."""

    title = "oracle"
    requires = ("classifier",)
    maps = (MapSpec("p", "p", "probability"),)
    box_rule = BoxRule("grid", 0.5)
    box_map = "p"

    def compute(self, ctx):
        res = ctx.results
        (h, w), (mh, mw) = res.image_shape, ctx.map_shape
        p = np.zeros((len(res.classes), mh, mw), np.float32)
        for b in _TRUTH.get(Path(res.source_path).name, []):
            p[res.classes.index(b.label), int(b.y * mh / h):int(np.ceil(b.y2 * mh / h)),
              int(b.x * mw / w):int(np.ceil(b.x2 * mw / w))] = 1.0
        return ExplainerOutput({"p": p})


@pytest.fixture
def toy_method():
    register_explainer("toy_oracle")(_Oracle)
    try:
        yield "toy_oracle"
    finally:
        unregister_explainer("toy_oracle")


def _refs(folder):
    return list(read_nih_folder(folder))


def test_every_box_method_is_scored_in_original_pixels(phantoms, classifier, toy_method):
    pl = Pipeline({"classifier": load_bundle(classifier)}, "cpu", map_max_side=64)
    refs = _refs(phantoms)
    _TRUTH.update({r.path.name: r.gt_boxes for r in refs})
    res = evaluate_pipeline(pl, refs, train_boxes=[b for r in refs for b in r.gt_boxes])
    assert set(res["methods"]) == {"cam", "gradcam", "attention_mining", "toy_oracle", "prior"}
    assert res["n_images"] == 8 and res["n_boxed_images"] == sum(bool(r.gt_boxes) for r in refs) > 0
    assert set(res["auroc"]) == set(CLASSES) and res["classes"] == list(CLASSES)
    for tab in ("floor_iou", "floor_iobb"):
        assert set(res[tab]["0.1" if tab == "floor_iou" else "0.25"]) == set(BOXED_CLASSES)
    # the oracle's boxes (drawn at 64 px, read back at 96 px) hit every boxed class
    row = res["methods"]["toy_oracle"]["iou"]["0.5"]
    assert all(row[c]["acc"] == 1.0 and row[c]["afp"] == 0.0 for c in BOXED_CLASSES if row[c]["n"])
    gts = {r.key: r.gt_boxes for r in refs if r.gt_boxes}
    # CAM is scored on exactly the boxes the pipeline proposes for the app
    preds = {r.key: pl.run(r.load()).boxes["cam"] for r in refs if r.gt_boxes}
    want = localization_table(preds, gts, metric="iou")[0.3]
    assert {c: v["acc"] for c, v in res["methods"]["cam"]["iou"]["0.3"].items()} == \
        {c: (None if np.isnan(v.accuracy) else v.accuracy) for c, v in want.items()}
    md = markdown_tables(res, title="t")
    # one table per budget (one box, top-3, every box) and overlap; a row block per method, the floor last
    assert md.count("| method | T(IoU) |") == 3 and md.count("| method | T(IoBB) |") == 3 and "AUROC per class" in md
    assert md.count("| oracle (`toy_oracle`) | 0.1 |") == 6 and md.count(f"| {FLOOR_TITLE} | 0.1 |") == 6
    # the shipped prior (all NIH boxes) is a method row, labelled as optimistic, before the honest floor
    assert res["methods"]["prior"]["title"] == SHIPPED_TITLE
    assert md.index(f"| {SHIPPED_TITLE} (`prior`) | 0.1 |") < md.index(f"| {FLOOR_TITLE} | 0.1 |")


def test_methods_restrict_and_the_floor_per_image(phantoms, classifier):
    pl = Pipeline({"classifier": load_bundle(classifier)}, "cpu", map_max_side=64)
    refs = _refs(phantoms)
    res = evaluate_pipeline(pl, refs, methods=["cam"], train_boxes={r.key: r.gt_boxes for r in refs})
    assert list(res["methods"]) == ["cam"]
    # each image's floor from its own boxes (a deliberate leak) hits every boxed class
    row = res["floor_iou"]["0.7"]
    assert all(row[c]["acc"] == 1.0 for c in BOXED_CLASSES if row[c]["n"])
    assert "floor_iou" not in evaluate_pipeline(pl, refs[:2], methods=["cam"])
    with pytest.raises(ValueError, match="proposes no boxes"):
        evaluate_pipeline(pl, refs[:1], methods=["segmentation"])
    with pytest.raises(ValueError, match="needs the role"):
        evaluate_pipeline(pl, refs[:1], methods=["contrast"])


def test_cli_folds(phantoms, classifier, tmp_path, capsys):
    base = ["evaluate", "--data", str(phantoms), "--device", "cpu", "--map-size", "64"]
    assert main([*base, "--model", str(classifier), "--out", str(tmp_path / "all"), "--fold", "all"]) == 0
    res = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert res["n_images"] == 8 and res["fold"] == "all" and "other folds" in res["floor_source"]
    assert res["floor"]["iou"] == res["floor_iou"] and res["floor"]["title"] == FLOOR_TITLE
    assert set(res["methods"]) == {"cam", "gradcam", "attention_mining", "prior"} and "floor_iou" in res
    # --fold all keeps the prior (from the other folds, per image) and the floor in the tables
    assert "other folds" in res["methods"]["prior"]["title"] and "other folds" in res["prior_source"]
    tables = (tmp_path / "all" / "tables.md").read_text()
    assert f"| {res['methods']['prior']['title']} (`prior`) | 0.1 |" in tables and f"| {FLOOR_TITLE} | 0.1 |" in tables
    assert res["command"].startswith("cxr-train evaluate --data") and "--fold all" in res["command"]
    assert res["models"]["classifier"]["architecture"] == "msa"
    assert "Grad-CAM (`gradcam`)" in (tmp_path / "all" / "tables.md").read_text()

    models = classifier.parent
    assert main([*base, "--models", str(models), "--out", str(tmp_path / "f0"), "--fold", "0",
                 "--method", "cam", "attention_mining"]) == 0
    res = json.loads((tmp_path / "f0" / "metrics.json").read_text())
    records = load_records(phantoms)
    assert res["n_images"] == int((patient_folds(records, 5, 0) == 0).sum())
    assert list(res["methods"]) == ["cam", "attention_mining", "prior"]  # the prior always comes along
    assert res["methods"]["prior"]["title"] == "prior (median box of the training folds' boxes (all but fold 0 of 5))"
    capsys.readouterr()

    assert main([*base, "--model", str(classifier), "--out", str(tmp_path / "off"), "--fold", "-1"]) == 2
    err = capsys.readouterr().err
    assert "test_list.txt" in err and "--fold -1" in err and not (tmp_path / "off").exists()
    assert main([*base, "--model", str(phantoms), "--out", str(tmp_path / "x")]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--model", str(classifier), "--out", str(tmp_path / "x"), "--method", "segmentation"])


@pytest.mark.parametrize("flags, message", [
    (["--fold", "7", "--n-folds", "5"], "--fold 7 is not one of 0..4"),
    (["--n-folds", "1"], "need at least 2 folds"),
    (["--fold", "all", "--n-folds", "0"], "need at least 2 folds"),
    (["--fold", "-1"], "no official train_val_list.txt"),
    (["--fold", "-1", "--seed", "3"], "--seed have no effect with --fold -1"),
    (["--fold", "20", "--n-folds", "50"], "fold 20 holds no images"),
    (["--map-size", "0"], "--map-size 0"),
])
def test_cli_unmeetable_requests_exit_2(phantoms, classifier, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    code = main(["evaluate", "--data", str(phantoms), "--device", "cpu", "--model", str(classifier),
                 "--out", str(out), *flags])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_cli_two_bundles_of_one_role_is_an_error(phantoms, classifier, tmp_path, capsys):
    other = init_bundle("msa", tmp_path / "clf2", kwargs={"backbone": "tiny"}, input_size=64, canonical=False)
    assert main(["evaluate", "--data", str(phantoms), "--device", "cpu", "--model", str(classifier),
                 "--model", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "no pipeline role left for" in capsys.readouterr().err


def test_cli_method_prior_alone(phantoms, classifier, tmp_path):
    assert main(["evaluate", "--data", str(phantoms), "--device", "cpu", "--model", str(classifier), "--map-size",
                 "64", "--out", str(tmp_path / "p"), "--fold", "all", "--method", "prior"]) == 0
    res = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert list(res["methods"]) == ["prior"] and res["mean_auroc"] is not None  # AUROC still from the classifier
    prior = res["methods"]["prior"]
    assert {"iou", "iobb", "top1", "top3"} <= set(prior) and "floor_iou" in res
    assert sum(r["n"] for r in prior["top1"]["iou"]["0.1"].values()) > 0


def test_cli_alignment_bundle_alone(phantoms, tmp_path):
    from PIL import Image

    from cxrviewer.core.models import create_model
    from training.trainers.align import save_alignment_bundle

    canon = tmp_path / "canonical_chest.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).save(canon)
    path = save_alignment_bundle(create_model("alignment", backbone="tiny"), tmp_path / "al", canonical=canon,
                                 input_size=64, provenance={"command": "test"})
    assert main(["evaluate", "--data", str(phantoms), "--model", str(path), "--out", str(tmp_path / "o"),
                 "--fold", "all", "--device", "cpu"]) == 0
    assert "phantom" in json.loads((tmp_path / "o" / "metrics.json").read_text())
    # flags that do nothing for a lone alignment bundle are refused
    for flag in (["--method", "cam"], ["--map-size", "64"]):
        assert main(["evaluate", "--data", str(phantoms), "--model", str(path), "--out", str(tmp_path / "o2"),
                     "--fold", "all", "--device", "cpu", *flag]) == 2


def test_single_model_gradcam_is_one_forward_and_the_registry_rule():
    from cxrviewer.core.models import create_model

    torch.manual_seed(0)
    model = create_model("msa", backbone="tiny").eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(1, 64, 64) * 2 - 1
    probs, boxes = single_model_boxes(model, x, [0, 2], "gradcam")
    assert len(calls) == 1 and probs.shape == (len(CLASSES),)
    rule = get_explainer("gradcam").box_rule
    want = [b for c in (0, 2) for b in rule(grad_cam(model, x[None], model.feature_layer(), c)[0],
                                            label=CLASSES[c], image_size=(64, 64))]
    assert [(b.label, b.x, b.y, b.w, b.h) for b in boxes] == [(b.label, b.x, b.y, b.w, b.h) for b in want]
    _, am = single_model_boxes(model, x, [1], "am", steps=2)  # the short name of attention_mining
    assert 1 <= len(am) <= 3 and all(b.label == CLASSES[1] for b in am)


def test_evaluate_model_on_a_dataset_renders_like_the_pipeline():
    from cxrviewer.core.models import create_model
    from training.evaluate import evaluate_model

    torch.manual_seed(0)
    model = create_model("cam_classifier", backbone="tiny").eval()
    boxes = torch.tensor([[1, 10.0, 20.0, 30.0, 24.0]])
    ds = [{"image": torch.rand(1, 64, 64) * 2 - 1, "labels": torch.eye(len(CLASSES))[i % 2 + 1],
           "boxes": boxes if i % 2 == 0 else torch.zeros(0, 5)} for i in range(4)]
    res = evaluate_model(model, ds, method="cam", train_boxes=[Box("Cardiomegaly", 10, 20, 30, 24)])
    assert res["method"] == "cam" and res["n_boxed_images"] == 2 and res["mean_auroc"] is not None
    assert res["floor_iou"]["0.7"]["Cardiomegaly"]["acc"] == 1.0  # the floor box is the GT box here
    assert res["top1"]["iou"]["0.7"]["Cardiomegaly"]["n"] == 2 and "iobb" in res["top3"]
    md = markdown_tables(res)
    assert "| Class activation map (CAM) (`cam`) | 0.1 |" in md and f"| {FLOOR_TITLE} | 0.1 |" in md
