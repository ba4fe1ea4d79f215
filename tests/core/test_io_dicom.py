"""DICOM loading: RG1 reference files, pixel transforms, bit handling, the decoder child."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from cxrviewer.core.errors import CxrError, DecodeTimeoutError, InvalidPixelTransformError  # noqa: E402
from cxrviewer.core.io import load_study  # noqa: E402


def make_dicom(path: Path, rows: int = 32, cols: int = 48, *, pixels: np.ndarray | bytes | None = None,
               bits_alloc: int = 16, bits_stored: int = 12, signed: bool = False,
               photometric: str = "MONOCHROME2", ts: str = ExplicitVRLittleEndian, **attrs) -> Path:
    """Write a small synthetic DICOM file; ``attrs`` are extra/overriding header keywords."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = "PAT-1"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "Test"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if pixels is None:
        pixels = (np.arange(rows * cols) % (1 << min(bits_stored, 12))).astype(f"<u{bits_alloc // 8}")
    ds.PixelData = pixels if isinstance(pixels, bytes) else np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- RG1 (pydicom-data)
@pytest.fixture(scope="module")
def rg1(rg1_uncr: Path):
    return load_study(rg1_uncr)


def test_rg1_uncompressed_and_j2k_lossless_same_pixels(rg1, rg1_j2kr: Path) -> None:
    j2k = load_study(rg1_j2kr)
    assert j2k.meta.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert rg1.meta.transfer_syntax == "1.2.840.10008.1.2.1"
    assert j2k.stored.dtype == rg1.stored.dtype == np.uint16
    assert j2k.pixel_sha256() == rg1.pixel_sha256()


def test_rg1_j2k_lossy_loads_close_to_original(rg1, rg1_j2ki: Path) -> None:
    lossy = load_study(rg1_j2ki)
    assert lossy.shape == rg1.shape == (1955, 1841)
    diff = np.abs(lossy.modality - rg1.modality)
    assert float(diff.mean()) < 0.01 * float(rg1.modality.max())


def test_rg1_metadata_and_window(rg1) -> None:
    m = rg1.meta
    assert m.format == "dicom" and m.modality == "CR" and m.view_position == "PA"
    assert m.photometric == "MONOCHROME1" and m.bits_stored == 15
    assert m.sop_uid and m.study_uid and m.series_uid and m.patient_id
    assert m.manufacturer
    assert rg1.window == (15000.0, 30000.0)
    assert rg1.invert_display is True
    assert m.pixel_spacing is None  # header says 0.000\0.000, refused with a warning
    assert any("PixelSpacing" in w for w in m.warnings)
    assert int(rg1.stored.max()) < 2 ** 15


def _lungs_vs_mediastinum(img: np.ndarray) -> tuple[float, float]:
    """Mean of two lateral lung boxes and of a central mediastinum strip (upper-mid chest)."""
    h, w = img.shape
    r0, r1 = int(0.22 * h), int(0.45 * h)
    right_lung = img[r0:r1, int(0.22 * w):int(0.35 * w)]
    left_lung = img[r0:r1, int(0.65 * w):int(0.78 * w)]
    mediastinum = img[r0:r1, int(0.47 * w):int(0.53 * w)]
    return float((right_lung.mean() + left_lung.mean()) / 2), float(mediastinum.mean())


def test_rg1_monochrome1_lungs_dark_in_display_and_model_input(rg1) -> None:
    lungs, medi = _lungs_vs_mediastinum(rg1.display_image())
    assert lungs < medi - 0.05
    lungs, medi = _lungs_vs_mediastinum(rg1.model_input)
    assert lungs < medi - 0.05
    assert rg1.model_input.dtype == np.float32
    assert 0.0 <= float(rg1.model_input.min()) and float(rg1.model_input.max()) <= 1.0
    # without the inversion the relation flips: proves MONOCHROME1 handling matters
    lungs, medi = _lungs_vs_mediastinum(rg1.display_image(invert=False))
    assert lungs > medi


def test_file_not_written(rg1_uncr: Path) -> None:
    before = rg1_uncr.stat().st_mtime_ns
    load_study(rg1_uncr)
    assert rg1_uncr.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- synthetic headers
def test_bits_stored_masks_high_bits(tmp_path: Path) -> None:
    raw = np.array([[0xF123, 0x0FFF, 0x1000, 5]], dtype="<u2")
    s = load_study(make_dicom(tmp_path / "m.dcm", 1, 4, pixels=raw, bits_stored=12))
    assert s.stored.tolist() == [[0x123, 0xFFF, 0, 5]]


def test_signed_pixels_sign_extended_and_rescaled(tmp_path: Path) -> None:
    # 12-bit two's complement stored in 16 bits: 0x0FFF = -1, 0x0800 = -2048, 0x07FF = 2047
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0x0001]], dtype="<u2")
    p = make_dicom(tmp_path / "s.dcm", 1, 4, pixels=raw, bits_stored=12, signed=True,
                   RescaleSlope=2, RescaleIntercept=-10, WindowCenter=0, WindowWidth=100)
    s = load_study(p)
    assert s.stored.dtype == np.int16
    assert s.stored.tolist() == [[-1, -2048, 2047, 1]]
    assert s.modality.tolist() == [[-12.0, -4106.0, 4084.0, -8.0]]
    assert s.window == (0.0, 100.0)


def test_monochrome1_inverts_model_input(tmp_path: Path) -> None:
    px = np.array([[0, 4095]], dtype="<u2")
    s1 = load_study(make_dicom(tmp_path / "m1.dcm", 1, 2, pixels=px, photometric="MONOCHROME1",
                               WindowCenter=2047.5, WindowWidth=4095))
    s2 = load_study(make_dicom(tmp_path / "m2.dcm", 1, 2, pixels=px, WindowCenter=2047.5, WindowWidth=4095))
    assert s1.invert_display and not s2.invert_display
    assert s1.model_input.tolist() == [[1.0, 0.0]]
    assert s2.model_input.tolist() == [[0.0, 1.0]]
    assert s1.display_image().tolist() == s1.model_input.tolist()


def test_multiframe_first_frame_with_warning(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 5), i, dtype="<u2") for i in (7, 8, 9)])
    s = load_study(make_dicom(tmp_path / "mf.dcm", 4, 5, pixels=frames, NumberOfFrames=3))
    assert s.shape == (4, 5) and int(s.stored[0, 0]) == 7
    assert s.meta.number_of_frames == 3
    assert any("multi-frame" in w for w in s.meta.warnings)


def test_imager_pixel_spacing_used(tmp_path: Path) -> None:
    s = load_study(make_dicom(tmp_path / "sp.dcm", ImagerPixelSpacing=[0.15, 0.16]))
    assert s.meta.pixel_spacing == (0.15, 0.16)


def test_voi_lut_sequence_gives_window(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [256, 100, 8]
    lut = np.clip(np.arange(256) - 50, 0, 100).astype(np.uint8)  # ramps over inputs 150..250
    item.LUTData = lut.astype("<u2").tobytes()
    p = make_dicom(tmp_path / "voi.dcm", VOILUTSequence=[item])
    c, w = load_study(p).window
    assert 190 <= c <= 210 and 95 <= w <= 110


def test_no_window_uses_percentiles(tmp_path: Path) -> None:
    s = load_study(make_dicom(tmp_path / "nw.dcm"))
    c, w = s.window
    assert w > 0 and 0 < c < 4096
    assert any("window" in x for x in s.meta.warnings)


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    """Decision: a raw data set (no preamble, no DICM) is read with pydicom ``force`` plus a warning."""
    p = make_dicom(tmp_path / "full.dcm", pixels=np.full((32, 48), 77, dtype="<u2"))
    ds = pydicom.dcmread(p)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    s = load_study(raw)
    assert s.shape == (32, 48) and int(s.stored[0, 0]) == 77
    assert any("preamble" in w for w in s.meta.warnings)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_nan_slope_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidPixelTransformError):
        load_study(make_dicom(tmp_path / "nan.dcm", RescaleSlope="NaN", RescaleIntercept=0))


# --------------------------------------------------------------------------- decoder child
def test_decoder_child_abort_is_a_typed_error(rg1_j2kr: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRVIEWER_DECODE_CHILD_FAULT", "abort")
    with pytest.raises(DecodeTimeoutError, match="crashed"):
        load_study(rg1_j2kr)
    monkeypatch.delenv("CXRVIEWER_DECODE_CHILD_FAULT")
    assert load_study(rg1_j2kr).shape == (1955, 1841)  # a fresh child takes over


def test_decoder_child_hang_times_out(rg1_j2kr: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRVIEWER_DECODE_CHILD_FAULT", "hang")
    with pytest.raises(DecodeTimeoutError, match="longer than"):
        load_study(rg1_j2kr, timeout=1.0)
    monkeypatch.setenv("CXRVIEWER_DECODE_CHILD_FAULT", "exit")
    with pytest.raises(CxrError):
        load_study(rg1_j2kr)


def test_missing_decoder_names_the_plugin(rg1_j2kr: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    from cxrviewer.core.errors import MissingDecoderError

    class NoPlugins:
        available_plugins = ()
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]
        UID = pydicom.uid.UID("1.2.840.10008.1.2.4.90")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: NoPlugins())
    with pytest.raises(MissingDecoderError, match="pylibjpeg-openjpeg"):
        load_study(rg1_j2kr)


def test_big_endian_and_native_reads_agree() -> None:
    from pydicom.data import get_testdata_file

    big, little = get_testdata_file("MR_small_bigendian.dcm"), get_testdata_file("MR_small.dcm")
    if big is None or little is None:
        pytest.skip("pydicom test files absent")
    a, b = load_study(big), load_study(little)
    assert a.stored.dtype == b.stored.dtype and np.array_equal(a.stored, b.stored)
    assert np.array_equal(a.stored, pydicom.dcmread(little).pixel_array)
