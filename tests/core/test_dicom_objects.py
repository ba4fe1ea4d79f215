"""DICOM objects out (SR, SEG, GSPS, SC) and back in, on the real RG1 chest radiograph."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data")

from cxrviewer.core.annotations import AnnotationStore  # noqa: E402
from cxrviewer.core.annotations.model import InvalidBoxError  # noqa: E402
from cxrviewer.core.dicom_objects import (  # noqa: E402
    OHIF_RECTANGLE, DicomObjectError, export_study, import_boxes, read_boxes, read_segmentation,
    study_source,
)
from cxrviewer.core.errors import ExportError  # noqa: E402
from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.io import load_study  # noqa: E402


def _rg1() -> str:
    try:
        return pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # noqa: BLE001 - pydicom-data not installed or file missing
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")


def _project(tmp_path, path: str, name: str = "p.cxrann"):
    store = AnnotationStore(tmp_path / name, annotator="alice")
    sid = store.register_study(load_study(path)).id
    store.add_box(sid, "Nodule", 100.5, 200.25, 50.0, 60.75)
    store.add_box(sid, "Effusion", 900.0, 1200.0, 400.125, 300.0)
    store.add_proposals(sid, [Box("Atelectasis", 300.0, 400.0, 222.5, 111.25, 0.8713)],
                        "densenet121-res224-all")
    store.accept_proposal(store.proposals(sid)[0].id)
    return store, sid


def _masks(shape):
    h, w = shape
    lung = np.zeros(shape, bool)
    lung[h // 6: 3 * h // 4, w // 8: 7 * w // 16] = True
    lung[h // 6: 3 * h // 4, 9 * w // 16: 7 * w // 8] = True
    heart = np.zeros(shape, bool)
    heart[h // 2: 3 * h // 4, 3 * w // 8: 5 * w // 8] = True
    yy, xx = np.mgrid[0:h, 0:w]
    cam = ((xx / w) * (yy / h)).astype(np.float32)
    return {"lung": lung, "heart": heart}, cam


@pytest.fixture(scope="module")
def rg1_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rg1")
    path = _rg1()
    store, sid = _project(tmp, path)
    masks, cam = _masks((store.study(sid).height, store.study(sid).width))
    files = export_study(store, sid, tmp / "out", masks=masks, fractional={"Cardiomegaly": cam},
                         thresholded=("Cardiomegaly", cam, 0.5), algorithm="lung-heart-seg")
    yield dict(store=store, sid=sid, files=files, masks=masks, cam=cam, path=path)
    store.close()


def _key(b):
    return (b.label, b.source, b.model_name, b.score)


def _same_boxes(got, want):
    assert len(got) == len(want) == 3
    for g, w in zip(sorted(got, key=lambda b: b.x), sorted(want, key=lambda b: b.x)):
        assert _key(g) == _key(w)
        assert np.allclose([g.x, g.y, g.w, g.h], [w.x, w.y, w.w, w.h], atol=1e-3)


def test_sr_read_with_highdicom_matches_store(rg1_export):
    store, sid, files = rg1_export["store"], rg1_export["sid"], rg1_export["files"]
    assert set(files) == {"sr", "gsps", "seg", "threshold", "fractional"}  # DICOM: no SC
    sr = hd.sr.srread(files["sr"])
    groups = sr.content.get_planar_roi_measurement_groups()
    want = {round(b.x, 3): b for b in store.boxes(sid)}
    assert len(groups) == 3
    for g in groups:
        pts = np.asarray(g.roi.value)
        x0, y0 = pts.min(axis=0)
        b = want[round(float(x0), 3)]
        assert np.allclose(pts.max(axis=0) - pts.min(axis=0), [b.w, b.h], atol=1e-3)
        assert pts.shape == (5, 2) and np.allclose(pts[0], pts[-1])  # closed rectangle
        assert g.tracking_identifier == OHIF_RECTANGLE
        assert g.finding_type.meaning == {"Nodule": "Nodule", "Effusion": "Pleural effusion",
                                          "Atelectasis": "Atelectasis"}[b.label]
        (image,) = g.roi.ContentSequence
        assert (image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                == store.study(sid).identity.sop_uid)
    schemes = {g.finding_type.scheme_designator for g in groups}
    assert schemes == {"SCT", "99CXRV"}  # Atelectasis has no SNOMED code in DICOM's tables
    assert len({g.tracking_uid for g in groups}) == 3


def test_sr_read_with_pydicom_references_source_and_provenance(rg1_export):
    store, sid, files = rg1_export["store"], rg1_export["sid"], rg1_export["files"]
    ds = pydicom.dcmread(files["sr"])
    src = pydicom.dcmread(rg1_export["path"], stop_before_pixels=True)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert "OtherPatientIDs" not in ds  # only the patient/study modules are copied
    got = read_boxes(files["sr"])
    assert got.kind == "sr" and got.skipped == 0
    assert got.referenced_sop_uids == [src.SOPInstanceUID]
    _same_boxes(got.boxes, store.boxes(sid))
    assert {b.annotator for b in got.boxes} == {"alice"}
    model = [b for b in got.boxes if b.source == "model"]
    assert [(b.model_name, b.score) for b in model] == [("densenet121-res224-all", 0.8713)]


def test_seg_pixels_equal_masks(rg1_export):
    files, masks, cam = rg1_export["files"], rg1_export["masks"], rg1_export["cam"]
    seg = read_segmentation(files["seg"])
    assert list(seg) == ["lung", "heart"]
    for name in masks:
        assert np.array_equal(seg[name], masks[name])
    hseg = hd.seg.segread(files["seg"])
    assert hseg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert np.array_equal(hseg.pixel_array.reshape(2, *masks["lung"].shape)[1], masks["heart"])
    raw = pydicom.dcmread(files["seg"])  # pydicom alone: one bit-packed frame per segment
    assert raw.SegmentationType == "BINARY" and raw.BitsAllocated == 1
    assert [s.SegmentLabel for s in raw.SegmentSequence] == ["lung", "heart"]
    assert np.array_equal(raw.pixel_array.astype(bool), np.stack([masks["lung"], masks["heart"]]))
    thr = read_segmentation(files["threshold"])
    assert list(thr) == ["Cardiomegaly >= 0.5"]
    assert np.array_equal(thr["Cardiomegaly >= 0.5"], cam >= 0.5)
    desc = pydicom.dcmread(files["threshold"]).SegmentSequence[0].SegmentDescription
    assert desc == "Cardiomegaly map thresholded: pixels with value >= 0.5"
    frac = read_segmentation(files["fractional"])
    assert np.abs(frac["Cardiomegaly"] - cam).max() <= 0.5 / 255 + 1e-6


def test_gsps_read_back(rg1_export):
    store, sid, files = rg1_export["store"], rg1_export["sid"], rg1_export["files"]
    ds = pydicom.dcmread(files["gsps"])
    assert ds.Modality == "PR"
    assert (ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
            == store.study(sid).identity.sop_uid)
    objs = [g for a in ds.GraphicAnnotationSequence for g in a.GraphicObjectSequence]
    assert len(objs) == 3 and all(o.GraphicAnnotationUnits == "PIXEL" for o in objs)
    got = read_boxes(files["gsps"])
    assert got.kind == "gsps"
    _same_boxes(got.boxes, store.boxes(sid))


@pytest.mark.parametrize("kind", ["sr", "gsps"])
def test_export_import_round_trip(rg1_export, tmp_path, kind):
    store, sid, files = rg1_export["store"], rg1_export["sid"], rg1_export["files"]
    fresh = AnnotationStore(tmp_path / "fresh.cxrann", annotator="bob")
    try:
        edit = import_boxes(fresh, files[kind], source=rg1_export["path"])
        assert len(edit.box_ids) == 3
        (rec,) = fresh.studies()
        assert rec.identity.sop_uid == store.study(sid).identity.sop_uid
        assert (rec.width, rec.height) == (store.study(sid).width, store.study(sid).height)
        _same_boxes(fresh.boxes(rec.id), store.boxes(sid))
        again = import_boxes(fresh, files[kind])  # found by SOP UID now; duplicates skipped
        assert again.box_ids == ()
    finally:
        fresh.close()


def test_png_study_gets_a_derived_secondary_capture(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    png = tmp_path / "00000001_000.png"
    Image.fromarray(pixels).save(png)
    store = AnnotationStore(tmp_path / "png.cxrann", annotator="alice")
    sid = store.register_study(load_study(png)).id
    store.add_box(sid, "Mass", 10.5, 12.0, 20.0, 30.25)
    files = export_study(store, sid, tmp_path / "out", masks={"heart": pixels > 128})
    assert list(files) == ["sc", "sr", "gsps", "seg"]
    sc = pydicom.dcmread(files["sc"])
    assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"] and sc.ConversionType == "WSD"
    assert not sc.get("PatientID") and not sc.get("PatientName")
    assert np.array_equal(sc.pixel_array, pixels)
    got = read_boxes(files["sr"])
    assert got.referenced_sop_uids == [sc.SOPInstanceUID]
    assert pydicom.dcmread(files["sr"]).StudyInstanceUID == sc.StudyInstanceUID
    fresh = AnnotationStore(tmp_path / "fresh.cxrann", annotator="bob")
    fsid = fresh.register_study(load_study(png)).id
    import_boxes(fresh, files["gsps"], study_id=fsid)
    assert [(b.label, b.x, b.y, b.w, b.h) for b in fresh.boxes(fsid)] == [
        ("Mass", 10.5, 12.0, 20.0, 30.25)]
    with pytest.raises(DicomObjectError, match="not in the project"):
        import_boxes(fresh, files["sr"], skip_duplicates=False)  # the SC is not a project study
    store.close()
    fresh.close()


def test_errors_are_typed_and_one_line(rg1_export, tmp_path):
    store = AnnotationStore(tmp_path / "e.cxrann", annotator="alice")
    sid = store.register_study(load_study(rg1_export["path"])).id
    with pytest.raises(DicomObjectError) as err:
        export_study(store, sid, tmp_path / "out")  # no boxes, masks or maps
    assert isinstance(err.value, ExportError) and "\n" not in str(err.value)
    with pytest.raises(DicomObjectError, match="mask 'lung' is 4x4"):
        export_study(store, sid, tmp_path / "out", masks={"lung": np.ones((4, 4))}, boxes=False)
    with pytest.raises(DicomObjectError, match=r"\[0, 1\]"):
        export_study(store, sid, tmp_path / "out", fractional={"x": np.full((1955, 1841), 2.0)})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(DicomObjectError, match="not a structured report"):
        read_boxes(rg1_export["path"])
    vindr = AnnotationStore(tmp_path / "v.cxrann", annotator="x", label_set="rsna-pneumonia")
    with pytest.raises(InvalidBoxError):  # the store's own error for a class it does not hold
        import_boxes(vindr, rg1_export["files"]["sr"], source=rg1_export["path"])
    assert vindr.studies() == [] or all(not vindr.boxes(s.id) for s in vindr.studies())
    store.close()
    vindr.close()
    with pytest.raises(DicomObjectError, match="no known file"):
        fresh = AnnotationStore(tmp_path / "n.cxrann")
        from cxrviewer.core.annotations.model import StudyIdentity
        nid = fresh.ensure_study(StudyIdentity("x.png"), width=4, height=4).id
        study_source(fresh, nid)


def test_sr_from_another_tool(tmp_path):
    """A third-party TID 1500 SR: unclosed 4-point rectangle, a 2-point line (skipped)."""
    from pydicom.sr.codedict import codes

    path = _rg1()
    src = pydicom.dcmread(path, stop_before_pixels=True)
    ref = hd.sr.SourceImageForRegion.from_source_image(src)

    def group(points, finding, n):
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"roi {n}"),
            referenced_region=hd.sr.ImageRegion(graphic_type="POLYLINE",
                                                graphic_data=np.array(points, float),
                                                source_image=ref),
            finding_type=finding,
            algorithm_id=hd.sr.AlgorithmIdentification(name="vendor-ai", version="2"))
    rect = [[10, 20], [110, 20], [110, 70], [10, 70]]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.SCT.PlainRadiography,
        imaging_measurements=[group(rect, codes.SCT.Pneumothorax, 1),
                              group([[1, 1], [5, 5]], codes.SCT.Nodule, 2)])
    sr = hd.sr.Comprehensive3DSR(evidence=[src], content=report[0], series_instance_uid=hd.UID(),
                                 series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
                                 manufacturer="other")
    sr.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    got = read_boxes(tmp_path / "other.dcm")
    assert got.skipped == 1 and len(got.boxes) == 1
    b = got.boxes[0]
    assert (b.label, b.x, b.y, b.w, b.h) == ("Pneumothorax", 10.0, 20.0, 100.0, 50.0)
    assert (b.source, b.model_name, b.referenced_sop_uid) == ("model", "vendor-ai", src.SOPInstanceUID)


def test_gsps_from_another_tool(tmp_path):
    """A third-party GSPS: class in the text object or only in the layer; DISPLAY units skipped."""
    path = _rg1()
    src = pydicom.dcmread(path, stop_before_pixels=True)
    layer = hd.pr.GraphicLayer(layer_name="FINDINGS", order=1, description="Pneumothorax")

    def rect(units="PIXEL", pts=((5, 6), (45, 6), (45, 26), (5, 26), (5, 6))):
        return hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=np.array(pts, float),
                                   units=units)
    with_text = hd.pr.GraphicAnnotation(
        referenced_images=[src], graphic_layer=layer, graphic_objects=[rect()],
        text_objects=[hd.pr.TextObject(text_value="Nodule", units="PIXEL",
                                       anchor_point=(5.0, 6.0))])
    layer_only = hd.pr.GraphicAnnotation(
        referenced_images=[src], graphic_layer=layer,
        graphic_objects=[rect(pts=((100, 100), (150, 100), (150, 180), (100, 180))),
                         rect("DISPLAY", ((0.1, 0.1), (0.2, 0.1), (0.2, 0.2), (0.1, 0.2)))])
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[src], series_instance_uid=hd.UID(), series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="other",
        manufacturer_model_name="m", software_versions="1", device_serial_number="1",
        content_label="OTHER", graphic_annotations=[with_text, layer_only], graphic_layers=[layer])
    pr.save_as(tmp_path / "other_pr.dcm", enforce_file_format=True)
    got = read_boxes(tmp_path / "other_pr.dcm")
    assert got.skipped == 1
    assert [(b.label, b.x, b.y, b.w, b.h, b.source) for b in got.boxes] == [
        ("Nodule", 5.0, 6.0, 40.0, 20.0, "manual"), ("Pneumothorax", 100.0, 100.0, 50.0, 80.0,
                                                     "manual")]
    assert {b.referenced_sop_uid for b in got.boxes} == {src.SOPInstanceUID}


def _dciodvfy_errors(path) -> list[str]:
    res = subprocess.run([shutil.which("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors(rg1_export, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for kind, path in rg1_export["files"].items():
        assert _dciodvfy_errors(path) == [], kind
    from PIL import Image

    png = tmp_path / "image.png"
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 7).save(png)
    store = AnnotationStore(tmp_path / "d.cxrann", annotator="alice")
    sid = store.register_study(load_study(png)).id
    store.add_box(sid, "Hernia", 1.0, 2.0, 3.0, 4.0)
    files = export_study(store, sid, tmp_path / "out", masks={"heart": np.eye(48, 40)},
                         fractional={"Hernia": np.full((48, 40), 0.25)})
    assert set(files) == {"sc", "sr", "gsps", "seg", "fractional"}
    for kind, path in files.items():
        assert _dciodvfy_errors(path) == [], kind
    assert pydicom.dcmread(files["sc"]).BitsAllocated == 16
    store.close()


def test_explainer_mask_stack_to_image_size(rg1_export):
    from cxrviewer.core.dicom_objects import binary_segmentation, segments_from_stack, to_image_size

    rng = np.random.default_rng(1)
    stack = rng.random((3, 32, 30)).astype(np.float32)
    shape = (1955, 1841)
    masks = segments_from_stack(stack, ["left lung", "right lung", "heart"], shape)
    assert all(m.shape == shape and m.dtype == bool for m in masks.values())
    # nearest neighbour: each image pixel takes the mask cell its centre falls in
    assert masks["heart"][0, 0] == (stack[2, 0, 0] >= 0.5)
    assert masks["heart"][-1, -1] == (stack[2, -1, -1] >= 0.5)
    assert abs(masks["heart"].mean() - (stack[2] >= 0.5).mean()) < 0.02
    path = rg1_export["files"]["seg"].parent / "stack.dcm"
    from cxrviewer.core.dicom_objects import study_source, write_dataset

    source = study_source(rg1_export["store"], rg1_export["sid"])
    write_dataset(binary_segmentation(source, masks, algorithm="unet"), path)
    back = read_segmentation(path)
    assert list(back) == ["left lung", "right lung", "heart"]
    assert all(np.array_equal(back[k], masks[k]) for k in masks)
    cam = to_image_size(stack[0], shape, binary=False)
    assert cam.shape == shape and cam.dtype == np.float32 and 0 <= cam.min() <= cam.max() <= 1
    with pytest.raises(DicomObjectError, match="does not match"):
        segments_from_stack(stack, ["heart"], shape)


_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
                "AccessionNumber", "StudyID", "ReferringPhysicianName", "InstitutionName",
                "StudyDate", "StudyTime", "IssuerOfPatientID", "PatientAge")


def test_objects_carry_no_identifier_the_source_lacks(rg1_export):
    src = pydicom.dcmread(rg1_export["path"], stop_before_pixels=True)
    uids = set()
    for kind, path in rg1_export["files"].items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in _IDENTIFYING:
            if ds.get(kw) not in (None, ""):
                assert str(ds.get(kw)) == str(src.get(kw)), (kind, kw)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 2 * len(rg1_export["files"])  # new instance and series UIDs each
    assert not uids & {src.SOPInstanceUID, src.SeriesInstanceUID}


def test_snomed_finding_maps_onto_each_projects_label_set(rg1_export, tmp_path):
    path = rg1_export["path"]
    vindr = AnnotationStore(tmp_path / "v.cxrann", annotator="alice", label_set="vindr-cxr")
    sid = vindr.register_study(load_study(path)).id
    vindr.add_box(sid, "Pleural effusion", 10.0, 20.0, 30.0, 40.0)
    files = export_study(vindr, sid, tmp_path / "out")
    (code,) = {b.code for b in read_boxes(files["sr"]).boxes}
    assert code[:2] == ("60046008", "SCT")
    for label_set, want in (("vindr-cxr", "Pleural effusion"), ("nih14", "Effusion")):
        fresh = AnnotationStore(tmp_path / f"{label_set}.cxrann", label_set=label_set)
        import_boxes(fresh, files["sr"], source=path)
        assert [b.label for s in fresh.studies() for b in fresh.boxes(s.id)] == [want]
        fresh.close()
    vindr.close()


def test_tracking_uids_are_stable_and_writes_atomic(rg1_export, tmp_path):
    from cxrviewer.core.dicom_objects import box_report, write_dataset

    store, sid = rg1_export["store"], rg1_export["sid"]
    source = study_source(store, sid)
    first, second = (box_report(source, store.boxes(sid), exported_by="x") for _ in range(2))
    assert first.SOPInstanceUID != second.SOPInstanceUID
    target = write_dataset(first, tmp_path / "SR.dcm")
    track = sorted(b.tracking_uid for b in read_boxes(target).boxes)
    write_dataset(second, tmp_path / "SR2.dcm")
    assert sorted(b.tracking_uid for b in read_boxes(tmp_path / "SR2.dcm").boxes) == track
    before = target.read_bytes()
    def broken(fh, **_kw):  # a write that fails half-way (disk full)
        fh.write(b"partial")
        raise OSError(28, "No space left on device")
    second.save_as = broken
    with pytest.raises(DicomObjectError, match="No space left"):
        write_dataset(second, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SR.dcm", "SR2.dcm"]  # no temp left


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbage it reads
def test_hostile_files_give_one_line_errors(rg1_export, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    for fn in (read_boxes, read_segmentation):
        with pytest.raises(DicomObjectError) as err:
            fn(bad)
        assert "\n" not in str(err.value)
    ds = pydicom.dcmread(rg1_export["files"]["gsps"])
    ds.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicData = [1.0, 2.0, 3.0]
    ds.GraphicAnnotationSequence[1].GraphicObjectSequence[0].GraphicData = [float("nan")] * 10
    ds.save_as(tmp_path / "odd.dcm")
    got = read_boxes(tmp_path / "odd.dcm")
    assert got.skipped == 2 and len(got.boxes) == 1


def test_seg_of_the_bundled_segmentation_on_rg1(rg1_export):
    """The issue's case: the shipped lung/heart U-Net run on RG1 through the app's pipeline, its mask
    stack written as a binary SEG beside the project's SR, read back equal to the masks."""
    from cxrviewer.core.bundle import default_models_dir, load_bundle
    from cxrviewer.core.dicom_objects import binary_segmentation, segments_from_stack, study_source, write_dataset
    from cxrviewer.core.pipeline import Pipeline

    seg_bundle = default_models_dir() / "segmentation.cxrbundle"
    if not seg_bundle.is_dir():
        pytest.skip("the bundled segmentation model is not in resources/models")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    study = load_study(_rg1())
    res = Pipeline({"segmentation": load_bundle(seg_bundle)}, device="cpu").run(study)
    assert any("no classifier" in n for n in res.notices)  # (the anatomy localiser has no class to place)
    stack, names = res.get("segmentation", "masks"), res.attrs["segmentation"]["classes"]
    shape = tuple(int(v) for v in study.stored.shape[:2])
    masks = segments_from_stack(np.asarray(stack), names, shape)
    assert all(m.any() for m in masks.values()), "the U-Net found no lung/heart on RG1"
    path = rg1_export["files"]["seg"].parent / "unet_seg.dcm"
    write_dataset(binary_segmentation(study_source(rg1_export["store"], rg1_export["sid"]), masks,
                                      algorithm="segmentation.cxrbundle"), path)
    back = read_segmentation(path)
    assert list(back) == list(names) and all(np.array_equal(back[k], masks[k]) for k in masks)
    ds = pydicom.dcmread(path)
    kinds = [seg.SegmentedPropertyTypeCodeSequence[0].CodeValue for seg in ds.SegmentSequence]
    assert kinds == ["39607008", "39607008", "80891009"]  # SNOMED CT lung, lung, heart (from left_lung, ...)
    assert ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        pydicom.dcmread(_rg1(), stop_before_pixels=True).SOPInstanceUID
