"""benchmarks/nih_localization.py: pooling over folds, the papers' rows and the partial-run doc (no data)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tab(acc: float, n: int) -> dict:
    return {t: {c: {"acc": acc, "afp": 0.0, "n": n} for c in BOXED_CLASSES}
            for t in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")}


def _fold(f: int, acc: float, n: int) -> dict:
    res = {"iou": _tab(acc, n), "iobb": _tab(acc, n), "floor_iou": _tab(0.5, n), "floor_iobb": _tab(0.5, n),
           "auroc": {c: 0.6 + 0.1 * f for c in CLASSES}, "mean_auroc": 0.6 + 0.1 * f, "train_s": 1.0}
    return {"fold": f, "n_train": 10, "n_test": 5, "n_test_boxed": n, "n_train_boxed": 3, "wall_s": 2.0,
            "methods": {"cam": res}}


def test_pool_weights_folds_by_boxed_images():
    bench = _load("nih_localization")
    pooled = bench.pool([_fold(0, 1.0, 3), _fold(1, 0.0, 1)], "cam")
    assert abs(pooled["0.3"]["Mass"]["acc"] - 0.75) < 1e-9 and pooled["0.3"]["Mass"]["n"] == 4
    assert bench.pool([_fold(0, 1.0, 3)], "floor")["0.7"]["Nodule"]["acc"] == 0.5
    summ = bench.auroc_summary([_fold(0, 1.0, 3), _fold(1, 0.0, 1)], "cam")
    assert abs(summ["Mean"]["mean"] - 0.65) < 1e-9


def test_paper_rows_have_eight_classes_and_a_mean():
    papers = _load("_nih_paper_numbers").PAPERS
    assert {"0.3", "0.5", "0.7"} <= set(next(p for p in papers if "CIA-Net 40%" in p["name"])["iou"])
    for p in papers:
        assert p["source"]
        for t, vals in p["iou"].items():
            assert len(vals) == 9, (p["name"], t)
            if t not in p.get("mean_as_printed_differs", ()):  # printed means agree with their values
                assert abs(vals[-1] - sum(vals[:-1]) / 8) <= 0.015, (p["name"], t)
        if "auroc" in p:
            assert set(p["auroc"]) == set(CLASSES) | {"Mean"}


def test_partial_run_doc_says_so(tmp_path):
    bench = _load("nih_localization")
    out = tmp_path / "res"
    out.mkdir()
    (out / "fold0.json").write_text(json.dumps(_fold(0, 0.25, 2)))
    meta = {"command": "python benchmarks/nih_localization.py --config cpu", "config": "cpu",
            "conf": {"methods": ["cam"]}, "data": "nih", "n_images": 10, "n_boxed": 4, "n_patients": 8,
            "n_folds": 5, "resume_command": "python benchmarks/nih_localization.py --config cpu --folds FOLDS",
            "out_dir_rel": "res", "omp_threads": "1", "device": "cpu", "limit": 0}
    summary = bench.summarise(out, meta)
    md = tmp_path / "doc.md"
    bench.write_doc(summary, md, _load("_nih_paper_numbers").PAPERS)
    text = md.read_text()
    assert "PARTIAL RUN: 1 of 5 folds ran" in text and "--folds 1,2,3,4" in text
    assert "| ours: baseline CAM | 0.25 |" in text and "paper: CIA-Net 80% boxes" in text
