"""``cxrviewer --self-test`` unfrozen: every check passes, the report is JSON, failures give exit 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrviewer import selftest

REPO = Path(__file__).resolve().parents[2]
SELFTEST_DIR = REPO / "resources" / "selftest"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


def test_selftest_cli_passes_and_reports_json(tmp_path: Path) -> None:
    out_file = tmp_path / "report.json"
    env = {**_env(), "CXRVIEWER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-m", "cxrviewer", "--self-test", "--tiny", "--json-out", str(out_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out_file.read_text(encoding="utf-8"))
    assert report["ok"] is True and report["failed"] == []
    names = [c["name"] for c in report["checks"]]
    for required in ("environment", "decoder_plugins", "pipeline", "annotations", "qt"):
        assert required in names
    manifest = json.loads((SELFTEST_DIR / "manifest.json").read_text(encoding="utf-8"))
    decoded = {c["transfer_syntax"] for c in report["checks"] if c["name"].startswith("decode:")}
    assert decoded == {e["transfer_syntax"] for e in manifest["files"]}
    assert all(isinstance(c["seconds"], float) for c in report["checks"])
    assert report["versions"]["torch"] and report["versions"]["pydicom"]
    assert report["frozen"] is False
    pipe = next(c for c in report["checks"] if c["name"] == "pipeline")
    assert pipe["models"] == "tiny-random" and "classifier" in pipe["bundles"]
    assert "main_window" in next(c for c in report["checks"] if c["name"] == "qt")
    log_file = tmp_path / "logs" / "cxrviewer.log"  # the verdict stays where a windowed build's user finds it
    assert report["log_file"] == str(log_file)
    assert "self-test passed" in log_file.read_text(encoding="utf-8")
    assert "self-test passed" not in proc.stderr  # stderr keeps only warnings, as before


def test_selftest_files_cover_each_codec_and_stay_small() -> None:
    manifest = json.loads((SELFTEST_DIR / "manifest.json").read_text(encoding="utf-8"))
    files = manifest["files"]
    syntaxes = {e["transfer_syntax"] for e in files}
    # RLE, JPEG 2000 (lossless + lossy), JPEG lossless (SV1 + process 14), JPEG-LS (both), JPEG baseline
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.50"} <= syntaxes
    total = sum((SELFTEST_DIR / e["file"]).stat().st_size for e in files)
    assert total < 1_000_000
    assert syntaxes <= set(selftest.EXPECTED_PLUGIN)


def test_failed_check_is_reported_not_raised() -> None:
    rep = selftest._Report()

    def boom() -> None:
        raise RuntimeError("decoder missing")

    assert rep.run("good", lambda: {"x": 1}) is True
    assert rep.run("bad", boom) is False
    assert rep.ok is False
    bad = rep.checks[1]
    assert bad["ok"] is False and "decoder missing" in bad["error"] and bad["seconds"] >= 0


def test_lossless_mismatch_fails_the_decode_check(tmp_path: Path) -> None:
    manifest = json.loads((SELFTEST_DIR / "manifest.json").read_text(encoding="utf-8"))
    entry = dict(next(e for e in manifest["files"] if e["file"] == "rle_lossless.dcm"))
    entry["pixels_sha256"] = "0" * 64
    with pytest.raises(RuntimeError, match="differs from the reference"):
        selftest.decode_check(SELFTEST_DIR, manifest, entry)()


def test_pipeline_check_accepts_a_folder_with_only_some_roles(tmp_path: Path) -> None:
    from training.commands.init_bundle import init_bundle

    models = tmp_path / "models"
    init_bundle("unet", models / "seg.cxrbundle", kwargs={"width": 4, "depth": 3}, input_size=64, canonical=False)
    study = SELFTEST_DIR / "rle_lossless.dcm"
    out = selftest.pipeline_check(models, False, tmp_path, study)()
    assert out["models"] == "given" and out["bundles"] == ["segmentation"]


def test_selftest_pipeline_uses_core_only(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cxrviewer import selftest\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        f"study = Path({str(SELFTEST_DIR / 'rle_lossless.dcm')!r})\n"
        "out = selftest.pipeline_check(None, True, tmp, study)()\n"
        "assert out['models'] == 'tiny-random', out\n"
        "assert sorted(out['bundles']) == ['alignment', 'cia', 'classifier', 'segmentation'], out\n"
        "loaded = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
