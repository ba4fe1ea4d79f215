"""Work around a reference-count bug in PySide6 6.12.0: ``Signal.emit()`` takes one
reference from ``Py_True`` (and ``None``) per call without owning it, so after enough emits
(a linked panel grid emits thousands) the interpreter aborts with "Fatal Python error:
bool_dealloc" at exit. 6.11.x is fine (the project pins it; pyproject excludes 6.12.0).

Python 3.12+ makes ``True``/``None`` immortal, which hides the bug; on older Pythons with
an affected PySide6 we add a large, fixed number of references to these static objects
once (they must never be freed anyway), which has the same effect. Otherwise: no-op.
"""
from __future__ import annotations

import ctypes
import sys

_RESERVE = 1 << 40
AFFECTED = ("6.12.0",)


def apply() -> bool:
    """Make True/False/None effectively immortal when needed; True when applied."""
    if sys.version_info >= (3, 12) or getattr(apply, "_done", False):
        return False
    try:
        import PySide6
    except ImportError:  # pragma: no cover
        return False
    if getattr(PySide6, "__version__", "") not in AFFECTED:
        return False
    for obj in (True, False, None):
        ctypes.c_ssize_t.from_address(id(obj)).value += _RESERVE
    apply._done = True  # type: ignore[attr-defined]
    return True
