"""Strict JSON out of anything the app reports: non-finite floats become ``null``.

Python's :func:`json.dumps` writes ``NaN``/``Infinity`` by default, which no other JSON reader
accepts. :func:`json_safe` turns a value into plain JSON types (non-finite floats to ``None``,
tuples and arrays to lists, numpy scalars to Python numbers, keys to strings) and :func:`dumps`
writes it with ``allow_nan=False``. Imports nothing from cxrviewer (usable at every layer).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps", "json_safe", "loads_strict"]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types with every NaN/Infinity replaced by ``None``."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return json_safe(tolist())
    return obj  # json.dumps reports anything else it cannot write


def dumps(obj: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` of :func:`json_safe` ``(obj)``; never writes ``NaN`` or ``Infinity``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:40]} is out of range")
    return value


def loads_strict(text: str | bytes) -> Any:
    """:func:`json.loads` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` tokens."""
    return json.loads(text, parse_constant=_refuse, parse_float=_finite_float)
