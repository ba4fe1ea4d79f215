"""NIH ChestX-ray14 folders and plain-folder worklists."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.io import is_nih_folder, open_worklist, read_nih_folder

ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def _fake_nih(root: Path, *, size: int = 64) -> Path:
    (root / "images").mkdir(parents=True)
    for stem in ("00000001_000", "00000002_000", "00000003_001"):
        Image.fromarray(np.full((size, size), 100, np.uint8)).save(root / "images" / f"{stem}.jpg")
    rows = [
        "00000001_000.png,Cardiomegaly|Infiltration,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.168,0.168",
        "00000003_001.png,Effusion|Pleural_Thickening,1,3,74,F,PA,2500,2048,0.168,0.168",
        "00000099_000.png,Mass,0,99,40,M,PA,2500,2048,0.168,0.168",  # image absent: skipped
    ]
    with gzip.open(root / "Data_Entry_2017_v2020.csv.gz", "wt", newline="") as f:
        f.write(ENTRY_HEADER + "\n".join(rows) + "\n")
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Infiltrate,100.5,200,300,400\n"
        "00000001_000.png,Cardiomegaly,400,500,200,150\n"
        "00000099_000.png,Mass,1,2,3,4\n")
    return root


def test_fake_nih_folder_labels_and_boxes(tmp_path: Path) -> None:
    root = _fake_nih(tmp_path / "nih")
    assert is_nih_folder(root) and not is_nih_folder(root / "images")
    wl = read_nih_folder(root)
    assert [r.key for r in wl] == ["00000001_000", "00000002_000", "00000003_001"]
    first, none, third = wl.refs
    assert first.path.suffix == ".jpg"  # matched by stem although the csv says .png
    assert set(first.labels) == set(CLASSES)
    assert {k for k, v in first.labels.items() if v} == {"Cardiomegaly", "Infiltration"}
    assert sum(none.labels.values()) == 0  # "No Finding" = all zero
    assert {k for k, v in third.labels.items() if v} == {"Effusion", "Pleural_Thickening"}
    assert [(b.label, b.x, b.y, b.w, b.h) for b in first.gt_boxes] == [
        ("Infiltration", 100.5, 200.0, 300.0, 400.0), ("Cardiomegaly", 400.0, 500.0, 200.0, 150.0)]
    assert first.patient_id == "1" and first.view_position == "PA"
    assert first.extra["age"] == "57" and first.extra["sex"] == "M"
    assert none.view_position == "AP" and not none.gt_boxes


def test_boxes_follow_a_resized_image(tmp_path: Path) -> None:
    root = _fake_nih(tmp_path / "nih", size=512)
    study = read_nih_folder(root)[0].load()
    assert study.labels["Cardiomegaly"] == 1
    assert study.gt_boxes[0].x == pytest.approx(50.25) and study.gt_boxes[0].w == pytest.approx(150.0)


def test_open_worklist_mixes_files_folders_and_nih(tmp_path: Path, rg1_uncr: Path) -> None:
    nih = _fake_nih(tmp_path / "nih")
    plain = tmp_path / "plain" / "sub"
    plain.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "a.png")
    (plain / "notes.txt").write_text("ignored")
    (plain / "NOEXT").write_bytes((rg1_uncr.read_bytes())[:2000])  # DICOM preamble, no extension
    wl = open_worklist([nih, tmp_path / "plain", rg1_uncr, tmp_path / "missing.dcm"])
    names = [r.display_name for r in wl]
    assert names[:3] == ["00000001_000", "00000002_000", "00000003_001"]
    assert str(Path("sub") / "NOEXT") in names and str(Path("sub") / "a.png") in names
    assert not any(n.endswith("notes.txt") for n in names)
    assert names[-1] == rg1_uncr.name
    assert len(wl.errors) == 1 and "missing.dcm" in wl.errors[0]
    assert open_worklist([rg1_uncr, rg1_uncr]).refs.__len__() == 1  # duplicates dropped


def test_shared_nih_folder(nih_dir: Path) -> None:
    """The full 112,120-row label file against the 1,222 shared images."""
    wl = read_nih_folder(nih_dir)
    n_images = sum(1 for p in (nih_dir / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert len(wl) == n_images == 1222
    assert all(r.labels is not None and len(r.labels) == 14 for r in wl)
    boxed = [r for r in wl if r.gt_boxes]
    assert len(boxed) > 100
    labels = {b.label for r in boxed for b in r.gt_boxes}
    assert "Infiltration" in labels and "Infiltrate" not in labels
    assert labels <= set(CLASSES)
    assert all(r.patient_id and r.view_position in ("PA", "AP") for r in wl)
    s = boxed[0].load()
    assert s.shape == (1024, 1024) and s.gt_boxes == boxed[0].gt_boxes
