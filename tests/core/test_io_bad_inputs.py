"""The bad-input corpus: every hostile or broken file yields a typed CxrError, cheaply.

Files are generated in a temporary folder. Each load must raise a
:class:`CxrError` subclass (never another exception, never a crash) and must
not allocate much: the tracemalloc peak (numpy buffers included) stays below
200 MB. No wall-clock assertion is made; the slowest case is the compressed
one, which pays the decoder child's start-up once.
"""
from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEG2000Lossless, generate_uid  # noqa: E402

from cxrviewer.core import errors as E  # noqa: E402
from cxrviewer.core.io import load_study  # noqa: E402

PEAK_LIMIT = 200 * 2**20


def _dicom(path: Path, rows: int = 64, cols: int = 64, *, pixel_data: bytes | None = None,
           ts: str = "1.2.840.10008.1.2.1", **attrs) -> Path:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if pixel_data is None:
        pixel_data = (np.arange(rows * cols) % 4096).astype("<u2").tobytes()
    ds.PixelData = pixel_data
    if ts != "1.2.840.10008.1.2.1":
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def _nested_sequences(valid: bytes, depth: int) -> bytes:
    """Splice ``depth`` nested undefined-length sequences in front of the first data set element."""
    meta_len = struct.unpack("<I", valid[140:144])[0]  # (0002,0000) group length value
    start = 144 + meta_len
    opening = b"".join(struct.pack("<HH", 0x0008, 0x0006) + b"SQ\0\0" + b"\xff" * 4
                       + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) for _ in range(depth))
    closing = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth
    return valid[:start] + opening + closing + valid[start:]


def _build_corpus(d: Path) -> dict[str, tuple[Path, type[E.CxrError]]]:
    c: dict[str, tuple[Path, type[E.CxrError]]] = {}

    def add(name: str, data: bytes, err: type[E.CxrError]) -> None:
        (d / name).write_bytes(data)
        c[name] = (d / name, err)

    valid = _dicom(d / "valid.dcm").read_bytes()
    add("empty.dcm", b"", E.CorruptFileError)
    add("text.dcm", b"This is a text file, not a DICOM file.\n" * 20, E.UnsupportedFormatError)
    for n in (60, 131, 200, 300, 600):
        add(f"truncated_header_{n}.dcm", valid[:n], E.StudyLoadError)
    add("truncated_pixels.dcm", valid[: len(valid) - 4000], E.CorruptFileError)
    add("nested_400.dcm", _nested_sequences(valid, 400), E.CorruptFileError)
    huge = _dicom(d / "tb.dcm", 65535, 65535, pixel_data=b"\0" * 64, NumberOfFrames=100000)
    c["terabytes.dcm"] = (huge, E.ImageTooLargeError)
    wide = _dicom(d / "wide.dcm", 1, 4_000_000_000 // 65536, pixel_data=b"\0" * 64)
    c["wide_but_small.dcm"] = (wide, E.CorruptFileError)  # fits the limit; pixel data too short
    c["slope0.dcm"] = (_dicom(d / "slope0.dcm", RescaleSlope=0, RescaleIntercept=0),
                       E.InvalidPixelTransformError)
    c["window_width0.dcm"] = (_dicom(d / "ww0.dcm", WindowCenter=100, WindowWidth=0),
                              E.InvalidPixelTransformError)
    c["window_width_negative.dcm"] = (_dicom(d / "wwn.dcm", WindowCenter=100, WindowWidth=-5),
                                      E.InvalidPixelTransformError)
    garbage = b"\xff\x4f\xff\x51" + np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    c["garbage_j2k.dcm"] = (_dicom(d / "j2k.dcm", pixel_data=encapsulate([garbage]), ts=JPEG2000Lossless),
                            E.CorruptFileError)
    no_pixels = pydicom.dcmread(d / "valid.dcm")
    del no_pixels.PixelData
    no_pixels.save_as(d / "no_pixels.dcm")
    c["no_pixels.dcm"] = (d / "no_pixels.dcm", E.StudyLoadError)
    add("bomb.png", _png_claiming(100_000, 100_000), E.ImageTooLargeError)
    add("over_limit.png", _png_claiming(8000, 8000), E.ImageTooLargeError)  # 64 MP: under Pillow's limit
    add("truncated.png", _png_claiming(64, 64)[:40], E.CorruptFileError)
    add("text.png", b"not a png", E.UnsupportedFormatError)
    add("jpeg_header_only.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 20, E.CorruptFileError)
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, type[E.CxrError]]]:
    return _build_corpus(tmp_path_factory.mktemp("bad_inputs"))


CASES = ["empty.dcm", "text.dcm", "truncated_header_60.dcm", "truncated_header_131.dcm",
         "truncated_header_200.dcm", "truncated_header_300.dcm", "truncated_header_600.dcm",
         "truncated_pixels.dcm", "nested_400.dcm", "terabytes.dcm", "wide_but_small.dcm", "slope0.dcm",
         "window_width0.dcm", "window_width_negative.dcm", "garbage_j2k.dcm", "no_pixels.dcm",
         "bomb.png", "over_limit.png", "truncated.png", "text.png", "jpeg_header_only.jpg"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_yields_typed_error_without_large_allocation(corpus, name: str) -> None:
    path, expected = corpus[name]
    tracemalloc.start()
    try:
        with pytest.raises(E.CxrError) as info:
            load_study(path, timeout=20.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, expected), f"{name}: {type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value)  # the message names the file
    assert peak < PEAK_LIMIT, f"{name}: peak {peak / 2**20:.0f} MB"


def test_corpus_is_complete(corpus) -> None:
    assert set(CASES) <= set(corpus)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(E.StudyLoadError, match="not found"):
        load_study(tmp_path / "nope.dcm")
    with pytest.raises(E.UnsupportedFormatError, match="folder"):
        load_study(tmp_path)
