"""``cxr-train localiser``: learns the anatomy-guided localiser from the app pipeline's evidence."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from _tiny_bundles import make_tiny_bundles  # noqa: E402

from cxrviewer.core.explain.registry import ExplainerOutput  # noqa: E402
from cxrviewer.core.explain.segmentation import SegmentationExplainer  # noqa: E402
from training.cli import main  # noqa: E402
from training.phantoms import PhantomConfig, write_phantom_dataset  # noqa: E402


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", 12, size=96, seed=0,
                                 config=PhantomConfig(normal_fraction=0.1))


@pytest.fixture
def lungs(monkeypatch):
    """The tiny random U-Net finds no lungs: two fixed lungs and a heart stand in for its masks."""
    def seg(self, ctx):
        h, w = ctx.map_shape
        m = np.zeros((3, h, w), np.uint8)
        m[0, h // 8:7 * h // 8, w // 10:w // 2 - 2] = 1
        m[1, h // 8:7 * h // 8, w // 2 + 2:9 * w // 10] = 1
        m[2, h // 2:4 * h // 5, 3 * w // 10:2 * w // 3] = 1
        return ExplainerOutput({"masks": m}, {"classes": ["left_lung", "right_lung", "heart"]})

    monkeypatch.setattr(SegmentationExplainer, "compute", seg)


def test_localiser_learns_from_the_pipeline_and_writes_a_model(phantoms, lungs, tmp_path):
    models = tmp_path / "models"
    make_tiny_bundles(models, ("classifier", "segmentation"), input_size=64)
    out = tmp_path / "loc.json"
    rc = main(["localiser", "--data", str(phantoms), "--models", str(models), "--out", str(out),
               "--map-size", "64", "--device", "cpu"])
    assert rc == 0
    model = json.loads(out.read_text())
    assert model["classes"] and model["calibration"] is None  # no held-out folds: no calibration
    for c, m in model["classes"].items():
        assert m["n"] >= 3 and m["sym"]["anchor"] in ("image", "thorax", "heart", "prior") and len(m["sym"]["box"]) == 4
        assert 0.0 <= m["prevalence"] <= 1.0
    assert model["provenance"]["n_boxed"] > 0


def test_localiser_refuses_what_it_cannot_do(phantoms, tmp_path, capsys):
    models = tmp_path / "models"
    make_tiny_bundles(models, ("classifier",), input_size=64)
    assert main(["localiser", "--data", str(phantoms), "--models", str(models), "--out", str(tmp_path / "x.json"),
                 "--device", "cpu"]) == 2
    assert "no segmentation bundle" in capsys.readouterr().err
    make_tiny_bundles(models, ("segmentation",), input_size=64)
    assert main(["localiser", "--data", str(phantoms), "--models", str(models), "--out", str(tmp_path / "x.json"),
                 "--fold-models", str(models), "--device", "cpu"]) == 2
    assert "'{k}'" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_trainers_refuse_a_fold_they_cannot_hold_out(phantoms):
    from training.data import load_records, split_records

    records = load_records(phantoms)
    with pytest.raises(ValueError, match="official"):
        split_records(records, fold=-1, folder=phantoms)  # no official lists: no silent fold 0
    with pytest.raises(ValueError, match="0..4"):
        split_records(records, fold=5, n_folds=5)
    with pytest.raises(SystemExit, match="official"):
        main(["classify", "--data", str(phantoms), "--fold", "-1", "--out", "x.cxrbundle", "--epochs", "1"])
