"""Writing a benchmark's JSON result: the file under benchmarks/results/ (or ``--out``) and stdout.

The benchmarks run as scripts (``python benchmarks/NAME.py``), so this folder is on
``sys.path`` and they import this module as ``_report``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``report`` as indented JSON to ``out`` (creating its folder) and print it."""
    text = json.dumps(report, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
