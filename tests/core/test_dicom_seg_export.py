"""``cxrviewer export --format dicom-seg`` (masks and finding maps of a project's studies as DICOM
SEG, from stored results or the segmentation model) and SEG import (segment bounding boxes)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from PIL import Image  # noqa: E402

from _tiny_bundles import make_tiny_bundles, synthetic_study  # noqa: E402
from cxrviewer.__main__ import main  # noqa: E402
from cxrviewer.core.annotations import AnnotationStore  # noqa: E402
from cxrviewer.core.bundle import load_bundle  # noqa: E402
from cxrviewer.core.dicom_objects import (  # noqa: E402
    DicomObjectError, export_study, finding_code, read_boxes, read_segmentation, segments_from_stack,
)
from cxrviewer.core.io import load_study  # noqa: E402
from cxrviewer.core.io.results import read_results, write_results  # noqa: E402
from cxrviewer.core.pipeline import Pipeline  # noqa: E402
from cxrviewer.core.seg_export import export_dicom_seg, finding_maps  # noqa: E402


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel-edge bounding box (x, y, w, h) of a non-empty mask."""
    r, c = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float(c[0]), float(r[0]), float(c[-1] - c[0] + 1), float(r[-1] - r[0] + 1)


def _boxes(path) -> list[tuple]:
    with AnnotationStore(path, read_only=True) as store:
        return sorted((b.label, b.x, b.y, b.w, b.h, b.source, b.model_name)
                      for r in store.studies() for b in store.boxes(r.id))


def _dciodvfy_errors(path) -> list[str]:
    res = subprocess.run([shutil.which("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _assert_valid(paths) -> None:
    """dciodvfy (dicom3tools) reports no error in any of ``paths`` (checked where installed)."""
    if shutil.which("dciodvfy") is None:
        return
    for path in paths:
        assert _dciodvfy_errors(path) == [], Path(path).name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A PNG study with a stored analysis beside it (tiny random segmentation + classifier)."""
    tmp = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    bundles = make_tiny_bundles(tmp / "b", ("segmentation", "classifier"), input_size=64)
    png = tmp / "images" / "chest.png"
    png.parent.mkdir()
    Image.fromarray(synthetic_study(96, 80).stored).save(png)
    study = load_study(png)
    res = Pipeline({r: load_bundle(p) for r, p in bundles.items()}, "cpu", map_max_side=64).run(study)
    h5 = write_results(res, png.with_name(png.name + ".results.h5"))  # where the app looks
    psi = np.asarray(res.get("disease_mask", "psi")).reshape(len(res.classes), -1)
    spread = psi.max(axis=1) - psi.min(axis=1)
    finding = res.classes[int(np.argmax(spread))]
    assert spread.max() > 0  # (random weights: a class whose disease mask is not constant)
    project = tmp / "p.cxrann"
    with AnnotationStore(project, annotator="alice") as store:
        sid = store.register_study(study).id
        store.add_box(sid, finding, 10.0, 12.0, 20.0, 30.0)
    return dict(tmp=tmp, png=png, study=study, h5=h5, project=project, bundles=bundles,
                finding=finding)


def test_export_from_stored_results(tiny, tmp_path, capsys):
    res = read_results(tiny["h5"])
    shape = tiny["study"].shape
    finding = tiny["finding"]  # the class of the project's box
    ((name, cmap),) = finding_maps(res, [finding], shape).values()
    assert name == "psi"  # the disease mask (a probability map) comes first
    thr = float(cmap.min() + cmap.max()) / 2  # (some pixels in, some out)
    out = tmp_path / "out"
    assert main(["export", str(tiny["project"]), "--format", "dicom-seg", "--out", str(out),
                 "--threshold", str(thr), "--no-model"]) == 0
    said = capsys.readouterr().out
    assert "1 study, 4 DICOM files (1 secondary capture)" in said and "1 from stored analyses" in said
    folder = out / "chest"
    assert sorted(p.name for p in folder.iterdir()) == ["SC.dcm", "SEG.dcm", "SEG_fractional.dcm",
                                                         "SEG_threshold.dcm"]
    sc = pydicom.dcmread(folder / "SC.dcm")
    assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    for f in ("SEG.dcm", "SEG_threshold.dcm", "SEG_fractional.dcm"):  # all reference the capture
        ds = pydicom.dcmread(folder / f, stop_before_pixels=True)
        ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert ref.ReferencedSOPInstanceUID == sc.SOPInstanceUID
        assert ds.StudyInstanceUID == sc.StudyInstanceUID
    names = list(res.attr("segmentation", "classes"))
    masks = segments_from_stack(np.asarray(res.get("segmentation", "masks")), names, shape)
    back = read_segmentation(folder / "SEG.dcm")
    assert list(back) == names and all(np.array_equal(back[k], masks[k]) for k in names)
    label = f"{finding} >= {thr:g}"
    thr_back = read_segmentation(folder / "SEG_threshold.dcm")
    assert list(thr_back) == [label]
    assert np.array_equal(thr_back[label], cmap >= thr) and 0 < thr_back[label].mean() < 1
    item = pydicom.dcmread(folder / "SEG_threshold.dcm").SegmentSequence[0]
    assert item.SegmentDescription == f"{finding} map thresholded: pixels with value >= {thr!r}"[:64]
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == finding_code(finding).meaning
    frac = read_segmentation(folder / "SEG_fractional.dcm")[finding]
    assert np.abs(frac - cmap).max() <= 0.5 / 255 + 1e-6
    series = [pydicom.dcmread(f, stop_before_pixels=True).SeriesNumber for f in sorted(folder.iterdir())]
    assert len(set(series)) == 4  # each object its own series (a viewer lists them apart)
    _assert_valid(folder.iterdir())
    # round trip: the thresholded map's segment comes back as its bounding box, a model box
    new = tmp_path / "new.cxrann"
    assert main(["import", str(new), str(folder / "SEG_threshold.dcm"), "--format", "dicom-seg",
                 "--studies", str(out)]) == 0
    algo = res.models["classifier"]["name"]
    assert _boxes(new) == [(finding, *_bbox(cmap >= thr), "model", algo)]
    # ... and into the project it came from: onto the PNG study the capture was made of
    again = tmp_path / "again.cxrann"
    shutil.copy(tiny["project"], again)
    assert main(["import", str(again), str(folder / "SEG_threshold.dcm"), "--format", "dicom-seg",
                 "--studies", str(out)]) == 0
    with AnnotationStore(again, read_only=True) as store:
        (rec,) = store.studies()
        assert rec.identity.sha256 == tiny["study"].pixel_sha256() and len(store.boxes(rec.id)) == 2


def _hand_masks(shape):
    h, w = shape
    heart = np.zeros(shape, bool)
    heart[h // 2: h // 2 + 20, w // 3: w // 3 + 25] = True
    nodule = np.zeros(shape, bool)
    nodule[7:11, 50:59] = True
    nodule[30:33, 61:63] = True  # two blobs: one segment, one box around both
    lung = np.zeros(shape, bool)
    lung[5:70, 3:30] = True
    return heart, nodule, lung


def test_round_trip_gives_the_masks_bounding_boxes(tiny, tmp_path, capsys):
    """A thresholded finding map and anatomy: boxes equal the masks' bounding boxes; lung/heart
    segments are skipped (and counted) unless the project's label set has them."""
    heart, nodule, lung = _hand_masks(tiny["study"].shape)
    yy, xx = np.mgrid[0:96, 0:80]
    mass_map = np.exp(-((xx - 40) ** 2 + (yy - 60) ** 2) / 50.0).astype(np.float32)
    with AnnotationStore(tiny["project"], read_only=True) as store:
        files = export_study(store, store.studies()[0].id, tmp_path / "out",
                             masks={"heart": heart, "Nodule": nodule, "left lung": lung},
                             thresholded=[("Mass", mass_map, 0.3), ("Pneumothorax", nodule * 1.0, 0.5)],
                             algorithm="seg-model", map_algorithm="cam-model", boxes=False)
    _assert_valid(files.values())
    studies = ["--studies", str(tmp_path / "out")]
    nih = tmp_path / "nih.cxrann"
    assert main(["import", str(nih), str(files["threshold"]), "--format", "dicom-seg", *studies]) == 0
    assert _boxes(nih) == sorted([("Mass", *_bbox(mass_map >= 0.3), "model", "cam-model"),
                                  ("Pneumothorax", *_bbox(nodule), "model", "cam-model")])
    assert _bbox(mass_map >= 0.3) == (33.0, 53.0, 15.0, 15.0)  # r² <= 50 ln(1/0.3): |dx| <= 7
    capsys.readouterr()
    assert main(["import", str(nih), str(files["seg"]), "--format", "dicom-seg", *studies]) == 0
    said = capsys.readouterr().out
    assert "imported 1 box(es)" in said
    assert "skipped 2 anatomy segments (heart, left lung)" in said
    assert ("Nodule", 50.0, 7.0, 13.0, 26.0, "model", "seg-model") in _boxes(nih)
    lh = tmp_path / "lh.cxrann"
    assert main(["annotations", "import", str(lh), str(files["seg"]), "--format", "dicom-seg",
                 *studies, "--label-set", "lung-heart", "--skip", "Nodule"]) == 0  # (the long form)
    assert _boxes(lh) == sorted([("heart", *_bbox(heart), "model", "seg-model"),
                                 ("left lung", *_bbox(lung), "model", "seg-model")])
    only_anatomy = tmp_path / "a"
    with AnnotationStore(tiny["project"], read_only=True) as store:
        files = export_study(store, store.studies()[0].id, only_anatomy, masks={"heart": heart},
                             boxes=False)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "x.cxrann"), str(files["seg"]), "--format", "dicom-seg",
                 "--studies", str(only_anatomy)]) == 2
    err = capsys.readouterr().err
    assert "no boxes in this SEG" in err and "1 anatomy segment (heart)" in err
    assert not (tmp_path / "x.cxrann").exists()


def test_unmapped_classes_are_refused_as_by_the_other_importers(tiny, tmp_path, capsys):
    shape = tiny["study"].shape
    heart, nodule, _lung = _hand_masks(shape)
    with AnnotationStore(tiny["project"], read_only=True) as store:
        files = export_study(store, store.studies()[0].id, tmp_path / "out",
                             thresholded=("Cardiomegaly", heart * 1.0, 0.5), boxes=False)
    base = [str(files["threshold"]), "--format", "dicom-seg", "--studies", str(tmp_path / "out"),
            "--label-set", "rsna-pneumonia"]
    target = tmp_path / "r.cxrann"
    assert main(["import", str(target), *base]) == 2
    err = capsys.readouterr().err
    assert "Cardiomegaly" in err and "--map" in err and err.count("\n") == 1
    assert not target.exists()
    assert main(["import", str(target), *base, "--map", "Cardiomegaly=Lung Opacity"]) == 0
    assert _boxes(target) == [("Lung Opacity", *_bbox(heart), "manual", None)]
    added = tmp_path / "added.cxrann"
    assert main(["import", str(added), *base, "--add-unknown"]) == 0
    with AnnotationStore(added, read_only=True) as store:
        assert "Cardiomegaly" in store.label_set
    assert [b[0] for b in _boxes(added)] == ["Cardiomegaly"]


def test_masks_from_the_segmentation_model_when_nothing_is_stored(tiny, tmp_path, capsys):
    png = tmp_path / "fresh.png"  # same pixels, no results file beside it
    shutil.copy(tiny["png"], png)
    project = tmp_path / "f.cxrann"
    with AnnotationStore(project, annotator="bob") as store:
        store.register_study(load_study(png))
        assert main(["export", str(project), "--format", "dicom-seg", "--out",
                     str(tmp_path / "none"), "--no-model"]) == 2
        assert "no stored analysis" in capsys.readouterr().err
        assert not (tmp_path / "none").exists()
        result = export_dicom_seg(store, tmp_path / "out", bundle=tiny["bundles"]["segmentation"])
    assert result.skipped == [] and "masks by segmentation" in next(iter(result.origins.values()))
    assert result.written == {"fresh": ["SC.dcm", "SEG.dcm"]}  # no maps: no classifier ran
    torch.manual_seed(0)
    res = Pipeline({"segmentation": load_bundle(tiny["bundles"]["segmentation"])}, "cpu").run(
        load_study(png))
    names = list(res.attr("segmentation", "classes"))
    want = segments_from_stack(np.asarray(res.get("segmentation", "masks")), names,
                               tiny["study"].shape)
    back = read_segmentation(tmp_path / "out" / "fresh" / "SEG.dcm")
    assert list(back) == names and all(np.array_equal(back[k], want[k]) for k in names)
    with AnnotationStore(project, read_only=True) as store, pytest.raises(DicomObjectError,
                                                                          match="threshold"):
        export_dicom_seg(store, tmp_path / "t", threshold=2.0)


def _rg1() -> str:
    try:
        return pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # noqa: BLE001 - pydicom-data not installed or file missing
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")




def test_rg1_acceptance_sr_seg_gsps_from_a_project(tmp_path, capsys):
    """The issue's acceptance: RG1 with 3 boxes and the bundled segmentation model; SR/GSPS and
    SEG written by the export command, read back with highdicom and pydicom, imported back."""
    from cxrviewer.core.bundle import default_models_dir
    from cxrviewer.core.geometry import Box

    seg_bundle = default_models_dir() / "segmentation.cxrbundle"
    if not seg_bundle.is_dir():
        pytest.skip("the bundled segmentation model is not in resources/models")
    path = tmp_path / "images" / "RG1_UNCR.dcm"
    path.parent.mkdir()
    shutil.copy(_rg1(), path)
    project = tmp_path / "rg1.cxrann"
    with AnnotationStore(project, annotator="alice") as store:
        sid = store.register_study(load_study(path)).id
        store.add_box(sid, "Nodule", 100.5, 200.25, 50.0, 60.75)
        store.add_box(sid, "Effusion", 900.0, 1200.0, 400.125, 300.0)
        store.add_proposals(sid, [Box("Atelectasis", 300.0, 400.0, 222.5, 111.25, 0.8713)], "dn121")
        store.accept_proposal(store.proposals(sid)[0].id)
        want = sorted((b.label, b.x, b.y, b.w, b.h, b.source, b.model_name, b.score)
                      for b in store.boxes(sid))
    assert [w[-3:] for w in want].count(("model", "dn121", 0.8713)) == 1 and len(want) == 3
    assert main(["export", str(project), "--format", "dicom", "--out", str(tmp_path / "sr")]) == 0
    assert main(["export", str(project), "--format", "dicom-seg", "--out", str(tmp_path / "seg")]) == 0
    assert "with masks by the segmentation model" in capsys.readouterr().out
    src = pydicom.dcmread(path, stop_before_pixels=True)
    seg_file = tmp_path / "seg" / "RG1_UNCR" / "SEG.dcm"
    assert sorted(p.name for p in seg_file.parent.iterdir()) == ["SEG.dcm"]  # DICOM: no capture
    study = load_study(path)
    res = Pipeline({"segmentation": load_bundle(seg_bundle)}, "cpu").run(study)
    names = list(res.attr("segmentation", "classes"))
    masks = segments_from_stack(np.asarray(res.get("segmentation", "masks")), names, study.shape)
    hseg = hd.seg.segread(seg_file)  # highdicom
    got = hseg.get_pixels_by_source_instance([src.SOPInstanceUID], combine_segments=False)[0]
    assert got.shape == (*study.shape, 3)
    assert all(np.array_equal(got[..., i].astype(bool), masks[n]) for i, n in enumerate(names))
    raw = pydicom.dcmread(seg_file)  # pydicom
    assert np.array_equal(raw.pixel_array.astype(bool), np.stack([masks[n] for n in names]))
    assert raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID \
        == src.SOPInstanceUID
    assert [s.SegmentAlgorithmName for s in raw.SegmentSequence] == [res.models["segmentation"]["name"]] * 3
    sr_file = tmp_path / "sr" / "RG1_UNCR" / "SR.dcm"
    assert read_boxes(sr_file).referenced_sop_uids == [src.SOPInstanceUID]
    for kind in ("SR.dcm", "PR.dcm"):  # export -> import: the same boxes, classes, provenance
        fresh = tmp_path / f"{kind}.cxrann"
        assert main(["import", str(fresh), str(tmp_path / "sr" / "RG1_UNCR" / kind),
                     "--format", "dicom-sr", "--studies", str(path.parent)]) == 0
        with AnnotationStore(fresh, read_only=True) as store:
            got = sorted((b.label, b.x, b.y, b.w, b.h, b.source, b.model_name, b.score)
                         for r in store.studies() for b in store.boxes(r.id))
            assert [r.identity.sop_uid for r in store.studies()] == [src.SOPInstanceUID]
        assert got == want, kind
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: the objects were not validated")
    _assert_valid([*sorted((tmp_path / "sr").rglob("*.dcm")), seg_file])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage it reads
def test_seg_from_another_tool_and_damaged_segs(tiny, tmp_path):
    from pydicom.sr.codedict import codes

    from cxrviewer.core.dicom_objects import secondary_capture, write_dataset

    source = secondary_capture(tiny["study"])
    src_file = write_dataset(source.dataset, tmp_path / "sc.dcm")
    heart, nodule, _lung = _hand_masks(tiny["study"].shape)

    def segment(n, label, category, kind):
        return hd.seg.SegmentDescription(segment_number=n, segment_label=label,
                                         segmented_property_category=category,
                                         segmented_property_type=kind, algorithm_type="MANUAL")
    other = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(src_file)],
        pixel_array=np.stack([nodule, heart], axis=-1)[None].astype(np.uint8),
        segmentation_type="BINARY",
        segment_descriptions=[segment(1, "PTX", codes.SCT.MorphologicallyAbnormalStructure,
                                      codes.SCT.Pneumothorax),
                              segment(2, "Cor", codes.SCT.AnatomicalStructure, codes.SCT.Heart)],
        series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="other", manufacturer_model_name="m",
        software_versions="1", device_serial_number="1")
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    got = read_boxes(tmp_path / "other.dcm")
    assert got.kind == "seg" and got.skipped == 0
    assert [(b.label, b.x, b.y, b.w, b.h, b.source, b.anatomy) for b in got.boxes] == [
        ("Pneumothorax", *_bbox(nodule), "manual", False), ("Cor", *_bbox(heart), "manual", True)]
    assert {b.referenced_sop_uid for b in got.boxes} == {source.sop_uid}
    good = pydicom.dcmread(tmp_path / "other.dcm")
    damage = {
        "0 per-frame groups": lambda ds: delattr(ds, "PerFrameFunctionalGroupsSequence"),
        "names segment 9": lambda ds: setattr(
            ds.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0],
            "ReferencedSegmentNumber", 9),
        "too large": lambda ds: setattr(ds, "NumberOfFrames", 10 ** 6),
        "cannot decode": lambda ds: setattr(ds, "PixelData", ds.PixelData[:10]),
    }
    for what, harm in damage.items():  # what: the one-line error says it
        ds = pydicom.dcmread(tmp_path / "other.dcm")
        harm(ds)
        ds.save_as(tmp_path / "bad.dcm")
        with pytest.raises(DicomObjectError) as err:
            read_boxes(tmp_path / "bad.dcm")
        assert "\n" not in str(err.value) and what in str(err.value)
    assert good.SegmentSequence[0].SegmentLabel == "PTX"


def test_stored_results_are_found_by_pixel_hash_under_results_folders(tiny, tmp_path):
    """--results: an analyze output folder (<stem>/results.h5) or any folder of .h5 files; a
    results file of other pixels is never used (the model runs instead, or the study is skipped)."""
    png = tmp_path / "moved" / "chest.png"  # the same image elsewhere: nothing beside it
    png.parent.mkdir()
    shutil.copy(tiny["png"], png)
    project = tmp_path / "m.cxrann"
    with AnnotationStore(project, annotator="bob") as store:
        store.register_study(load_study(png))
    analysed = tmp_path / "analysed"
    (analysed / "chest").mkdir(parents=True)
    shutil.copy(tiny["h5"], analysed / "chest" / "results.h5")
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(tiny["h5"], loose / "whatever-name.h5")
    other = tmp_path / "other"
    other.mkdir()
    res = read_results(tiny["h5"])
    res.pixel_sha256 = "0" * 64  # another image's analysis
    write_results(res, other / "x.h5")
    with AnnotationStore(project, read_only=True) as store:
        for i, place in enumerate((analysed, loose, analysed / "chest" / "results.h5")):
            got = export_dicom_seg(store, tmp_path / f"o{i}", results=[other, place], run_model=False)
            (origin,) = got.origins.values()
            assert origin.startswith("results ") and "other" not in origin, origin
            assert got.written == {"chest": ["SC.dcm", "SEG.dcm", "SEG_fractional.dcm",
                                             "SEG_threshold.dcm"]}
        with pytest.raises(DicomObjectError, match="no stored analysis"):
            export_dicom_seg(store, tmp_path / "none", results=[other], run_model=False)
    assert not (tmp_path / "none").exists()


def test_a_results_cache_is_indexed_by_file_name_not_opened_whole(tiny, tmp_path, monkeypatch):
    """The app's cache names each file by its pixels' hash (result_cache.cache_path): a lookup
    opens the files whose name matches, not every cached analysis; a name that lies is checked."""
    from cxrviewer.core import seg_export
    from cxrviewer.core.result_cache import cache_path

    sha = read_results(tiny["h5"]).pixel_sha256
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(6):  # other studies' analyses (they are never opened)
        shutil.copy(tiny["h5"], cache_path(f"{i:064x}", "k", cache))
    shutil.copy(tiny["h5"], cache_path(sha, "k", cache))
    liar = cache_path("f" * 32 + sha[32:], "k", cache)  # another hash prefix
    opened: list[str] = []
    real = seg_export._summary_sha
    monkeypatch.setattr(seg_export, "_summary_sha", lambda p: opened.append(Path(p).name) or real(p))
    index = seg_export.ResultsIndex([cache])
    found = index.find(tmp_path / "elsewhere" / "chest.png", sha)
    assert found is not None and found[1] == cache_path(sha, "k", cache)
    assert opened == [cache_path(sha, "k", cache).name]
    assert index.find(tmp_path / "elsewhere" / "x.png", "e" * 64) is None and len(opened) == 1
    shutil.copy(tiny["h5"], liar)  # its name says "fff…", its summary says ``sha``
    assert seg_export.ResultsIndex([cache]).find(tmp_path / "x.png", "f" * 32 + sha[32:]) is None
