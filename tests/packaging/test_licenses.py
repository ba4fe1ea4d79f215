"""packaging/licenses.py: licence classification and the GPL gate, on a fake bundle."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def licenses():
    spec = importlib.util.spec_from_file_location("cxr_licenses", REPO / "packaging" / "licenses.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cxr_licenses"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("text,category", [
    ("MIT", "permissive"),
    ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", "permissive"),
    ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception", "permissive"),
    ("LGPL-3.0-only OR GPL-2.0-only OR GPL-3.0-only", "lgpl"),
    ("GNU Lesser General Public License v3 (LGPLv3)", "lgpl"),
    ("GPL-3.0-or-later", "gpl"),
    ("GNU General Public License v3 (GPLv3)", "gpl"),
    ("AGPL-3.0-only", "gpl"),
    ("GPL-3.0-or-later WITH GCC-exception-3.1", "exception"),
    ("FTL or GPL-2+", "permissive"),
    ("", "unknown"),
])
def test_classify(licenses, text: str, category: str) -> None:
    assert licenses.classify(text) == category


def _fake_dist(root: Path, name: str, version: str, header: str) -> None:
    d = root / "_internal" / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n{header}\n\n",
                                encoding="utf-8")
    (d / "LICENSE").write_text(f"licence text of {name}\n", encoding="utf-8")


def test_gpl_distribution_fails_and_permissive_passes(licenses, tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    _fake_dist(ok, "goodlib", "1.0", "License-Expression: MIT")
    _fake_dist(ok, "PySide6_Essentials", "6.12.0", "License: LGPL-3.0-only OR GPL-2.0-only OR GPL-3.0-only")
    out = tmp_path / "ok.txt"
    assert licenses.main([str(ok), "--out", str(out), "--json", str(tmp_path / "ok.json")]) == 0
    text = out.read_text(encoding="utf-8")
    assert "licence text of goodlib" in text and "PySide6_Essentials" in text and "dynamically" in text
    summary = json.loads((tmp_path / "ok.json").read_text(encoding="utf-8"))
    assert summary["gpl"] == [] and "PySide6_Essentials" in summary["lgpl"]

    bad = tmp_path / "bad"
    _fake_dist(bad, "pylibjpeg-libjpeg", "2.0", "Classifier: License :: OSI Approved :: "
               "GNU General Public License v3 (GPLv3)")
    assert licenses.main([str(bad), "--out", str(tmp_path / "bad.txt")]) == 1
