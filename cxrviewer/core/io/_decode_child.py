"""The decoder child process: runs pydicom's native decoder plugins away from the viewer.

Started by :class:`cxrviewer.core.io.dicom._DecodeWorker` with the
``multiprocessing`` *spawn* context; it loops reading requests from a pipe.
Each request names a DICOM file and a ``.npy`` path in a private temporary
folder; the child decodes the first frame, saves it there and answers with a
small dict (``ok``, or ``kind`` + ``message``). If a C decoder segfaults or
aborts, only this process dies; the parent sees the pipe close.

The address space is capped (Linux, best effort) so that a codestream that
claims an enormous image fails with ``MemoryError`` instead of swapping.

``fault`` in a request ("abort", "hang", "exit") makes the child misbehave on
purpose; the tests use it (via the ``CXRVIEWER_DECODE_CHILD_FAULT`` variable
read in the parent) to prove that a dying decoder cannot take the caller down.
"""
from __future__ import annotations

import os
import time

#: Address-space cap for the child (bytes); generous for a 60 MP JPEG 2000 decode.
ADDRESS_SPACE_LIMIT = 8 * 2**30


def _limit_memory() -> None:
    try:
        import resource
    except ImportError:  # Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        target = ADDRESS_SPACE_LIMIT if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_LIMIT, hard)
        if soft == resource.RLIM_INFINITY or soft > target:
            resource.setrlimit(resource.RLIMIT_AS, (target, hard))
    except (ValueError, OSError):
        pass


def _quiet() -> None:
    """Keep library warnings off the inherited stderr: the parent already read this header and
    captured its warnings into the study (one line each)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").propagate = False


def decode_first_frame(path: str, ts: str, plugins: list[str]):
    """Decode frame 0 of ``path`` with the first plugin in ``plugins`` that succeeds."""
    import pydicom
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(path)
    dec = get_decoder(ts)
    errors = []
    for plugin in plugins:
        try:
            arr, _meta = dec.as_array(ds, index=0, decoding_plugin=plugin)
            return arr, plugin
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - try the next plugin
            errors.append(f"{plugin}: {type(exc).__name__}: {exc}"[:300])
    raise RuntimeError("; ".join(errors) or "no decoder plugin available")


def _handle(req: dict) -> dict:
    fault = req.get("fault") or ""
    if fault == "abort":
        os.abort()
    elif fault == "hang":
        time.sleep(3600)
    elif fault == "exit":
        os._exit(7)
    try:
        import numpy as np

        arr, plugin = decode_first_frame(req["path"], req["ts"], list(req["plugins"]))
        np.save(req["out"], np.ascontiguousarray(arr), allow_pickle=False)
        return {"ok": True, "plugin": plugin, "shape": list(arr.shape), "dtype": str(arr.dtype)}
    except MemoryError as exc:
        return {"ok": False, "kind": "too_large", "message": f"MemoryError {exc}"[:500]}
    except RecursionError:
        return {"ok": False, "kind": "corrupt", "message": "data nested too deeply"}
    except Exception as exc:  # noqa: BLE001 - everything becomes a typed error in the parent
        msg = f"{type(exc).__name__}: {exc}"
        if "does not support" in msg or "not supported" in msg:
            # e.g. 12-bit JPEG Extended, which GDCM refuses: a capability gap, not a corrupt file
            return {"ok": False, "kind": "missing",
                    "message": ("no installed decoder plugin supports this encoding; " + msg)[:500]}
        return {"ok": False, "kind": "corrupt", "message": msg[:500]}


def serve(conn) -> None:
    """Child main loop: answer decode requests until the pipe closes."""
    _limit_memory()
    _quiet()
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        resp = _handle(req)
        try:
            conn.send(resp)
        except (OSError, BrokenPipeError):
            return
