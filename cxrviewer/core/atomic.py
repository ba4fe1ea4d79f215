"""Temporary files beside a target, for atomic replace, with the user's normal permissions.

``tempfile.mkstemp`` creates files readable by their owner only (0600); a file renamed into place
from it would keep that mode, so exports, results and bundles would be unreadable to the user's
group where their umask allows it. :func:`mkstemp_beside` gives the temporary file the mode a
plain ``open(path, "w")`` would have (``0o666 & ~umask``) before anything is written into it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode() -> int:
    """The mode a newly created regular file gets: ``0o666`` less the process umask."""
    return 0o666 & ~_umask()


def mkdtemp_beside(target: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
    """A new temporary folder beside ``target`` (renamed into place by the caller) with the mode
    ``os.mkdir`` would give (``0o777 & ~umask``, not ``mkdtemp``'s 0700)."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=folder))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def mkstemp_beside(target: str | os.PathLike[str], suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, path)`` of a new temporary file in ``target``'s folder (same file system, so
    ``os.replace(path, target)`` is atomic), named ``.<target name>.XXXX<suffix>``, with normal
    permissions (:func:`normal_mode`). The caller owns the descriptor and the file."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=folder)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, normal_mode())
        else:  # Windows: permission bits beyond read-only do not apply
            os.chmod(tmp, normal_mode())
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp
