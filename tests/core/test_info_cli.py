"""``cxrviewer info``: one line / JSON object per study, errors reported, exit status."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrviewer.__main__ import main


@pytest.fixture()
def bad_file(tmp_path: Path) -> Path:
    p = tmp_path / "broken.dcm"
    p.write_text("definitely not DICOM")
    return p


def test_info_text_lines_and_exit_code(rg1_uncr: Path, bad_file: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["info", str(rg1_uncr), str(bad_file)])
    out, err = capsys.readouterr()
    assert rc != 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert str(rg1_uncr) in lines[0] and "photometric=MONOCHROME1" in lines[0]
    assert "window=15000/30000" in lines[0] and "size=1841x1955" in lines[0]
    assert "pixel_sha256=" in lines[0]
    assert "broken.dcm" in err and "UnsupportedFormatError" in err


def test_info_json_matches_study(rg1_uncr: Path, rg1_j2kr: Path, bad_file: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    from cxrviewer.core.io import load_study

    rc = main(["info", "--json", str(rg1_uncr), str(bad_file), str(rg1_j2kr)])
    out, _ = capsys.readouterr()
    assert rc == 1
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["ok"] for r in recs] == [True, False, True]
    good = recs[0]
    assert good["pixel_sha256"] == load_study(rg1_uncr).pixel_sha256() == recs[2]["pixel_sha256"]
    assert good["shape"] == [1955, 1841] and good["window"] == [15000.0, 30000.0]
    assert good["meta"]["modality"] == "CR" and good["meta"]["sop_uid"]
    assert recs[1]["error_type"] == "UnsupportedFormatError" and "broken.dcm" in recs[1]["error"]


def test_info_all_good_exits_zero(rg1_uncr: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(rg1_uncr)]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def _strict_json(text: str):
    """``json.loads`` that refuses the non-JSON tokens NaN, Infinity and -Infinity."""
    def refuse(token):
        raise ValueError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_info_json_is_strict_json_when_numbers_are_not_finite(rg1_uncr: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A study whose window, spacing and boxes hold NaN/Inf prints null for them, never bare NaN tokens."""
    from cxrviewer.cli import info

    real = info._record

    def record(ref, study):
        rec = real(ref, study)
        rec["window"] = [float("nan"), float("inf")]
        rec["meta"]["pixel_spacing"] = [float("-inf"), 0.1]
        rec["gt_boxes"] = [["Mass", float("nan"), 1.0, 2.0, 3.0]]
        return rec

    monkeypatch.setattr(info, "_record", record)
    assert main(["info", "--json", str(rg1_uncr)]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    rec = _strict_json(out.strip())
    assert rec["window"] == [None, None] and rec["meta"]["pixel_spacing"] == [None, 0.1]
    assert rec["gt_boxes"] == [["Mass", None, 1.0, 2.0, 3.0]]


def test_json_safe_helper() -> None:
    import numpy as np

    from cxrviewer.core.jsonsafe import dumps, json_safe, loads_strict

    value = {"a": float("nan"), 2: (1.5, float("-inf")), "arr": np.array([np.nan, 1.0], np.float32),
             "s": np.float64("inf"), "i": np.int64(3), "ok": [True, None, "x"]}
    assert json_safe(value) == {"a": None, "2": [1.5, None], "arr": [None, 1.0], "s": None, "i": 3,
                                "ok": [True, None, "x"]}
    assert loads_strict(dumps(value)) == json_safe(value)
    with pytest.raises(ValueError):
        loads_strict('{"a": NaN}')
