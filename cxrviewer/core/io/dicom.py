"""DICOM reading: header checks first, pixels second, native decoders in a child process.

Order of work for one file (opened read-only, never written):

1. ``pydicom.dcmread(..., stop_before_pixels=True, defer_size=...)`` reads the
   header only; large values are not even read. Rows, Columns, frames,
   samples and BitsAllocated are checked and a declared size above
   :data:`~cxrviewer.core.io._common.MAX_PIXELS` is refused
   (:class:`ImageTooLargeError`) before any pixel buffer exists.
2. Rescale slope/intercept and the VOI window are validated (slope 0/NaN or
   window width <= 0 raise :class:`InvalidPixelTransformError`).
3. Pixels:

   * **Uncompressed** transfer syntaxes are decoded *in this process*. That is
     safe because it is pure Python/numpy: we parse the 8- or 12-byte
     PixelData element header ourselves, check that the first frame's bytes
     lie inside the file, read exactly those bytes and ``np.frombuffer`` /
     ``reshape`` them. No native codec runs, and the allocation is bounded by
     the size check of step 1.
   * **Compressed** (encapsulated) data goes through pydicom's decoder plugins
     (pylibjpeg-openjpeg for JPEG 2000, python-gdcm for JPEG lossless and
     JPEG-LS, pydicom's own RLE decoder, GDCM as RLE fallback). Only the
     preferred available plugin runs; a stream it rejects is not handed to a
     second codec (GDCM aborts the process on garbage J2K that OpenJPEG rejects
     cleanly). These are C libraries that may crash or hang on a
     hostile file, so they run in a separate process started with the
     ``spawn`` context (works frozen under PyInstaller, whose entry point
     calls ``multiprocessing.freeze_support()``). The worker is kept alive
     between files; the parent waits with a timeout and kills it on
     overrun. A worker that dies (segfault, abort) becomes a
     :class:`DecodeTimeoutError` here, never a crash of the caller. Pixels come
     back as a ``.npy`` file in a private temporary folder (mode 0700).

4. ``BitsStored``/``HighBit``/``PixelRepresentation`` are applied (mask or
   sign-extend), then the Modality LUT (rescale or LUT sequence) gives
   ``Study.modality``; MONOCHROME1 sets ``invert_display`` and is inverted in
   ``model_input``. Multi-frame files give their first frame and a warning.

Deflated transfer syntax is refused (pydicom inflates the whole data set in
memory, an unbounded zip bomb risk; it is essentially unused for radiographs).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (
    CorruptFileError,
    CxrError,
    DecodeTimeoutError,
    ImageTooLargeError,
    InvalidPixelTransformError,
    MissingDecoderError,
    StudyLoadError,
    UnsupportedFormatError,
)
from ..study import Study, StudyMeta
from ._deflate import DEFLATED_EXPLICIT, HEADER_BUDGET, Inflater, check_top_level, read_meta_group
from ._common import build_study, captured_warnings, check_pixel_count, one_line, percentile_window, safe_text

log = logging.getLogger(__name__)

#: Header values longer than this are not read during the header pass.
DEFER_SIZE = 64 * 1024

_UNCOMPRESSED = {
    "1.2.840.10008.1.2": ("<", True),        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": ("<", False),     # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": (">", False),     # Explicit VR Big Endian (retired)
}
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}

#: Which pip package supplies a decoder, for the MissingDecoderError message.
_PLUGIN_HINT = {
    "jpeg2000": "pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)",
    "gdcm": "python-gdcm (pip install python-gdcm)",
}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203"}
#: Plugin preference per transfer syntax family (the first available one is used).
_J2K_ORDER = ("pylibjpeg", "gdcm", "pillow")
_OTHER_ORDER = ("pydicom", "gdcm", "pylibjpeg", "pillow")  # pydicom = its pure-Python RLE

_LONG_VR = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}


# --------------------------------------------------------------------------- header
def _get(ds, keyword: str, default=None):
    """``ds.get`` that turns malformed values into ``default`` instead of raising."""
    try:
        v = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - malformed value in a hostile header
        return default
    return default if v is None else v


def _first(v):
    try:
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            return v[0] if len(v) else None
    except Exception:  # noqa: BLE001
        return None
    return v


def _text(ds, keyword: str) -> str | None:
    v = _get(ds, keyword)
    if v is None:
        return None
    try:
        s = safe_text(str(v).strip(), 256)
    except Exception:  # noqa: BLE001
        return None
    return s or None


def _int(ds, keyword: str, path: str, *, required: bool = False, default: int | None = None) -> int | None:
    v = _first(_get(ds, keyword))
    if v is None or v == "":
        if required:
            raise CorruptFileError(f"the DICOM header has no {keyword} (0028 group)", path=path)
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise CorruptFileError(f"the DICOM header has an unreadable {keyword} ({v!r})", path=path) from None


def _float(ds, keyword: str, path: str) -> float | None:
    v = _first(_get(ds, keyword))
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InvalidPixelTransformError(f"{keyword} is not a number ({v!r})", path=path) from None


def _spacing(ds, warnings: list[str]) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = _get(ds, kw)
        if v is None:
            continue
        try:
            vals = [float(x) for x in v][:2]
        except (TypeError, ValueError):
            warnings.append(f"{kw} is unreadable and was ignored")
            continue
        if len(vals) == 2 and all(math.isfinite(x) and x > 0 for x in vals):
            return (vals[0], vals[1])
        warnings.append(f"{kw} {vals} is not a positive spacing and was ignored")
    return None


def _refuse_deflated(path: str) -> None:
    """Refuse a Deflated Explicit VR data set before pydicom could inflate it (a zip bomb risk)."""
    ts = read_meta_group(path).transfer_syntax
    if ts in _DEFLATED:
        raise UnsupportedFormatError(
            f"uses the Deflated transfer syntax ({ts}), which is not supported (it was not inflated); "
            "convert it with dcmconv or gdcmconv", path=path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"1.2.840.10008.1.2.1.99" in head and ts is None:
        raise UnsupportedFormatError("has an unreadable file meta group naming the Deflated transfer "
                                     "syntax; refused without inflating it", path=path)


def _read_header(path: str, raw: bool):
    """Read the header (no pixel values) and return ``(dataset, pixel_element_offset, file_size)``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = os.path.getsize(path)
    try:
        _refuse_deflated(path)
    except (OSError, struct.error) as exc:
        raise StudyLoadError(f"cannot be read ({one_line(exc)})", path=path) from None
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, defer_size=DEFER_SIZE, force=raw)
            pixel_pos = f.tell()
    except InvalidDicomError as exc:
        raise UnsupportedFormatError(f"is not a readable DICOM file ({one_line(exc)})", path=path) from None
    except RecursionError:
        raise CorruptFileError("the DICOM header is nested too deeply to be a valid file", path=path) from None
    except MemoryError:
        raise CorruptFileError("the DICOM header declares impossible element sizes", path=path) from None
    except (EOFError, struct.error):
        raise CorruptFileError("the DICOM header is truncated", path=path) from None
    except OSError as exc:
        raise StudyLoadError(f"cannot be read ({exc.strerror or exc})", path=path) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on malformed input
        raise CorruptFileError(f"the DICOM header is malformed ({type(exc).__name__}: {one_line(exc)})",
                               path=path) from None
    return ds, pixel_pos, size


def _transfer_syntax(ds, path: str, warnings: list[str]) -> str:
    fm = getattr(ds, "file_meta", None)
    ts = _text(fm, "TransferSyntaxUID") if fm is not None else None
    if ts:
        return ts
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    warnings.append("no DICOM file meta information; transfer syntax guessed from the data")
    if little is False:
        return "1.2.840.10008.1.2.2"
    return "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"


# --------------------------------------------------------------------------- pixels
def _pixel_element(path: str, pos: int, size: int, endian: str, implicit: bool) -> tuple[int, int]:
    """Parse the PixelData element header at ``pos``: return ``(value_offset, value_length)``."""
    if pos >= size:
        raise CorruptFileError("has no pixel data (PixelData element is missing)", path=path)
    with open(path, "rb") as f:
        f.seek(pos)
        head = f.read(12)
    if len(head) < 8:
        raise CorruptFileError("is truncated inside the PixelData element header", path=path)
    group, elem = struct.unpack(endian + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        if group == 0x7FE0:
            raise UnsupportedFormatError("holds float pixel data, which is not a radiograph format", path=path)
        raise CorruptFileError("has no pixel data (PixelData element is missing)", path=path)
    if implicit:
        (length,) = struct.unpack(endian + "I", head[4:8])
        return pos + 8, length
    vr = head[4:6]
    if vr in _LONG_VR:
        if len(head) < 12:
            raise CorruptFileError("is truncated inside the PixelData element header", path=path)
        (length,) = struct.unpack(endian + "I", head[8:12])
        return pos + 12, length
    (length,) = struct.unpack(endian + "H", head[6:8])
    return pos + 8, length


def _fix_bits(arr: np.ndarray, bits_stored: int, high_bit: int, signed: bool) -> np.ndarray:
    """Apply BitsStored/HighBit: drop unused high bits, sign-extend signed data.

    Idempotent, so it is applied to plugin output as well as to native data.
    """
    nbits = arr.dtype.itemsize * 8
    udt = np.dtype(f"u{arr.dtype.itemsize}")
    sdt = np.dtype(f"i{arr.dtype.itemsize}")
    if bits_stored >= nbits and high_bit == nbits - 1:
        return arr.astype(sdt if signed else udt, copy=False)
    u = arr.view(udt) if arr.dtype.kind in "iu" else arr.astype(udt)
    shift = high_bit + 1 - bits_stored
    if shift > 0:
        u = u >> udt.type(shift)
    u = u & udt.type((1 << bits_stored) - 1)
    if not signed:
        return u
    pad = udt.type(nbits - bits_stored)
    return (u << pad).view(sdt) >> sdt.type(pad)


def _to_gray(arr: np.ndarray, photometric: str, path: str, warnings: list[str]) -> np.ndarray:
    """Colour pixel data (rare for radiographs) becomes its luma, with a warning."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise CorruptFileError(f"decoded pixel data has an unexpected shape {arr.shape}", path=path)
    if photometric.startswith("YBR_FULL") and photometric != "YBR_FULL_422":
        warnings.append(f"{photometric} colour image: its luma (Y) channel is shown")
        return np.ascontiguousarray(arr[..., 0])
    warnings.append(f"{photometric} colour image converted to grayscale (ITU-R 601 luma)")
    g = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return np.clip(np.rint(g), 0, np.iinfo(arr.dtype).max if arr.dtype.kind in "iu" else None).astype(arr.dtype)


def _read_native(path: str, pos: int, size: int, ts: str, rows: int, cols: int, spp: int,
                 planar: int, bits_alloc: int, frames: int, signed: bool) -> np.ndarray:
    endian, implicit = _UNCOMPRESSED[ts]
    offset, length = _pixel_element(path, pos, size, endian, implicit)
    if length == 0xFFFFFFFF:
        raise CorruptFileError("has encapsulated pixel data under an uncompressed transfer syntax", path=path)
    frame_bytes = rows * cols * spp * bits_alloc // 8
    if length < frame_bytes:
        raise CorruptFileError(
            f"pixel data is shorter than declared ({length} bytes for a {cols} x {rows} frame of "
            f"{frame_bytes} bytes)", path=path)
    if offset + frame_bytes > size:
        raise CorruptFileError(
            f"pixel data is truncated (the file ends {offset + frame_bytes - size} bytes early)", path=path)
    dt = np.dtype(f"{'i' if signed else 'u'}{bits_alloc // 8}")
    arr = np.empty(rows * cols * spp, dtype=dt)  # size checked above; read straight into it
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(arr).cast("B"))
    if got != frame_bytes:
        raise CorruptFileError("pixel data is truncated", path=path)
    if (endian == ">") == np.little_endian and arr.itemsize > 1:
        arr.byteswap(inplace=True)
    if spp == 1:
        return arr.reshape(rows, cols)
    if planar == 1:
        return np.ascontiguousarray(arr.reshape(spp, rows, cols).transpose(1, 2, 0))
    return arr.reshape(rows, cols, spp)


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """While a spawn child starts: hide the caller's main module from multiprocessing, so the
    child does not run a user's script again (``spawn`` re-imports ``__main__`` by path; a script
    calling ``load_study`` without an ``if __name__ == "__main__"`` guard would run twice). The
    child needs only ``_decode_child``. Frozen apps are left alone (``freeze_support`` handles them)."""
    main = sys.modules.get("__main__")
    if main is None or getattr(sys, "frozen", False):
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class _DecodeWorker:
    """One long-lived ``spawn`` child that runs pydicom's native decoders.

    Requests are serialised with a lock. A timeout kills the child; a child that
    dies is noticed as EOF on the pipe. Either way the next request starts a
    fresh child.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        import multiprocessing

        from . import _decode_child

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_decode_child.serve, args=(child,), name="cxrviewer-decoder", daemon=True)
        with _main_not_reimported():
            proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            try:
                proc.close()
            except ValueError:
                pass

    def shutdown(self) -> None:
        with self._lock:
            self._stop()

    def decode(self, path: str, ts: str, plugins: list[str], timeout: float) -> np.ndarray:
        import multiprocessing

        if multiprocessing.current_process().daemon:
            # Daemonic processes (e.g. torch DataLoader workers) may not start children;
            # such a process is itself expendable, so decode in it directly.
            from ._decode_child import decode_first_frame

            log.debug("decoding %s in-process (daemonic worker)", path)
            try:
                return np.asarray(decode_first_frame(path, ts, plugins)[0])
            except MemoryError:
                raise ImageTooLargeError("decoding needs more memory than available", path=path) from None
            except Exception as exc:  # noqa: BLE001
                raise CorruptFileError(f"compressed pixel data could not be decoded ({exc})", path=path) from None
        tmp = tempfile.mkdtemp(prefix="cxrviewer-decode-")  # private: mode 0700
        out = os.path.join(tmp, "pixels.npy")
        req = {"path": path, "ts": ts, "plugins": plugins, "out": out,
               "fault": os.environ.get("CXRVIEWER_DECODE_CHILD_FAULT", "")}
        try:
            with self._lock:
                if self._proc is None or not self._proc.is_alive():
                    self._stop()
                    self._start()
                try:
                    self._conn.send(req)
                    ready = self._conn.poll(timeout)
                except (OSError, EOFError):
                    ready = True
                if not ready:
                    self._stop()
                    raise DecodeTimeoutError(
                        f"decoding the compressed pixel data took longer than {timeout:.0f} s and was "
                        "stopped (the file may be corrupt or hostile)", path=path)
                try:
                    resp = self._conn.recv()
                except (EOFError, OSError):
                    code = self._proc.exitcode if self._proc is not None else None
                    self._proc.join(2) if self._proc is not None else None
                    code = self._proc.exitcode if self._proc is not None else code
                    self._stop()
                    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    raise DecodeTimeoutError(
                        f"the pixel decoder crashed ({how}) on this file; it is probably corrupt "
                        "(the viewer itself is unaffected)", path=path) from None
            if not resp.get("ok"):
                kind = resp.get("kind")
                msg = resp.get("message", "unknown error")
                if kind == "too_large":
                    raise ImageTooLargeError(f"decoding needs more memory than allowed ({msg})", path=path)
                if kind == "missing":
                    raise MissingDecoderError(msg, path=path)
                raise CorruptFileError(f"compressed pixel data could not be decoded ({msg})", path=path)
            try:
                return np.load(out, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"decoder output unreadable ({exc})", path=path) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_WORKER = _DecodeWorker()


def shutdown_decoder() -> None:
    """Stop the decoder child process (it is restarted on demand)."""
    _WORKER.shutdown()


def _plugins_for(ts: str, path: str) -> list[str]:
    """Available pydicom decoding plugins for ``ts`` in preference order, or a typed error."""
    from pydicom.pixels import get_decoder

    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedFormatError(f"uses transfer syntax {ts}, which no pixel decoder supports",
                                     path=path) from None
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedFormatError(f"uses unknown transfer syntax {ts} ({exc})", path=path) from None
    available = list(dec.available_plugins)
    if not available:
        hint = _PLUGIN_HINT["jpeg2000"] if ts in _J2K else _PLUGIN_HINT["gdcm"]
        missing = "; ".join(dec.missing_dependencies) if dec.missing_dependencies else ""
        raise MissingDecoderError(
            f"its pixel data is compressed ({dec.UID.name if hasattr(dec.UID, 'name') else ts}) and no decoder "
            f"plugin is installed: install {hint}" + (f" [{missing}]" if missing else ""), path=path)
    order = _J2K_ORDER if ts in _J2K else _OTHER_ORDER
    ranked = [p for p in order if p in available] + [p for p in available if p not in order]
    # Only the preferred plugin runs: a stream it rejects is damaged, and handing it to a
    # second native decoder only adds attack surface (GDCM aborts the process on garbage J2K
    # that pylibjpeg-openjpeg rejects cleanly).
    return ranked[:1]


# --------------------------------------------------------------------------- transforms
def _modality(stored: np.ndarray, ds, path: str, warnings: list[str]) -> np.ndarray:
    """Modality LUT: a LUT sequence if present, else rescale slope/intercept (both validated)."""
    if _get(ds, "ModalityLUTSequence") is not None:
        try:
            from pydicom.pixels import apply_modality_lut

            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001
            raise InvalidPixelTransformError(f"the Modality LUT sequence is unusable ({exc})", path=path) from None
    slope = _float(ds, "RescaleSlope", path)
    intercept = _float(ds, "RescaleIntercept", path)
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if not math.isfinite(slope) or slope == 0.0:
        raise InvalidPixelTransformError(f"RescaleSlope is {slope}; it must be a finite, non-zero number", path=path)
    if not math.isfinite(intercept):
        raise InvalidPixelTransformError(f"RescaleIntercept is {intercept}; it must be finite", path=path)
    out = stored.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _header_window(ds, path: str, warnings: list[str]) -> tuple[float, float] | None:
    """(centre, width) from WindowCenter/WindowWidth, else approximated from a VOI LUT sequence."""
    centre = _float(ds, "WindowCenter", path)
    width = _float(ds, "WindowWidth", path)
    if centre is not None or width is not None:
        if centre is None or width is None:
            warnings.append("only one of WindowCenter/WindowWidth is present; window computed from the data")
            return None
        if not math.isfinite(centre) or not math.isfinite(width) or width <= 0:
            raise InvalidPixelTransformError(
                f"WindowWidth is {width} (centre {centre}); a display window needs a positive width", path=path)
        fn = _text(ds, "VOILUTFunction")
        if fn and fn.upper() != "LINEAR":
            warnings.append(f"VOI LUT function {fn} is shown as a linear window")
        return centre, width
    seq = _get(ds, "VOILUTSequence")
    if seq is not None:
        try:
            item = seq[0]
            desc = [int(x) for x in item.LUTDescriptor]
            n = desc[0] or 65536
            first = desc[1]
            from pydicom.pixels import apply_voi_lut

            inputs = np.arange(first, first + n, dtype=np.int64)
            lut = np.asarray(apply_voi_lut(inputs, ds, index=0, prefer_lut=True), dtype=np.float64)
            lo, hi = float(lut.min()), float(lut.max())
            inside = np.nonzero((lut > lo) & (lut < hi))[0]
            i0, i1 = (int(inside[0]) - 1, int(inside[-1]) + 1) if inside.size else (0, len(lut) - 1)
            i0, i1 = max(i0, 0), min(i1, len(lut) - 1)
            warnings.append("VOI LUT sequence approximated by a linear window over its input range")
            return first + (i0 + i1) / 2.0, float(max(i1 - i0, 1))
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"VOI LUT sequence unusable ({type(exc).__name__}); window computed from the data")
    return None


# --------------------------------------------------------------------------- entry point
def load_dicom(path: str | Path, *, timeout: float = 30.0, raw: bool = False) -> Study:
    """Read one DICOM file into a :class:`Study` (see the module docstring for the steps).

    ``raw=True`` reads a file without preamble/``DICM`` marker (pydicom ``force``).
    Raises only :class:`~cxrviewer.core.errors.CxrError` subclasses.
    """
    p = str(path)
    notes: list[str] = []
    try:
        return _load(p, timeout, raw, notes)
    except CxrError:
        raise
    except MemoryError:
        raise ImageTooLargeError("not enough memory to hold this image", path=p) from None
    except RecursionError:
        raise CorruptFileError("the DICOM data is nested too deeply to be a valid file", path=p) from None
    except Exception as exc:  # noqa: BLE001 - never let an unexpected parser error escape untyped
        log.debug("unexpected error reading %s", p, exc_info=True)
        raise CorruptFileError(f"could not be read ({type(exc).__name__}: {one_line(exc)})", path=p) from None


@dataclass
class _PixelFormat:
    """The pixel layout a header declares, checked by :func:`_pixel_format`."""

    rows: int
    cols: int
    frames: int
    spp: int
    bits_alloc: int
    bits_stored: int
    high_bit: int
    signed: bool
    planar: int
    photometric: str


def _pixel_format(ds, path: str, warnings: list[str]) -> _PixelFormat:
    """Read and check Rows/Columns/frames/samples/bits/photometric before any pixel is read."""
    rows = _int(ds, "Rows", path, required=True)
    cols = _int(ds, "Columns", path, required=True)
    check_pixel_count(rows, cols, path)
    frames = _int(ds, "NumberOfFrames", path, default=1) or 1
    if frames < 1:
        raise CorruptFileError(f"declares {frames} frames", path=path)
    spp = _int(ds, "SamplesPerPixel", path, default=1)
    bits_alloc = _int(ds, "BitsAllocated", path, required=True)
    bits_stored = _int(ds, "BitsStored", path, default=bits_alloc)
    high_bit = _int(ds, "HighBit", path, default=bits_stored - 1)
    pixel_rep = _int(ds, "PixelRepresentation", path, default=0)
    planar = _int(ds, "PlanarConfiguration", path, default=0)
    photometric = (_text(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()

    if bits_alloc not in (8, 16, 32):
        raise UnsupportedFormatError(f"has BitsAllocated {bits_alloc}; only 8, 16 and 32 are supported", path=path)
    if spp not in (1, 3):
        raise CorruptFileError(f"declares SamplesPerPixel {spp}", path=path)
    if not 1 <= bits_stored <= bits_alloc:
        raise CorruptFileError(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_alloc}", path=path)
    if not bits_stored - 1 <= high_bit <= bits_alloc - 1:
        warnings.append(f"HighBit {high_bit} is inconsistent with BitsStored {bits_stored}; assumed {bits_stored - 1}")
        high_bit = bits_stored - 1
    if pixel_rep not in (0, 1):
        raise CorruptFileError(f"PixelRepresentation {pixel_rep} is neither 0 nor 1", path=path)
    if photometric in ("PALETTE COLOR",) or (spp == 1 and not photometric.startswith("MONOCHROME")):
        raise UnsupportedFormatError(f"has photometric interpretation {photometric}; "
                                     "chest radiographs must be MONOCHROME1/2", path=path)
    total = rows * cols * spp * frames * bits_alloc // 8
    if frames > 1:
        warnings.append(f"multi-frame file ({frames} frames): only the first frame is shown")
        if total > 64 * 2**30:
            raise ImageTooLargeError(f"declares {total / 2**30:.0f} GiB of pixel data", path=path)
    return _PixelFormat(rows, cols, frames, spp, bits_alloc, bits_stored, high_bit, pixel_rep == 1, planar,
                        photometric)


def _check_transforms(ds, path: str, warnings: list[str]) -> tuple[float, float] | None:
    """Validate the rescale slope before decoding anything; return the header window, if any."""
    if _get(ds, "ModalityLUTSequence") is None:
        slope = _float(ds, "RescaleSlope", path)
        if slope is not None and (not math.isfinite(slope) or slope == 0.0):
            raise InvalidPixelTransformError(f"RescaleSlope is {slope}; it must be a finite, non-zero number",
                                             path=path)
    return _header_window(ds, path, warnings)


def _decode_compressed(path: str, pixel_pos: int, size: int, ts: str, fmt: _PixelFormat,
                       timeout: float) -> np.ndarray:
    """First frame of encapsulated pixel data, decoded in the child and checked against the header."""
    if pixel_pos >= size:
        raise CorruptFileError("has no pixel data (PixelData element is missing)", path=path)
    plugins = _plugins_for(ts, path)
    arr = _WORKER.decode(os.path.abspath(path), ts, plugins, timeout)
    expected = (fmt.rows, fmt.cols) if fmt.spp == 1 else (fmt.rows, fmt.cols, 3)
    if tuple(arr.shape) != expected:
        raise CorruptFileError(f"decoded pixel data has shape {arr.shape}, the header says {expected}",
                               path=path)
    if arr.dtype.kind not in "iu":
        raise CorruptFileError(f"decoded pixel data has dtype {arr.dtype}", path=path)
    want = np.dtype(f"{'i' if fmt.signed else 'u'}{fmt.bits_alloc // 8}")
    if arr.dtype.itemsize != want.itemsize:
        arr = arr.astype(want)
    return arr


def _stored_pixels(path: str, pixel_pos: int, size: int, ts: str, fmt: _PixelFormat, timeout: float,
                   warnings: list[str]) -> tuple[np.ndarray, str]:
    """Stored values of the first frame (grayscale, bits fixed) and the photometric they are in."""
    photometric = fmt.photometric
    if ts in _UNCOMPRESSED:
        arr = _read_native(path, pixel_pos, size, ts, fmt.rows, fmt.cols, fmt.spp, fmt.planar, fmt.bits_alloc,
                           fmt.frames, fmt.signed)
    else:
        arr = _decode_compressed(path, pixel_pos, size, ts, fmt, timeout)
        if fmt.spp == 3:
            photometric = "RGB"  # pydicom converts YBR to RGB by default
    if fmt.spp == 3:
        arr = _to_gray(arr, photometric, path, warnings)
    stored = _fix_bits(arr, fmt.bits_stored, fmt.high_bit, fmt.signed) if fmt.spp == 1 else arr
    return np.ascontiguousarray(stored), photometric


def _study_meta(ds, path: str, ts: str, fmt: _PixelFormat, warnings: list[str]) -> StudyMeta:
    """The header fields a :class:`StudyMeta` keeps."""
    return StudyMeta(
        source_path=path,
        format="dicom",
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        view_position=_text(ds, "ViewPosition"),
        pixel_spacing=_spacing(ds, warnings),
        photometric=_text(ds, "PhotometricInterpretation") or "MONOCHROME2",
        bits_stored=fmt.bits_stored,
        manufacturer=_text(ds, "Manufacturer"),
        modality=_text(ds, "Modality"),
        transfer_syntax=ts,
        number_of_frames=fmt.frames,
        warnings=warnings,
    )


def _load(path: str, timeout: float, raw: bool, warnings: list[str]) -> Study:
    """:func:`load_dicom` without its error translation; notes go to ``warnings`` (the Study's list)."""
    meta = read_meta_group(path)
    if meta.transfer_syntax == DEFLATED_EXPLICIT:
        return _load_deflated(path, meta, timeout, warnings)
    return _load_plain(path, timeout, raw, warnings)


def _load_deflated(path: str, meta, timeout: float, warnings: list[str]) -> Study:
    """A Deflated data set, inflated in bounded steps (header, then the first frame only; see ``_deflate``)."""
    tmp = tempfile.mkdtemp(prefix="cxrviewer-inflate-")  # private: mode 0700
    out = os.path.join(tmp, "inflated.dcm")
    inflater = None
    try:
        inflater = Inflater(path, meta, out)
        start = inflater.size
        eof = inflater.fill(start + HEADER_BUDGET)
        check_top_level(path, start, out)
        try:
            with captured_warnings(warnings):
                ds, pixel_pos, size = _read_header(out, False)
        except CorruptFileError:
            if eof:
                raise
            pixel_pos = size = inflater.size
        if pixel_pos >= size and not eof:
            raise ImageTooLargeError(f"its deflated header is malformed or larger than {HEADER_BUDGET >> 20} MiB "
                                     "once inflated; refused without inflating the rest", path=out)
        if pixel_pos < size:
            with captured_warnings(warnings):
                _fill_first_frame(inflater, out, ds, pixel_pos)
        inflater.close()
        study = _load_plain(out, timeout, False, warnings)
    except CxrError as exc:
        text = str(exc)
        text = text[len(out) + 2:] if text.startswith(out + ": ") else text
        raise type(exc)(text, path=path) from None
    finally:
        if inflater is not None:
            inflater.close()
        shutil.rmtree(tmp, ignore_errors=True)
    study.meta.source_path = path
    study.meta.transfer_syntax = DEFLATED_EXPLICIT
    warnings.append("Deflated transfer syntax: the data set was inflated up to the end of the first frame")
    return study


def _fill_first_frame(inflater: Inflater, out: str, ds, pixel_pos: int) -> None:
    """Inflate up to the end of the first frame, refusing a PixelData longer than its frames need."""
    fmt = _pixel_format(ds, out, [])
    frame_bytes = fmt.rows * fmt.cols * fmt.spp * fmt.bits_alloc // 8
    inflater.fill(pixel_pos + 12)
    _, length = _pixel_element(out, pixel_pos, inflater.size, "<", False)
    need = fmt.frames * frame_bytes
    if length != 0xFFFFFFFF and length > need + (need & 1):
        raise ImageTooLargeError(f"its deflated PixelData holds {length} bytes but {fmt.frames} frame(s) of "
                                 f"{fmt.cols} x {fmt.rows} need {need}; refused without inflating it", path=out)
    inflater.fill(pixel_pos + 12 + frame_bytes)


def _load_plain(path: str, timeout: float, raw: bool, warnings: list[str]) -> Study:
    """Header, checks and pixels of a file pydicom can read without inflating anything.

    pydicom's warnings while it parses and converts header values go to ``warnings``
    (:func:`captured_warnings`); the pixel step (numpy, or the decoder child, which is
    silenced) runs outside the capture so that other threads' loads are not held up.
    """
    with captured_warnings(warnings):
        ds, pixel_pos, size, ts, fmt, window = _header_stage(path, raw, warnings)
    stored, photometric = _stored_pixels(path, pixel_pos, size, ts, fmt, timeout, warnings)
    with captured_warnings(warnings):
        modality = _modality(stored, ds, path, warnings)
        meta = _study_meta(ds, path, ts, fmt, warnings)
    if window is None:
        window = percentile_window(modality)
        if not any("window" in w for w in warnings):
            warnings.append("no display window in the header; using the 0.5-99.5 percentile range")
    for w in warnings:
        log.info("%s: %s", path, w)
    return build_study(stored, modality, window, photometric == "MONOCHROME1", meta)


def _header_stage(path: str, raw: bool, warnings: list[str]):
    """Header read and checked: ``(ds, pixel_pos, size, ts, fmt, window)``; no pixel is read."""
    ds, pixel_pos, size = _read_header(path, raw)
    if raw:
        warnings.append("file has no DICOM preamble/'DICM' marker; read as a raw data set")
    ts = _transfer_syntax(ds, path, warnings)
    if ts in _DEFLATED:  # normally refused by _refuse_deflated before pydicom saw the file
        raise UnsupportedFormatError(f"uses the Deflated transfer syntax ({ts}), which is not supported "
                                     "(convert it with dcmconv or gdcmconv)", path=path)
    if pixel_pos >= size:
        raise UnsupportedFormatError("contains no pixel data (PixelData is missing: not an image object, "
                                     "or the file is cut short)", path=path)
    fmt = _pixel_format(ds, path, warnings)
    window = _check_transforms(ds, path, warnings)
    return ds, pixel_pos, size, ts, fmt, window
