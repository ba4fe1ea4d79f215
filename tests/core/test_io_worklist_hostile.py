"""open_worklist and the error text on hostile paths (issue 15, item 13): a symlink loop is named
as such, a FIFO never blocks a folder scan, control/bidi characters in a path are escaped."""
from __future__ import annotations

import os
import sys

import pytest

from cxrviewer.core.errors import CorruptFileError
from cxrviewer.core.io import open_worklist

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links and FIFOs")


@posix
def test_symlink_loop_is_named_not_not_found(tmp_path) -> None:
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    wl = open_worklist([str(loop)])
    assert len(wl) == 0
    assert any("symbolic link loop" in e for e in wl.errors), wl.errors


@posix
def test_fifo_in_a_scanned_folder_is_skipped(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe")  # extension-less: would be sniffed for a DICOM preamble
    (tmp_path / "note.txt").write_text("x")
    wl = open_worklist([str(tmp_path)])  # returns (a blocking open() would hang the test)
    assert len(wl) == 0


def test_error_message_escapes_control_and_bidi_characters() -> None:
    path = "/data/x\u202egnp.exe\x1b[31m.png"
    err = CorruptFileError("cannot be read", path=path)
    text = str(err)
    assert "\u202e" not in text and "\x1b" not in text
    assert "\\u202e" in text and "\\x1b" in text
    assert err.path == path  # the raw path stays usable
