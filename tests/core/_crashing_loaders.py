"""Loaders for the Prefetcher's worker processes (importable by name from a spawned child):
``"ok:N"`` loads, ``"crash:N"`` kills its process every time, ``"once:PATH"`` the first time only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load(entry: str) -> tuple[str, Any]:
    kind, _, arg = entry.partition(":")
    if kind == "crash":
        os._exit(3)
    if kind == "once":
        marker = Path(arg)
        if not marker.exists():
            marker.write_text("died once", encoding="utf-8")
            os._exit(3)
    return "ok", entry
