"""PNG, JPEG and TIFF studies through Pillow.

The header is read first (``Image.open`` is lazy); a declared size above
:data:`~cxrviewer.core.io._common.MAX_PIXELS` is refused before decoding, and
Pillow's own ``DecompressionBombError`` (raised at open for absurd sizes) is
mapped to :class:`ImageTooLargeError`.

Grayscale 8-bit (``L``) and 16-bit (``I;16*``/``I``) images keep their values
as ``stored``; colour (RGB, RGBA, CMYK, palette, LA) becomes 8-bit ITU-R 601
luma (alpha ignored) with a warning. The display window is (127.5, 255) for
8-bit data and the 0.5-99.5 percentile range for deeper data. Raster files
carry no photometric tag: they are taken as MONOCHROME2 (dense tissue bright).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError, CxrError, ImageTooLargeError, StudyLoadError
from ..study import Study, StudyMeta
from ._common import build_study, captured_warnings, check_pixel_count, one_line, percentile_window

log = logging.getLogger(__name__)

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}


def load_raster(path: str | Path, fmt: str) -> Study:
    """Read a PNG/JPEG/TIFF file (``fmt`` as sniffed: "png", "jpeg", "tiff") into a Study.

    Pillow's warnings about the file go to the Study's warnings (one line each), not stderr.
    """
    notes: list[str] = []
    with captured_warnings(notes, ("PIL",)):
        return _load_raster(str(path), fmt, notes)


def _load_raster(p: str, fmt: str, warnings: list[str]) -> Study:
    """:func:`load_raster` with its notes going to ``warnings``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p, formats=[_PIL_FORMAT[fmt]]) as im:
            w, h = im.size
            check_pixel_count(h, w, p)
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if n_frames > 1:
                warnings.append(f"multi-page file ({n_frames} pages): only the first page is shown")
            if fmt in ("jpeg", "tiff"):
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except Exception:  # noqa: BLE001 - broken EXIF is not worth refusing the image
                    orientation = 1
                if orientation not in (1, None):
                    warnings.append(f"EXIF orientation {orientation} applied")
                    im.load()
                    im = ImageOps.exif_transpose(im)
            im.load()
            mode = im.mode
            if mode == "L":
                stored = np.asarray(im, dtype=np.uint8).copy()
                bits = 8
            elif mode.startswith("I;16"):
                stored = np.asarray(im).astype(np.uint16)
                bits = 16
            elif mode == "I":
                a = np.asarray(im)
                if a.size and a.min() >= 0 and a.max() <= 65535:
                    stored, bits = a.astype(np.uint16), 16
                else:
                    stored, bits = a.astype(np.int32), 32
            elif mode == "F":
                stored, bits = np.asarray(im, dtype=np.float32).copy(), 32
            else:
                warnings.append(f"{mode} image converted to grayscale (ITU-R 601 luma"
                                + (", alpha ignored)" if "A" in mode else ")"))
                stored = np.asarray(im.convert("L"), dtype=np.uint8).copy()
                bits = 8
    except CxrError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"declared image size is too large ({one_line(exc)})", path=p) from None
    except UnidentifiedImageError:
        raise CorruptFileError(f"starts like a {fmt.upper()} file but its header is damaged", path=p) from None
    except MemoryError:
        raise ImageTooLargeError("not enough memory to decode this image", path=p) from None
    except FileNotFoundError:
        raise StudyLoadError("file not found", path=p) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        raise CorruptFileError(f"{fmt.upper()} data is damaged or truncated ({one_line(exc)})", path=p) from None
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise assorted types on hostile input
        raise CorruptFileError(f"could not be decoded ({type(exc).__name__}: {one_line(exc)})", path=p) from None

    if stored.ndim != 2:
        raise CorruptFileError(f"decoded to an unexpected shape {stored.shape}", path=p)
    modality = stored.astype(np.float32)
    window = (127.5, 255.0) if bits == 8 else percentile_window(modality)
    meta = StudyMeta(source_path=p, format=fmt, photometric="MONOCHROME2", bits_stored=bits,
                     warnings=warnings)
    for msg in warnings:
        log.info("%s: %s", p, msg)
    return build_study(stored, modality, window, False, meta)
