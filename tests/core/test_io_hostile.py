"""Hostile study inputs (issue 15): every case is generated here in ``tmp_path``; nothing is committed.

Each case asserts a typed error (or a flagged load), under 10 s, and bounded
memory: tracemalloc's peak (Python and numpy allocations, zlib/gzip buffers
included) and the growth of the process's peak RSS, both under 200 MB.
"""
from __future__ import annotations

import gzip
import os
import resource
import struct
import sys
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from cxrviewer.core.errors import CorruptFileError, CxrError, ImageTooLargeError, StudyLoadError
from cxrviewer.core.io import load_study, open_worklist, read_nih_folder
from cxrviewer.core.io._common import bounded_lines, one_line, safe_text

DEFLATED = "1.2.840.10008.1.2.1.99"
MB = 2**20
ENTRY_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (MB if sys.platform == "darwin" else 1024)


def _bounded(fn: Callable[[], object], seconds: float = 10.0, mb: float = 200.0) -> object:
    """Run ``fn``; return its result or the exception it raised, asserting time and memory."""
    rss0 = _peak_rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out: object = fn()
    except Exception as exc:  # noqa: BLE001 - returned for the caller's assertions
        out = exc
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert peak < mb * MB, f"peak traced memory {peak / MB:.0f} MB"
    assert _peak_rss_mb() - rss0 < mb, f"peak RSS grew by {_peak_rss_mb() - rss0:.0f} MB"
    return out


# --------------------------------------------------------------------------- DICOM builders
def _dataset(rows: int = 64, cols: int = 64) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _meta(ts: str) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    fm.ImplementationClassUID = "1.2.3.4"
    return fm


def _prefix(ts: str = DEFLATED) -> bytes:
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(fp, _meta(ts))
    return fp.getvalue()


def _explicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    return fp.getvalue()


def _zeros_stream(head: bytes, n_mib: int) -> bytes:
    """Raw deflate of ``head`` + ``n_mib`` MiB of zeros, built in milliseconds.

    One sync-flushed block of 1 MiB zeros (compressed in an all-zero window) is
    repeated: a valid stream that inflates ~1000x.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(MB)
    parts = [c.compress(head), c.flush(zlib.Z_SYNC_FLUSH), c.compress(zeros), c.flush(zlib.Z_SYNC_FLUSH)]
    block = c.compress(zeros) + c.flush(zlib.Z_SYNC_FLUSH)
    parts += [block] * (n_mib - 2) + [c.flush()]
    return b"".join(parts)


# --------------------------------------------------------------------------- deflated DICOM
def test_deflated_bomb_in_pixel_data_is_refused_without_inflating(tmp_path: Path) -> None:
    head = _explicit(_dataset()) + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 1700 * MB)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(_prefix() + _zeros_stream(head, 1700))
    assert 1.5 * MB < path.stat().st_size < 2 * MB  # the 1.67 MB file inflated to 1.7 GB
    err = _bounded(lambda: load_study(path))
    assert isinstance(err, ImageTooLargeError) and "refused" in str(err), err
    assert "\n" not in str(err)


@pytest.mark.parametrize("where", ["private-element", "private-in-order", "bare-zeros"])
def test_deflated_bomb_in_header_is_refused(tmp_path: Path, where: str) -> None:
    private = struct.pack("<HH2s2xI", 0x0009, 0x1010, b"OB", 1 << 30)
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    head = {"private-element": _explicit(_dataset()) + private,  # out of tag order
            "private-in-order": _explicit(ds) + private,          # 1 GiB value inside the header
            "bare-zeros": b""}[where]
    path = tmp_path / f"{where}.dcm"
    path.write_bytes(_prefix() + _zeros_stream(head, 1024))
    err = _bounded(lambda: load_study(path))
    assert isinstance(err, StudyLoadError) and str(path) in str(err), err


def test_deflated_file_is_read_in_bounded_steps(tmp_path: Path) -> None:
    ds = _dataset(300, 200)
    ds.file_meta = _meta(DEFLATED)
    arr = (np.arange(300 * 200).reshape(300, 200) % 4096).astype(np.uint16)
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    study = _bounded(lambda: load_study(path))
    assert not isinstance(study, Exception), study
    assert np.array_equal(study.stored, arr)
    assert study.meta.transfer_syntax == DEFLATED and study.meta.source_path == str(path)
    assert any("Deflated" in w for w in study.meta.warnings)


def test_corrupt_deflate_stream_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(_prefix() + bytes(range(256)) * 64)
    err = _bounded(lambda: load_study(path))
    assert isinstance(err, StudyLoadError), err


# --------------------------------------------------------------------------- NIH folders
def _nih(root: Path, *, boxes: str = "", frame: str | None = None, labels: str = "Cardiomegaly") -> Path:
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(root / "images" / "00000001_000.png")
    (root / "Data_Entry_2017.csv").write_text(ENTRY_HEADER + f"00000001_000.png,{labels},0,1,57,M,PA\n")
    if boxes:
        (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + boxes)
    if frame is not None:
        (root / "box_frame.txt").write_text(frame)
    return root


def _gzip_one_line(path: Path, prefix: bytes, n_mib: int) -> None:
    """A gzip member whose text is ``prefix`` + ``n_mib`` MiB of ``'0'`` and no newline (built cheaply)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"0" * MB
    parts = [c.compress(prefix), c.flush(zlib.Z_SYNC_FLUSH), c.compress(chunk), c.flush(zlib.Z_SYNC_FLUSH)]
    block = c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    parts += [block] * (n_mib - 2) + [c.flush()]
    crc = zlib.crc32(prefix)
    for _ in range(n_mib):
        crc = zlib.crc32(chunk, crc)
    size = (len(prefix) + n_mib * MB) & 0xFFFFFFFF
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        f.writelines(parts)
        f.write(struct.pack("<II", crc, size))


def test_gzipped_label_file_with_a_1_gib_line_is_refused_fast(tmp_path: Path) -> None:
    root = _nih(tmp_path / "nih")
    (root / "Data_Entry_2017.csv").unlink()
    label = root / "Data_Entry_2017_v2020.csv.gz"
    _gzip_one_line(label, (ENTRY_HEADER + "00000001_000.png,").encode(), 1024)
    assert label.stat().st_size < 2 * MB
    err = _bounded(lambda: read_nih_folder(root))
    assert isinstance(err, CorruptFileError) and "line longer than" in str(err), err
    wl = _bounded(lambda: open_worklist([root]))
    assert not wl.refs and any("line longer than" in e for e in wl.errors)


def test_bounded_lines_ceilings(tmp_path: Path) -> None:
    many = tmp_path / "many.csv.gz"
    with gzip.open(many, "wb", compresslevel=1) as f:
        f.write(b"a\n" * 5000)
    with pytest.raises(CorruptFileError, match="more than 1000 lines"):
        list(bounded_lines(many, max_lines=1000))
    with pytest.raises(CorruptFileError, match="larger than"):
        list(bounded_lines(many, max_bytes=4096))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(CorruptFileError, match="not utf-8"):
        list(bounded_lines(bad))
    assert list(bounded_lines(many))[:2] == ["a\n", "a\n"]


@pytest.mark.parametrize("frame", ["0", "-5", "nan", "abc", "1e400", "99999999999999999999", "", "12.5"])
def test_bad_box_frame_is_a_typed_error(tmp_path: Path, frame: str) -> None:
    root = _nih(tmp_path / "nih", frame=frame, boxes="00000001_000.png,Mass,1,2,3,4\n")
    with pytest.raises(CorruptFileError, match="box_frame.txt"):
        read_nih_folder(root)


def test_good_box_frame_scales_boxes(tmp_path: Path) -> None:
    root = _nih(tmp_path / "nih", frame="128\n", boxes="00000001_000.png,Mass,10,20,30,40\n")
    study = read_nih_folder(root)[0].load()
    assert [(b.x, b.y, b.w, b.h) for b in study.gt_boxes] == [(5.0, 10.0, 15.0, 20.0)]


def test_nonfinite_negative_and_outside_boxes_are_dropped_with_warnings(tmp_path: Path) -> None:
    rows = ("00000001_000.png,Mass,nan,2,3,4\n"
            "00000001_000.png,Mass,1,2,inf,4\n"
            "00000001_000.png,Mass,1,2,-3,4\n"
            "00000001_000.png,Mass,1,2,3,0\n"
            "00000001_000.png,Mass,2000,2000,10,10\n"
            "00000001_000.png,Nodule,1000,1000,100,100\n"   # crosses the edge: clipped
            "00000001_000.png,Cardiomegaly,100,200,300,400\n")
    root = _nih(tmp_path / "nih", boxes=rows)
    wl = read_nih_folder(root)
    ref = wl[0]
    assert [(b.label, b.x, b.y, b.w, b.h) for b in ref.gt_boxes] == [
        ("Nodule", 1000.0, 1000.0, 24.0, 24.0), ("Cardiomegaly", 100.0, 200.0, 300.0, 400.0)]
    assert sum("dropped" in w for w in ref.warnings) == 5 and any("clipped" in w for w in ref.warnings)
    assert sum("dropped" in e for e in wl.errors) == 5
    study = ref.load()
    assert all(np.isfinite([b.x, b.y, b.w, b.h]).all() and b.w > 0 and b.h > 0 for b in study.gt_boxes)
    assert sum("dropped" in w for w in study.meta.warnings) == 5


def test_unknown_labels_are_flagged(tmp_path: Path) -> None:
    root = _nih(tmp_path / "nih", labels="Foo|Cardiomegaly|Bar\u202e")
    wl = read_nih_folder(root)
    ref = wl[0]
    assert ref.labels["Cardiomegaly"] == 1 and sum(ref.labels.values()) == 1
    assert len(ref.warnings) == 2 and all("unknown finding label" in w for w in ref.warnings)
    assert "\u202e" not in " ".join(wl.errors) and "\\u202e" in " ".join(wl.errors)
    assert any("unknown finding label" in w for w in ref.load().meta.warnings)


# --------------------------------------------------------------------------- names, links, warnings
def test_symlink_loop_is_reported_as_a_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.dcm"
    os.symlink(loop, loop)
    err = _bounded(lambda: load_study(loop))
    assert isinstance(err, StudyLoadError) and "symbolic link loop" in str(err), err
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(StudyLoadError, match="loop"):
        load_study(a)
    broken = tmp_path / "broken.png"
    os.symlink(tmp_path / "nowhere.png", broken)
    with pytest.raises(StudyLoadError, match="broken symbolic link"):
        load_study(broken)
    with pytest.raises(StudyLoadError, match="file not found"):
        load_study(tmp_path / "absent.png")


def test_bidi_and_control_characters_are_escaped(tmp_path: Path) -> None:
    assert safe_text("x\u202egnp.exe") == "x\\u202egnp.exe"
    assert safe_text("a\nb\x1b[31m\x00") == "a\\x0ab\\x1b[31m\\x00"
    assert safe_text("ok name é.png") == "ok name é.png"
    assert one_line("line one\n  line two\r\n") == "line one line two"
    assert len(safe_text("x" * 10_000)) == 512
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    stem = "evil\u202egnp\n"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(root / "images" / f"{stem}.png")
    (root / "Data_Entry_2017.csv").write_text(ENTRY_HEADER + f"\"{stem}.png\",Mass,0,1\u202e,57,M,PA\n")
    ref = read_nih_folder(root)[0]
    assert ref.display_name == "evil\\u202egnp\\x0a" and ref.patient_id == "1\\u202e"


def test_dicom_header_text_is_escaped_and_warnings_are_one_line(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture) -> None:
    ds = _dataset(32, 32)
    ds.file_meta = _meta("1.2.840.10008.1.2.1")
    ds.SpecificCharacterSet = "ISO_IR 192"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "1.2.3\n\x1b[2J4"  # invalid UI value: pydicom warns while reading it
    ds.PatientID = "evil\u202eDI\x1b[2J"
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    path = tmp_path / "names.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    capfd.readouterr()
    study = load_study(path)
    out = capfd.readouterr()
    assert "\n" not in study.study_id and "\x1b" not in study.study_id and "\u202e" not in (study.meta.patient_id or "")
    assert "\x1b" not in (study.meta.patient_id or "")
    assert all("\n" not in w for w in study.meta.warnings)
    assert any("Invalid value for VR UI" in w for w in study.meta.warnings), study.meta.warnings
    assert "\u202e" not in out.err and "Warning" not in out.err and "warn" not in out.err.lower()


def test_every_error_here_is_typed_and_one_line(tmp_path: Path) -> None:
    path = tmp_path / "multi\nline\u202e.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2.840" * 10)
    err = _bounded(lambda: load_study(path))
    assert isinstance(err, CxrError), err


def test_fifo_and_odd_names_in_a_worklist(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    err = _bounded(lambda: load_study(fifo), seconds=5)
    assert isinstance(err, StudyLoadError) and "not a regular file" in str(err), err
    odd = tmp_path / "scan\u202egnp.png"
    Image.fromarray(np.full((8, 8), 1, np.uint8)).save(odd, format="PNG")
    wl = open_worklist([odd, tmp_path])
    assert all("\u202e" not in r.display_name for r in wl.refs)
    assert any(r.display_name == "scan\\u202egnp.png" for r in wl.refs)


def test_unknown_box_label_is_dropped_with_a_note(tmp_path: Path) -> None:
    root = _nih(tmp_path / "nih", boxes="00000001_000.png,Unicorn,1,2,3,4\n00000001_000.png,Mass,x,2,3,4\n")
    ref = read_nih_folder(root)[0]
    assert not ref.gt_boxes and len(ref.warnings) == 2 and all("dropped" in w for w in ref.warnings)
