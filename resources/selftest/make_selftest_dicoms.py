"""Regenerate the self-test DICOM files in this folder (run once; the outputs are committed).

    .venv/bin/python resources/selftest/make_selftest_dicoms.py

Source: ``RG1_UNCR.dcm`` from pydicom-data (an uncompressed CR chest image,
1955 x 1841, 15-bit MONOCHROME1), downscaled to 256 x 241 (area average),
then encoded once per compressed transfer syntax cxrviewer decodes:

* RLE Lossless                   pydicom's native RLE encoder
* JPEG 2000 Lossless / lossy     pylibjpeg-openjpeg (``Dataset.compress``)
* JPEG Lossless SV1, Process 14  GDCM (``gdcm.ImageChangeTransferSyntax``)
* JPEG-LS Lossless, near-lossless GDCM (CharLS inside GDCM)
* JPEG Baseline 8-bit            GDCM, from an 8-bit windowed copy

``manifest.json`` records, per file, the transfer syntax, whether the codec is
lossless, and the SHA-256 of the reference pixels, so the self-test can check
lossless decodes bit for bit and lossy ones within ``max_abs_error`` of the
reference (the RLE file's pixels; for the 8-bit file, those pixels mapped
through ``window_8bit`` to 0-255).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS, COLS = 256, 241


def _downscale(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from skimage.transform import resize

    return np.rint(resize(a.astype(np.float64), (rows, cols), order=1, anti_aliasing=True,
                          preserve_range=True)).astype(a.dtype)


def _base(src: str):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.dcmread(src)
    small = _downscale(ds.pixel_array, ROWS, COLS)
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelData = small.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "SELFTEST^CXRVIEWER"
    ds.PatientID = "SELFTEST"
    if "PixelSpacing" in ds:
        sy, sx = (float(v) for v in ds.PixelSpacing)
        ds.PixelSpacing = [round(sy * 1955 / ROWS, 4), round(sx * 1841 / COLS, 4)]
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            del ds[kw]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds, small


def _gdcm_encode(src: str, dst: str, ts_name: str, *, near_lossless: int = 0) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(src)
    if not reader.Read():
        raise RuntimeError(f"GDCM could not read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, ts_name)))
    if near_lossless:
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(False)
        codec.SetLossyError(near_lossless)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"GDCM could not encode {ts_name}")
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(dst)
    if not writer.Write():
        raise RuntimeError(f"GDCM could not write {dst}")


def main() -> int:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless, generate_uid

    src = get_testdata_file("RG1_UNCR.dcm")
    base, small = _base(src)
    ref16 = hashlib.sha256(np.ascontiguousarray(small).tobytes()).hexdigest()
    entries = []
    tmp = tempfile.mkdtemp(prefix="selftest-")
    base_path = os.path.join(tmp, "base16.dcm")
    base.save_as(base_path, enforce_file_format=True)

    # 8-bit copy for JPEG baseline: a linear window over the 0.5-99.5 percentile range.
    lo, hi = np.percentile(small, [0.5, 99.5])
    small8 = np.clip((small.astype(np.float64) - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    b8 = pydicom.dcmread(base_path)
    b8.BitsAllocated, b8.BitsStored, b8.HighBit = 8, 8, 7
    b8.PixelData = small8.tobytes()
    b8.SOPInstanceUID = generate_uid()
    b8.file_meta.MediaStorageSOPInstanceUID = b8.SOPInstanceUID
    base8_path = os.path.join(tmp, "base8.dcm")
    b8.save_as(base8_path, enforce_file_format=True)
    ref8 = hashlib.sha256(small8.tobytes()).hexdigest()

    def add(name: str, lossless: bool, ref: str, bits: int, tolerance: int) -> None:
        ds = pydicom.dcmread(HERE / name)
        entries.append({"file": name, "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                        "name": ds.file_meta.TransferSyntaxUID.name, "lossless": lossless,
                        "bits_allocated": bits, "pixels_sha256": ref, "max_abs_error": tolerance,
                        "bytes": (HERE / name).stat().st_size})

    def fresh(ds):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    ds = fresh(pydicom.dcmread(base_path))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(HERE / "rle_lossless.dcm", enforce_file_format=True)
    add("rle_lossless.dcm", True, ref16, 16, 0)

    ds = fresh(pydicom.dcmread(base_path))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(HERE / "j2k_lossless.dcm", enforce_file_format=True)
    add("j2k_lossless.dcm", True, ref16, 16, 0)

    ds = fresh(pydicom.dcmread(base_path))
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[20])
    ds.save_as(HERE / "j2k_lossy.dcm", enforce_file_format=True)
    add("j2k_lossy.dcm", False, ref16, 16, 2000)

    for name, ts, near, ref, bits, src_path, tol in (
        ("jpeg_lossless_sv1.dcm", "JPEGLosslessProcess14_1", 0, ref16, 16, base_path, 0),
        ("jpeg_lossless_p14.dcm", "JPEGLosslessProcess14", 0, ref16, 16, base_path, 0),
        ("jpegls_lossless.dcm", "JPEGLSLossless", 0, ref16, 16, base_path, 0),
        ("jpegls_near_lossless.dcm", "JPEGLSNearLossless", 2, ref16, 16, base_path, 2),
        ("jpeg_baseline_8bit.dcm", "JPEGBaselineProcess1", 0, ref8, 8, base8_path, 8),
    ):
        fresh_src = os.path.join(tmp, f"src-{name}")
        fresh(pydicom.dcmread(src_path)).save_as(fresh_src, enforce_file_format=True)
        _gdcm_encode(fresh_src, str(HERE / name), ts, near_lossless=near)
        add(name, tol == 0, ref, bits, tol)

    np.save(os.path.join(tmp, "ref16.npy"), small)
    (HERE / "manifest.json").write_text(json.dumps(
        {"source": "pydicom-data RG1_UNCR.dcm", "rows": ROWS, "columns": COLS,
         "reference_16bit_sha256": ref16, "reference_8bit_sha256": ref8,
         "reference_file": "rle_lossless.dcm", "window_8bit": [float(lo), float(hi)],
         "files": entries}, indent=2) + "\n", encoding="utf-8")
    total = sum(e["bytes"] for e in entries)
    print(f"{len(entries)} files, {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
