"""``cxr-train evaluate``'s curves (PNG, csv, json) and predictions.csv (training/eval_outputs.py).

The AUROC recomputed from predictions.csv equals the table's (metrics.json) to 1e-6, on
phantoms with a tiny untrained model and (marked ``shared``) on the real NIH folder, fold 0.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.explain.metrics import iou
from cxrviewer.core.geometry import Box
from cxrviewer.core.io import read_nih_folder
from training.cli import main
from training.commands.init_bundle import init_bundle
from training.eval_outputs import PREDICTION_FIELDS, read_predictions
from training.phantoms import PhantomConfig, write_phantom_dataset

FILES = {"metrics.json", "tables.md", "predictions.csv", "curves.json", "roc.csv", "pr.csv", "calibration.csv",
         "roc.png", "pr.png", "calibration.png"}


def _pairwise_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """AUROC by counting (positive, negative) pairs, ties 1/2: independent of the code under test."""
    pos, neg = s[y > 0.5], s[y <= 0.5]
    if not pos.size or not neg.size:
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def auroc_from_csv(path: Path) -> dict[str, float]:
    """Per class, the AUROC of predictions.csv's probability against its label."""
    by: dict[str, list[tuple[float, int]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            by[r["class"]].append((float(r["probability"]), int(r["label"])))
    return {c: _pairwise_auroc(np.array([p for p, _ in v]), np.array([y for _, y in v])) for c, v in by.items()}


def check_outputs(out: Path) -> dict:
    """The checks shared by the phantom and the real-data runs; returns metrics.json."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert FILES <= {p.name for p in out.iterdir()} and set(metrics["outputs"]) == FILES - {"metrics.json", "tables.md"}
    recomputed = auroc_from_csv(out / "predictions.csv")
    assert set(recomputed) == set(metrics["auroc"])
    diffs = [abs(recomputed[c] - v) for c, v in metrics["auroc"].items() if v is not None]
    assert diffs and max(diffs) <= 1e-6
    assert all(np.isnan(recomputed[c]) for c, v in metrics["auroc"].items() if v is None)
    full = json.loads((out / "curves.json").read_text())
    for c, v in metrics["auroc"].items():  # the curves' areas are the table's AUROC
        assert (full["roc"][c]["auc"] is None) == (v is None)
        if v is not None:
            assert abs(full["roc"][c]["auc"] - v) <= 1e-9 and metrics["curves"]["roc"][c]["auc"] == full["roc"][c]["auc"]
            assert len(metrics["curves"]["roc"][c]["fpr"]) <= 101
    tables = (out / "tables.md").read_text()
    assert "Average precision per class" in tables and "Also written: predictions.csv, curves.json" in tables
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == metrics["n_images"] * len(metrics["auroc"])
    assert sum(full["calibration"]["all"]["count"]) == len(rows)
    with open(out / "roc.csv", newline="") as fh:
        roc = list(csv.DictReader(fh))
    assert {r["class"] for r in roc} == set(metrics["auroc"]) and list(roc[0]) == ["class", "threshold", "fpr", "tpr"]
    for name in ("roc.png", "pr.png", "calibration.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 400
    return metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("out")
    ph = write_phantom_dataset(base / "ph", 8, size=96, seed=0, config=PhantomConfig(normal_fraction=0.1))
    clf = init_bundle("msa", base / "models" / "clf", kwargs={"backbone": "tiny"}, input_size=64, canonical=False)
    out = base / "eval"
    assert main(["evaluate", "--data", str(ph), "--device", "cpu", "--map-size", "64", "--model", str(clf),
                 "--out", str(out), "--fold", "all", "--method", "cam", "attention_mining"]) == 0
    return ph, clf, out


def test_curves_and_predictions_match_the_tables(run):
    ph, _, out = run
    metrics = check_outputs(out)
    assert metrics["n_images"] == 8 and metrics["predictions_method"] == "attention_mining"
    assert set(metrics["average_precision"]) == set(CLASSES) and 0 <= metrics["ece"] <= 1
    rows = read_predictions(out / "predictions.csv")
    with open(out / "predictions.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == PREDICTION_FIELDS
    # each box's IoU is its best IoU with the official boxes of the class on the study
    gts = {r.key: r.load().gt_boxes for r in read_nih_folder(ph)}
    checked = 0
    for r in rows:
        mine = [g for g in gts[r["study"]] if g.label == r["class"]]
        assert r["n_gt_boxes"] == len(mine)
        if r["box_x"] is None or not mine:
            assert r["iou"] is None
            continue
        box = Box(r["class"], r["box_x"], r["box_y"], r["box_w"], r["box_h"])
        assert r["iou"] == pytest.approx(max(iou(box, g) for g in mine), abs=1e-12)
        checked += 1
    assert checked > 0
    # the one-box-per-class table scores exactly these boxes: its hits are the rows with IoU above T
    top1 = metrics["methods"]["attention_mining"]["top1"]["iou"]
    for t in ("0.1", "0.3"):
        for c, cell in top1[t].items():
            hits = sum(1 for r in rows if r["class"] == c and r["n_gt_boxes"] and (r["iou"] or 0) > float(t))
            assert cell["hits"] == hits, (t, c)


def test_predictions_method_flag(run, tmp_path, capsys):
    ph, clf, _ = run
    base = ["evaluate", "--data", str(ph), "--device", "cpu", "--map-size", "64", "--model", str(clf),
            "--fold", "all", "--method", "cam"]
    assert main([*base, "--out", str(tmp_path / "a"), "--predictions-method", "attention_mining"]) == 2
    assert "--predictions-method attention_mining is not among the scored methods" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*base, "--out", str(tmp_path / "b"), "--predictions-method", "prior"]) == 0
    rows = read_predictions(tmp_path / "b" / "predictions.csv")
    assert {r["method"] for r in rows} == {"prior"}
    assert any(r["box_x"] is not None for r in rows)


@pytest.mark.shared
@pytest.mark.slow
def test_real_nih_fold0_auroc_from_the_csv(nih_dir, tmp_path):
    """The bundled classifier on the real NIH fold 0 (every method; several minutes on a CPU)."""
    model = Path(__file__).resolve().parents[2] / "resources" / "models" / "nih-classifier.cxrbundle"
    out = tmp_path / "nih"
    assert main(["evaluate", "--data", str(nih_dir), "--model", str(model), "--fold", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    metrics = check_outputs(out)
    assert metrics["n_images"] > 100 and metrics["mean_auroc"] > 0.5


def test_card_carries_the_curves_and_the_core_reads_them(run, tmp_path):
    import shutil

    from cxrviewer.core.bundle import load_bundle, read_manifest
    from cxrviewer.core.model_card import card_curves, card_lines, write_model_card
    from training.commands.card import CARD_POINTS, card_from_metrics

    _, clf, out = run
    bundle = shutil.copytree(clf, tmp_path / clf.name)
    metrics = json.loads((out / "metrics.json").read_text())
    card = card_from_metrics(metrics, clf.name)
    write_model_card(bundle, card)
    curves = card_curves(read_manifest(bundle))
    assert set(curves["roc"]) == set(CLASSES) and set(curves["pr"]) == set(CLASSES) and "all" in curves["calibration"]
    for c, v in metrics["auroc"].items():
        assert curves["roc"][c]["area"] == v and len(curves["roc"][c]["x"]) <= CARD_POINTS
        assert curves["pr"][c]["area"] == metrics["average_precision"][c]
    assert curves["calibration"]["all"]["area"] == metrics["ece"]
    assert (bundle / "manifest.json").stat().st_size < 120_000
    load_bundle(bundle)  # still loadable
    text = "\n".join(card_lines(read_manifest(bundle)))
    assert "average precision" in text and "expected calibration error" in text and "Curves: ROC" in text
    # a card whose AUROC is another bundle's carries no curves
    other = {**metrics, "auroc_role": "dm", "models": {**metrics["models"], "dm": {"bundle": "dm.cxrbundle"}}}
    assert "curves" not in card_from_metrics(other, clf.name)


@pytest.mark.shared
def test_real_nih_fold0_subset_auroc_from_the_csv(nih_dir, tmp_path):
    """The bundled classifier on 24 studies of the real NIH fold 0 (every 8th), scored with the prior
    only (the classifier's one forward gives the probabilities): a quick version of the test above."""
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.pipeline import Pipeline
    from training.commands.evaluate import _pipeline_methods
    from training.data import load_records, patient_folds
    from training.evaluate import evaluate_pipeline, write_report

    model = Path(__file__).resolve().parents[2] / "resources" / "models" / "nih-classifier.cxrbundle"
    records = load_records(nih_dir)
    fold0 = {r.key for r, f in zip(records, patient_folds(records, 5, 0)) if f == 0}
    refs = [r for r in read_nih_folder(nih_dir) if r.key in fold0][::8][:24]
    pl = Pipeline({"classifier": load_bundle(model)}, "cpu", map_max_side=128, methods=_pipeline_methods(["prior"]))
    result = evaluate_pipeline(pl, refs, methods=["prior"])
    write_report(result, tmp_path, title="subset")
    metrics = check_outputs(tmp_path)
    assert metrics["n_images"] == 24 and metrics["predictions_method"] == "prior"
    assert sum(v is not None for v in metrics["auroc"].values()) >= 5
