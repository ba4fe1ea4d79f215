"""Build the frozen app with PyInstaller and run its self-test (slow: ~10-20 min, several GB of disk).

Marked ``slow``: deselected by default (pyproject's ``addopts``), run with::

    .venv/bin/python -m pytest tests/packaging/test_frozen_build.py -m slow

``CXRVIEWER_BUILD_VARIANT`` picks cpu (default) or cuda. ``CXRVIEWER_FROZEN_BUNDLE=dist/cpu/cxrviewer``
skips the build and self-tests an existing bundle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # builds the PyInstaller bundle (minutes, several GB)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "SYSTEMROOT", "USERPROFILE")}
    env["PATH"] = os.pathsep.join([r"C:\Windows\System32"] if sys.platform == "win32" else ["/usr/bin", "/bin"])
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="module")
def bundle() -> Path:
    given = os.environ.get("CXRVIEWER_FROZEN_BUNDLE")
    if given:
        return Path(given).resolve()
    variant = os.environ.get("CXRVIEWER_BUILD_VARIANT", "cpu")
    proc = subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--variant", variant],
                          cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads((REPO / "dist" / variant / "build-report.json").read_text(encoding="utf-8"))
    assert report["ok"] and report["licences_ok"] and report["selftest_exit"] == 0
    return Path(report["bundle"])


def test_frozen_selftest_outside_the_source_tree(bundle: Path, tmp_path: Path) -> None:
    exe = bundle / ("cxrviewer-cli.exe" if sys.platform == "win32" else "cxrviewer")
    assert exe.is_file()
    out_file = tmp_path / "report.json"
    env = {**_clean_env(), "CXRVIEWER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([str(exe), "--self-test", "--json-out", str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out_file.read_text(encoding="utf-8"))
    assert report["ok"] and report["frozen"] is True
    assert (tmp_path / "logs" / "cxrviewer.log").is_file() and report["log_file"]  # a windowed build has no stderr
    decodes = [c for c in report["checks"] if c["name"].startswith("decode:")]
    assert len(decodes) >= 8 and all(c["ok"] for c in decodes)
    assert (bundle / "THIRD_PARTY_LICENSES").is_file()
    text = (bundle / "THIRD_PARTY_LICENSES").read_text(encoding="utf-8")
    assert "pydicom" in text and "PySide6" in text


def test_frozen_app_rejects_unknown_option(bundle: Path, tmp_path: Path) -> None:
    exe = bundle / ("cxrviewer-cli.exe" if sys.platform == "win32" else "cxrviewer")
    proc = subprocess.run([str(exe), "--no-such-option"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--no-such-option" in proc.stderr
