"""``cxrviewer analyze`` and ``cxr-train init-bundle`` end to end with random-weight tiny bundles."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _tiny_bundles import make_tiny_bundles
from cxrviewer.__main__ import main
from cxrviewer.core.bundle import load_bundle, read_manifest
from cxrviewer.core.io import load_study
from cxrviewer.core.classes import BOXED_CLASSES
from cxrviewer.core.io.results import read_results, results_summary
from cxrviewer.core.pipeline import Pipeline, assign_roles


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    make_tiny_bundles(d, input_size=128)
    return d


def test_analyze_rg1_writes_three_files(models_dir, rg1_uncr, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", str(rg1_uncr), "--models", str(models_dir), "--out", str(out),
               "--device", "cpu", "--map-size", "128"])
    assert rc == 0
    dirs = [p for p in out.iterdir() if p.name != "predictions.csv"]  # the combined table beside them
    assert [p.name for p in dirs] == [rg1_uncr.stem]  # named after the file, not the pixel hash
    d = dirs[0]
    assert sorted(p.name for p in d.iterdir()) == ["panels.png", "results.h5", "summary.json"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["source_path"] == os.path.abspath(rg1_uncr) and len(summary["pixel_sha256"]) == 64
    for stage in ("preprocess", "alignment", "segmentation", "cam", "gradcam", "attention_mining",
                  "disease_mask", "contrast", "anatomy", "prior", "boxes"):
        assert stage in summary["timings"], stage
    assert set(summary["probabilities"]) == set(summary["classes"]) and len(summary["classes"]) == 14
    assert set(summary["boxes"]) - {"anatomy"} == {"cam", "gradcam", "attention_mining", "contrast", "prior"}
    default = "anatomy" if "anatomy" in summary["boxes"] else "attention_mining"
    assert summary["default_box_method"] == default
    h, w = summary["image_shape"]
    prior = summary["boxes"]["prior"]
    assert [b["label"] for b in prior] == [c for c in summary["classes"] if c in BOXED_CLASSES]
    assert all(b["score"] is None and 0 <= b["x"] and b["x"] + b["w"] <= w and b["y"] + b["h"] <= h for b in prior)
    assert summary["methods"]["prior"]["source"] == "shipped"
    assert summary["device"].startswith("cpu")
    assert summary["methods"]["disease_mask"]["source"] in ("dm", "classifier", "pdm")
    assert summary["models"]["classifier"]["architecture"] == "msa"
    assert capsys.readouterr().out.count("\n") == 1

    # results.h5 reloads to the same arrays a direct pipeline run gives
    back = read_results(d / "results.h5")
    study = load_study(rg1_uncr)
    assert back.study_id == study.study_id == summary["study_id"] and back.pixel_sha256 == study.pixel_sha256()
    pl = Pipeline(assign_roles([load_bundle(p) for p in sorted(models_dir.iterdir())]), "cpu", map_max_side=128)
    ref = pl.run(study)
    np.testing.assert_allclose(back.probabilities, ref.probabilities, rtol=1e-5, atol=1e-6)
    for ex, name in (("cam", "cam"), ("gradcam", "gradcam"), ("attention_mining", "final"), ("contrast", "contrast"),
                     ("disease_mask", "psi"), ("segmentation", "masks"), ("alignment", "aligned_image"),
                     ("alignment", "affine")):
        a, b = np.asarray(back.get(ex, name), np.float64), np.asarray(ref.get(ex, name), np.float64)
        span = float(b.max() - b.min()) or 1.0  # maps are stored native or quantised: within 1e-3 of range
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3 * span, name
    assert [b.label for b in back.boxes["attention_mining"]] == [b.label for b in ref.boxes["attention_mining"]]
    assert [(b.label, b.x, b.w) for b in back.boxes["prior"]] == [(b["label"], b["x"], b["w"]) for b in prior]
    assert results_summary(d / "results.h5")["default_box_method"] == default

    from PIL import Image

    with Image.open(d / "panels.png") as im:
        assert im.width > 500 and im.height > 500


def test_bad_input_reported_and_others_continue(models_dir, rg1_uncr, tmp_path, capsys):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 10)
    out = tmp_path / "out"
    rc = main(["analyze", str(bad), str(rg1_uncr), "--models", str(models_dir), "--out", str(out),
               "--device", "cpu", "--map-size", "64", "--no-panels", "--classes", "Nodule"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.dcm" in err[0]
    (d,) = (p for p in out.iterdir() if p.is_dir())
    assert d.name == rg1_uncr.stem
    assert sorted(p.name for p in d.iterdir()) == ["results.h5", "summary.json"]
    assert "Nodule" in read_results(d / "results.h5").get("attention_mining", "steps")


def test_same_stem_gets_suffix_and_a_rerun_reuses_its_folder(models_dir, rg1_uncr, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "chest.dcm", tmp_path / "b" / "chest.dcm"
    first.write_bytes(rg1_uncr.read_bytes())
    second.write_bytes(rg1_uncr.read_bytes())
    out = tmp_path / "out"
    (out / "chest").mkdir(parents=True)  # an unrelated folder of someone else: never overwritten
    (out / "chest" / "notes.txt").write_text("mine")
    args = ["--models", str(models_dir), "--out", str(out), "--device", "cpu", "--map-size", "64", "--no-panels"]
    assert main(["analyze", str(first), str(second), *args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chest", "chest-2", "chest-3", "predictions.csv"]
    assert [p.name for p in (out / "chest").iterdir()] == ["notes.txt"]
    src = {n: json.loads((out / n / "summary.json").read_text())["source_path"] for n in ("chest-2", "chest-3")}
    assert src == {"chest-2": os.path.abspath(first), "chest-3": os.path.abspath(second)}
    # a rerun of the second file alone reuses its own folder
    assert main(["analyze", str(second), *args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chest", "chest-2", "chest-3", "predictions.csv"]
    capsys.readouterr()


def test_output_names_in_input_order(tmp_path):
    from cxrviewer.cli.analyze import output_names

    srcs = [tmp_path / "x" / "00002578_000.png", tmp_path / "y" / "00002578_000.png", tmp_path / "a b#.dcm"]
    assert output_names(srcs, tmp_path / "out") == ["00002578_000", "00002578_000-2", "a_b"]
    (tmp_path / "out" / "a_b").mkdir(parents=True)
    (tmp_path / "out" / "a_b" / "summary.json").write_text("{not json")
    assert output_names(srcs, tmp_path / "out")[2] == "a_b-2"


def test_missing_models_is_one_line_error(tmp_path, rg1_uncr, capsys):
    rc = main(["analyze", str(rg1_uncr), "--models", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no model bundles" in capsys.readouterr().err


def test_init_bundle_cli(tmp_path):
    from training.cli import main as train_main

    out = tmp_path / "cia"
    rc = train_main(["init-bundle", "--arch", "cia", "--kwargs", '{"backbone": "tiny", "head_channels": 8}',
                     "--out", str(out), "--input-size", "64", "--bank-size", "4"])
    assert rc == 0
    m = read_manifest(tmp_path / "cia.cxrbundle")
    assert m.architecture == "cia" and m.input_size == (64, 64)
    assert m.provenance["trained"] is False and m.provenance["research_demo"] is True
    assert m.extras_info["normal_bank"]["synthetic"] is True
    b = load_bundle(tmp_path / "cia.cxrbundle")
    assert b.extras["normal_bank_images"].shape == (4, 64, 64) and b.extras["normal_bank_codes"].shape == (4, 256)
    assert train_main(["init-bundle", "--arch", "nope", "--out", str(tmp_path / "x")]) == 1
    assert train_main(["init-bundle", "--arch", "unet", "--kwargs", "[1]", "--out", str(tmp_path / "x")]) == 2


def test_init_bundle_with_real_normals(jsrt_dir, tmp_path):
    from training.commands.init_bundle import init_bundle

    p = init_bundle("cia", tmp_path / "cia", kwargs={"backbone": "tiny", "head_channels": 8}, input_size=64,
                    normals=jsrt_dir / "images", bank_size=3)
    b = load_bundle(p)
    assert b.manifest.extras_info["normal_bank"]["synthetic"] is False
    assert [str(i) for i in b.extras["normal_bank_ids"]][0].startswith("JPC")


def test_init_bundle_bank_from_canonical_chest(tmp_path):
    from PIL import Image

    from training.commands.init_bundle import init_bundle

    yy, xx = np.mgrid[0:80, 0:80]
    canon = tmp_path / "canonical_chest.png"
    Image.fromarray((((xx - 40) ** 2 + (yy - 40) ** 2 < 900) * 200 + 30).astype(np.uint8)).save(canon)
    p = init_bundle("cia", tmp_path / "cia", kwargs={"backbone": "tiny", "head_channels": 8}, input_size=64,
                    bank_size=3, canonical=canon)
    b = load_bundle(p)
    assert b.manifest.canonical_chest["file"] == "canonical_chest.png"
    assert len(b.manifest.canonical_chest["sha256"]) == 64
    assert b.manifest.extras_info["normal_bank"]["synthetic"] is True
    bank = b.extras["normal_bank_images"].astype(float)
    assert bank[:, 32, 32].mean() > 180 and bank[:, 2, 2].mean() < 80  # the disc survives the jitter


def test_analyze_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and "NAME-2" in text


def _strict_json(text: str):
    """``json.loads`` that refuses the non-JSON tokens NaN, Infinity and -Infinity."""
    def refuse(token):
        raise ValueError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json_when_numbers_are_not_finite(rg1_uncr, tmp_path, monkeypatch, capsys):
    """NaN/Inf probabilities and timings are written as null, never as bare NaN tokens."""
    from cxrviewer.core.geometry import Box
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.results import Results

    class NaNPipeline:
        bundles: dict = {}

        def run(self, study):
            r = Results(study_id=study.study_id, source_path=str(rg1_uncr), pixel_sha256=study.pixel_sha256(),
                        image_shape=study.shape, map_shape=(8, 8), classes=tuple(BOXED_CLASSES[:3]), device="cpu")
            r.probabilities = np.array([np.nan, np.inf, 0.5], np.float32)
            r.timings = {"preprocess": float("nan"), "cam": float("inf")}
            r.boxes = {"cam": [Box(BOXED_CLASSES[0], 1.0, 2.0, 3.0, 4.0, score=0.5)]}
            return r

    monkeypatch.setattr(Pipeline, "from_dirs", classmethod(lambda cls, *a, **k: NaNPipeline()))
    out = tmp_path / "out"
    rc = main(["analyze", str(rg1_uncr), "--models", str(tmp_path), "--out", str(out), "--no-panels"])
    assert rc == 0, capsys.readouterr().err
    text = (out / rg1_uncr.stem / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = _strict_json(text)
    assert summary["probabilities"] == {BOXED_CLASSES[0]: None, BOXED_CLASSES[1]: None, BOXED_CLASSES[2]: 0.5}
    assert summary["timings"] == {"preprocess": None, "cam": None} and summary["total_seconds"] is None
    assert summary["boxes"]["cam"][0]["score"] == 0.5 and summary["boxes"]["cam"][0]["x"] == 1.0


def test_analyze_refuses_a_model_with_non_finite_weights(rg1_uncr, tmp_path, capsys):
    """A bundle whose weights hold NaN: one line naming the bundle and the tensor, exit 2, no traceback."""
    import hashlib

    import torch

    from cxrviewer.core.bundle import MANIFEST, WEIGHTS

    paths = make_tiny_bundles(tmp_path / "models", roles=("classifier",), input_size=64)
    p = paths["classifier"]
    state = torch.load(p / WEIGHTS, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    torch.save(state, p / WEIGHTS)
    d = json.loads((p / MANIFEST).read_text())
    data = (p / WEIGHTS).read_bytes()
    d["files"][WEIGHTS] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (p / MANIFEST).write_text(json.dumps(d))
    rc = main(["analyze", str(rg1_uncr), "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"),
               "--device", "cpu", "--no-panels"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and f"weights tensor '{name}' holds NaN" in err and str(p) in err
    assert "Traceback" not in err


def test_threads_option_sets_the_models_threads_and_refuses_a_negative_count(models_dir, rg1_uncr, tmp_path,
                                                                            capsys):
    import torch

    rc = main(["analyze", str(rg1_uncr), "--models", str(models_dir), "--out", str(tmp_path / "bad"),
               "--threads", "-1"])
    assert rc == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    rc = main(["analyze", str(rg1_uncr), "--models", str(models_dir), "--out", str(tmp_path / "o"),
               "--device", "cpu", "--map-size", "64", "--no-panels", "--threads", "1", "--quiet"])
    assert rc == 0 and torch.get_num_threads() == 1
    assert (tmp_path / "o" / rg1_uncr.stem / "results.h5").is_file()
