"""``cxrviewer annotations export --format dicom`` / ``import --format dicom-sr|gsps``: a project
with boxes on the real RG1 radiograph and on a PNG, out as SR/PR(/SC) and back into a new project."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
pydicom_data = pytest.importorskip("pydicom.data")

from PIL import Image  # noqa: E402

from cxrviewer.cli import annotations as cli  # noqa: E402
from cxrviewer.core.annotations import AnnotationStore  # noqa: E402
from cxrviewer.core.dicom_objects import exchange  # noqa: E402
from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.io import load_study  # noqa: E402

SR, PR, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", \
    "1.2.840.10008.5.1.4.1.1.7"


def _rg1() -> str:
    try:
        return pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # noqa: BLE001 - pydicom-data not installed or file missing
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args([str(a) for a in argv]))


def _png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def project(tmp_path):
    """RG1 (3 boxes: 2 manual, 1 accepted model proposal) and a PNG (1 box), one study without
    boxes; returns (project path, {image name: boxes})."""
    png = _png(tmp_path / "chest one.png")
    with AnnotationStore(tmp_path / "p.cxrann", annotator="alice") as store:
        sid = store.register_study(load_study(_rg1())).id
        store.add_box(sid, "Nodule", 100.5, 200.25, 50.0, 60.75)
        store.add_box(sid, "Effusion", 900.0, 1200.0, 400.125, 300.0)
        store.add_proposals(sid, [Box("Atelectasis", 300.0, 400.0, 222.5, 111.25, 0.8713)],
                            "densenet121-res224-all")
        store.accept_proposal(store.proposals(sid)[0].id)
        pid = store.register_study(load_study(png)).id
        store.add_box(pid, "Mass", 10.25, 5.5, 20.0, 30.125)
        other = _png(tmp_path / "empty.png", seed=1)
        store.register_study(load_study(other))
        want = {"RG1_UNCR.dcm": store.boxes(sid), "chest one.png": store.boxes(pid)}
    return tmp_path / "p.cxrann", want


def _key(b):
    return (b.label, b.source, b.model_name, None if b.score is None else round(b.score, 6))


def _same(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(sorted(got, key=lambda b: b.x), sorted(want, key=lambda b: b.x)):
        assert _key(g) == _key(w)
        assert np.allclose([g.x, g.y, g.w, g.h], [w.x, w.y, w.w, w.h], atol=1e-3)


def test_export_writes_sr_pr_and_sc_per_study(project, tmp_path, capsys):
    proj, want = project
    out = tmp_path / "dicom"
    assert _cli("export", proj, out, "--format", "dicom") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("exported dicom: 2 studies, 5 DICOM files (1 secondary capture)"), line
    folders = sorted(p.name for p in out.iterdir())
    assert folders[0] == "RG1_UNCR" and folders[1] == "chest one" and len(folders) == 2
    assert sorted(p.name for p in (out / "RG1_UNCR").iterdir()) == ["PR.dcm", "SR.dcm"]
    png_dir = out / folders[1]
    assert sorted(p.name for p in png_dir.iterdir()) == ["PR.dcm", "SC.dcm", "SR.dcm"]
    rg1 = pydicom.dcmread(_rg1(), stop_before_pixels=True)
    sr = pydicom.dcmread(out / "RG1_UNCR" / "SR.dcm")
    assert sr.SOPClassUID == SR and sr.StudyInstanceUID == rg1.StudyInstanceUID
    assert pydicom.dcmread(out / "RG1_UNCR" / "PR.dcm").SOPClassUID == PR
    sc = pydicom.dcmread(png_dir / "SC.dcm")
    assert sc.SOPClassUID == SC and "DERIVED" in list(sc.ImageType)
    ref = pydicom.dcmread(png_dir / "SR.dcm").CurrentRequestedProcedureEvidenceSequence[0]
    assert ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == sc.SOPInstanceUID


@pytest.mark.parametrize("fmt, names", [("dicom-sr", ["SR.dcm"]), ("gsps", ["PR.dcm"])])
def test_export_aliases_write_one_kind(project, tmp_path, fmt, names):
    proj, _ = project
    out = tmp_path / fmt
    assert _cli("export", proj, out, "--format", fmt) == 0
    assert sorted(p.name for p in (out / "RG1_UNCR").iterdir()) == names


def test_round_trip_into_a_new_project(project, tmp_path, capsys, monkeypatch):
    proj, want = project
    out = tmp_path / "dicom"
    assert _cli("export", proj, out, "--format", "dicom") == 0
    new = tmp_path / "fresh" / "new.cxrann"
    new.parent.mkdir()
    studies = Path(_rg1()).parent
    assert _cli("import", new, out / "RG1_UNCR" / "SR.dcm", "--format", "dicom-sr",
                "--studies", studies, "--label-set", "nih14") == 0
    assert "(created, label set" in capsys.readouterr().out
    png_dir = next(p for p in out.iterdir() if p.name.startswith("chest one"))
    assert _cli("import", new, png_dir / "SR.dcm", "--format", "dicom-sr",
                "--studies", png_dir) == 0
    # the GSPS holds the same boxes: importing it too adds nothing (duplicates skipped), and
    # the image being in the project now, no folder is searched
    def no_search(*_a, **_k):
        raise AssertionError("searched a folder for an image the project has")
    monkeypatch.setattr(exchange, "find_dicom_files", no_search)
    assert _cli("import", new, out / "RG1_UNCR" / "PR.dcm", "--format", "gsps",
                "--studies", tmp_path) == 0
    assert "imported 0 box(es)" in capsys.readouterr().out
    with AnnotationStore(new, read_only=True) as st:
        recs = {r.identity.file_name: r for r in st.studies()}
        assert set(recs) == {"RG1_UNCR.dcm", "SC.dcm"}
        rg1 = recs["RG1_UNCR.dcm"]
        assert rg1.identity.sop_uid == str(pydicom.dcmread(_rg1(), stop_before_pixels=True)
                                           .SOPInstanceUID)
        _same(st.boxes(rg1.id), want["RG1_UNCR.dcm"])
        _same(st.boxes(recs["SC.dcm"].id), want["chest one.png"])
        assert (recs["SC.dcm"].width, recs["SC.dcm"].height) == (64, 48)


def test_gsps_round_trip_keeps_provenance(project, tmp_path):
    proj, want = project
    out = tmp_path / "pr"
    assert _cli("export", proj, out, "--format", "gsps") == 0
    new = tmp_path / "g.cxrann"
    assert _cli("import", new, out / "RG1_UNCR" / "PR.dcm", "--format", "gsps", "--studies",
                Path(_rg1()).parent) == 0
    with AnnotationStore(new, read_only=True) as st:
        (rec,) = st.studies()
        _same(st.boxes(rec.id), want["RG1_UNCR.dcm"])


def test_missing_source_is_skipped_and_listed(project, tmp_path, capsys):
    proj, _ = project
    (tmp_path / "chest one.png").unlink()
    out = tmp_path / "dicom"
    assert _cli("export", proj, out, "--format", "dicom", "--status", "unseen") == 0
    cap = capsys.readouterr()
    assert "skipped chest one.png:" in cap.err and cap.err.count("\n") == 1
    assert "1 study, 2 DICOM files" in cap.out and "skipped 1" in cap.out
    assert [p.name for p in out.iterdir()] == ["RG1_UNCR"]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(project, tmp_path, capsys):
    proj, _ = project
    (tmp_path / "chest one.png").unlink()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a dicom file")
    out = tmp_path / "d2"
    assert _cli("export", proj, out, "--format", "dicom") == 0
    sr = out / "RG1_UNCR" / "SR.dcm"
    new = tmp_path / "n.cxrann"
    bad = [
        # only the PNG study is done: its file is gone, so nothing can be written
        ("export", proj, tmp_path / "none", "--format", "dicom", "--status", "done"),
        ("export", proj, occupied, "--format", "dicom"),
        ("export", proj, tmp_path / "none", "--format", "dicom", "--status", "verified"),
        ("import", new, not_dicom, "--format", "dicom-sr"),
        ("import", new, sr, "--format", "dicom-sr"),  # RG1 is not in the new project
        ("import", new, sr, "--format", "dicom-sr", "--studies", tmp_path / "nowhere"),
        ("import", new, sr, "--format", "dicom-sr", "--studies", out, "--label-set", "nih14"),
        ("import", new, sr, "--format", "dicom-sr", "--studies", Path(_rg1()).parent,
         "--label-set", "lung-heart"),  # classes not in that label set
    ]
    with AnnotationStore(proj) as st:
        st.set_status(next(r.id for r in st.studies() if r.identity.file_name == "chest one.png"),
                      "done")
    errs: list[str] = []
    for argv in bad:
        capsys.readouterr()
        assert _cli(*argv) == 2, argv
        errs.append(capsys.readouterr().err)
        assert errs[-1].count("\n") == 1 and errs[-1].startswith("cxrviewer annotations: "), errs
    assert "no study could be written" in errs[0] and "chest one.png" in errs[0]
    assert "holds files this export does not write" in errs[1]
    assert "no study has accepted boxes with that review status" in errs[2]
    assert "cannot read the DICOM file" in errs[3]
    assert "is not in the project" in errs[4] and "--studies" in errs[4]
    assert "not a folder" in errs[5] and "no DICOM file under" in errs[6]
    assert "3 classes not in the project's label set" in errs[7]
    assert not (tmp_path / "none").exists() and [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert not new.exists() and not list(tmp_path.glob("n.cxrann*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".none", ".occupied"))]


def test_a_study_whose_write_fails_half_way_leaves_no_files(project, tmp_path, monkeypatch):
    """SC.dcm written, then SR.dcm fails: the study is skipped whole, the others are written."""
    from cxrviewer.core.dicom_objects import project as dicom_project
    from cxrviewer.core.dicom_objects._common import DicomObjectError

    proj, _ = project
    real = dicom_project.write_dataset

    def failing(ds, target):
        if Path(target).name == "SR.dcm" and Path(target).parent.name == "chest one":
            raise DicomObjectError("disk full", path=str(target))
        return real(ds, target)

    monkeypatch.setattr(dicom_project, "write_dataset", failing)
    out = tmp_path / "dicom"
    assert _cli("export", proj, out, "--format", "dicom") == 0
    assert [p.name for p in out.iterdir()] == ["RG1_UNCR"]
