"""Synthetic chest phantoms: determinism, NIH folder format, box/mask/affine ground truth."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES, NO_FINDING, canonical
from training.phantoms import (
    BBOX_HEADER,
    DATA_ENTRY_HEADER,
    Affine,
    Anatomy,
    PhantomConfig,
    contact_sheet,
    generate_phantom,
    write_phantom_dataset,
)

NIH_BOX_LABELS = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule",
                  "Pneumonia", "Pneumothorax"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "ds"
    return write_phantom_dataset(out, 14, 128, seed=3, config=PhantomConfig(normal_fraction=0.25),
                                 masks=True)


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_same_seed_gives_identical_bytes(tmp_path: Path, dataset: Path) -> None:
    again = write_phantom_dataset(tmp_path / "again", 14, 128, seed=3,
                                  config=PhantomConfig(normal_fraction=0.25), masks=True)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = write_phantom_dataset(tmp_path / "other", 2, 128, seed=4)
    first = sorted((other / "images").iterdir())[0].name
    assert (other / "images" / first).read_bytes() != (dataset / "images" / first).read_bytes()


def test_nih_csvs_parse_and_match_images(dataset: Path) -> None:
    entries = _rows(dataset / "Data_Entry_2017.csv")
    assert tuple(entries[0]) == DATA_ENTRY_HEADER
    assert len(entries) - 1 == 14
    ids = set()
    patients: dict[str, int] = {}
    for r in entries[1:]:
        assert len(r) == len(DATA_ENTRY_HEADER)
        ids.add(r[0])
        im = Image.open(dataset / "images" / r[0])
        assert im.mode == "L" and im.size == (128, 128)
        assert (int(r[7]), int(r[8])) == (128, 128)
        labels = r[1].split("|")
        assert labels == [NO_FINDING] or all(lab in CLASSES for lab in labels)
        assert r[6] == "PA" and r[5] in ("M", "F")
        patients[r[3]] = patients.get(r[3], 0) + 1
    assert max(patients.values()) > 1, "some patients should have several images"
    assert any(r[1] == NO_FINDING for r in entries[1:])
    boxes = _rows(dataset / "BBox_List_2017.csv")
    assert tuple(boxes[0]) == BBOX_HEADER
    assert len(boxes) > 1
    for r in boxes[1:]:
        assert r[0] in ids and r[1] in NIH_BOX_LABELS
        x, y, w, h = map(float, r[2:6])
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        row = next(e for e in entries if e[0] == r[0])
        assert canonical(r[1]) in row[1].split("|")


def test_headers_match_real_nih_files(nih_dir: Path) -> None:
    with gzip.open(nih_dir / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == DATA_ENTRY_HEADER
    with gzip.open(nih_dir / "BBox_List_2017.csv.gz", "rt", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == BBOX_HEADER


def test_core_nih_reader_reads_phantoms(dataset: Path) -> None:
    nih = pytest.importorskip("cxrviewer.core.io.nih")
    if not hasattr(nih, "read_nih_folder"):
        pytest.skip("cxrviewer.core.io.nih.read_nih_folder is not there yet")
    wl = nih.read_nih_folder(dataset)
    assert len(wl) == 14
    truth = json.loads((dataset / "phantom_truth.json").read_text())["images"]
    n_boxes = 0
    for ref in wl:
        t = truth[ref.key + ".png"]
        assert {c for c, v in ref.labels.items() if v} == set(t["labels"])
        want = sorted((f["label"], *f["box"]) for f in t["findings"] if f["in_bbox_csv"])
        got = sorted((b.label, b.x, b.y, b.w, b.h) for b in ref.gt_boxes)
        assert got == want
        n_boxes += len(got)
    assert n_boxes > 0
    # loading a study keeps the boxes in written-image pixels (box_frame.txt says 128, not 1024)
    ref = next(r for r in wl if r.gt_boxes)
    study = ref.load()
    assert study.shape == (128, 128)
    assert [b.as_xyxy() for b in study.gt_boxes] == [b.as_xyxy() for b in ref.gt_boxes]


def test_truth_json_and_masks(dataset: Path) -> None:
    meta = json.loads((dataset / "phantom_truth.json").read_text())
    assert meta["size"] == 128 and len(meta["images"]) == 14
    csv_boxes = sorted((r[0], canonical(r[1]), *map(float, r[2:6]))
                       for r in _rows(dataset / "BBox_List_2017.csv")[1:])
    truth_boxes = []
    for iid, t in meta["images"].items():
        a = t["affine"]
        assert set(a) >= {"rotation_deg", "scale", "shift_x", "shift_y", "matrix"}
        assert np.allclose(np.array(a["matrix"]), Affine(a["rotation_deg"], a["scale"], a["shift_x"],
                                                         a["shift_y"]).matrix(128), atol=1e-4)
        for part in ("heart", "left_lung", "right_lung"):
            x, y, w, h = t["anatomy"][part]
            m = np.asarray(Image.open(dataset / "masks" / part / iid)) > 0
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        for f in t["findings"]:
            if f["in_bbox_csv"]:
                truth_boxes.append((iid, f["label"], *f["box"]))
            if f["mask"] and f["box"]:
                m = np.asarray(Image.open(dataset / f["mask"])) > 0
                ys, xs = np.nonzero(m)
                x, y, w, h = f["box"]
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    assert sorted(truth_boxes) == csv_boxes


@pytest.mark.parametrize("label", CLASSES)
def test_every_class_can_be_drawn(label: str) -> None:
    ph = generate_phantom(np.random.default_rng(11), 96, labels=[label])
    assert ph.labels == (label,)
    assert ph.image.dtype == np.uint8 and ph.image.shape == (96, 96)
    f = ph.findings[0]
    assert f.label == label and f.mask is not None and f.mask.any()
    assert (label in BOXED_CLASSES) == (len(ph.boxes) == 1)
    b = f.box
    assert b is not None and 0 <= b.x and 0 <= b.y and b.x2 <= 96 and b.y2 <= 96


def _contrast(ph, f) -> float:
    """Mean intensity inside the lesion mask minus mean over a ring just outside its box."""
    img = ph.image.astype(float)
    b = f.box
    pad = int(max(3, 0.6 * max(b.w, b.h)))
    y0, y1 = int(max(0, b.y - pad)), int(min(img.shape[0], b.y2 + pad))
    x0, x1 = int(max(0, b.x - pad)), int(min(img.shape[1], b.x2 + pad))
    ring = np.zeros_like(f.mask)
    ring[y0:y1, x0:x1] = True
    ring[int(b.y):int(b.y2), int(b.x):int(b.x2)] = False
    return float(img[f.mask].mean() - img[ring].mean())


def test_nodule_boxes_contain_brighter_lesion_and_contrast_knob_works() -> None:
    diffs, faint = [], []
    for seed in range(8):
        an = Anatomy.sample(np.random.default_rng([seed, 0]))
        ph = generate_phantom(np.random.default_rng(seed), 256, anatomy=an, labels=["Nodule"])
        f = ph.findings[0]
        assert ph.boxes[0] == f.box
        assert f.mask[int(f.box.y):int(f.box.y2), int(f.box.x):int(f.box.x2)].sum() == f.mask.sum()
        diffs.append(_contrast(ph, f))
        ph3 = generate_phantom(np.random.default_rng(seed), 256, PhantomConfig(contrast=0.3),
                               anatomy=an, labels=["Nodule"])
        assert ph3.findings[0].box == f.box
        faint.append(_contrast(ph3, ph3.findings[0]))
    assert min(diffs) > 0
    assert np.mean(diffs) > np.mean(faint) + 5


def test_lesion_scale_knob_grows_masses() -> None:
    areas = {}
    for scale in (0.6, 1.5):
        areas[scale] = np.mean([generate_phantom(np.random.default_rng(s), 128,
                                                 PhantomConfig(lesion_scale=scale),
                                                 labels=["Mass"]).findings[0].mask.sum()
                                for s in range(4)])
    assert areas[1.5] > 3 * areas[0.6]


def test_cardiomegaly_has_wider_heart_and_ctr_above_half() -> None:
    for seed in range(5):
        an = Anatomy.sample(np.random.default_rng(seed))
        kw = dict(anatomy=an, affine=Affine())
        normal = generate_phantom(np.random.default_rng(seed), 128, labels=[], **kw)
        big = generate_phantom(np.random.default_rng(seed), 128, labels=["Cardiomegaly"], **kw)
        assert normal.anatomy["ctr"] < 0.5 < big.anatomy["ctr"]
        ratio = lambda ph: ph.anatomy["heart"].w / (ph.anatomy["left_lung"].x2 - ph.anatomy["right_lung"].x)
        assert ratio(big) > ratio(normal) + 0.05
        assert big.boxes[0].as_xyxy() == big.anatomy["heart"].as_xyxy()


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_recorded_affine_moves_the_anatomy() -> None:
    an = Anatomy.sample(np.random.default_rng(5))
    size = 160
    base = generate_phantom(np.random.default_rng(0), size, anatomy=an, labels=[], affine=Affine())
    shifted = Affine(shift_x=0.06, shift_y=-0.04)
    moved = generate_phantom(np.random.default_rng(0), size, anatomy=an, labels=[], affine=shifted)
    for part in ("right_lung", "left_lung", "heart"):
        d = _centroid(moved.masks[part]) - _centroid(base.masks[part])
        assert np.allclose(d, [0.06 * size, -0.04 * size], atol=0.6), (part, d)
        bb, mb = base.anatomy[part], moved.anatomy[part]
        assert abs((mb.x + mb.w / 2) - (bb.x + bb.w / 2) - 0.06 * size) <= 1.0
    rot = Affine(rotation_deg=7.0, scale=1.05, shift_x=-0.02, shift_y=0.03)
    turned = generate_phantom(np.random.default_rng(0), size, anatomy=an, labels=[], affine=rot)
    mat = rot.matrix(size)
    for part in ("right_lung", "left_lung", "heart"):
        want = mat[:, :2] @ _centroid(base.masks[part]) + mat[:, 2]
        assert np.allclose(_centroid(turned.masks[part]), want, atol=1.0), part
    # patient's right lung on the image's left, heart bulging to the image's right
    assert _centroid(base.masks["right_lung"])[0] < size / 2 < _centroid(base.masks["left_lung"])[0]
    assert _centroid(base.masks["heart"])[0] > size / 2


def test_cli_writes_folder_and_contact_sheet(tmp_path: Path) -> None:
    from training.cli import main

    png = tmp_path / "sheet.png"
    rc = main(["phantoms", "--out", str(tmp_path / "ds"), "--n", "3", "--size", "64", "--seed", "2",
               "--contrast", "0.5", "--affine-rotation", "3", "--contact-sheet", str(png)])
    assert rc == 0
    assert len(list((tmp_path / "ds" / "images").glob("*.png"))) == 3
    assert Image.open(png).size == (512, 512)  # 2 x 2 tiles of 256 px
    assert main(["phantoms", "--out", str(tmp_path / "ds"), "--n", "3"]) == 2  # already there
    assert main(["phantoms", "--out", str(tmp_path / "bad"), "--n", "2", "--contrast", "-1"]) == 2


def test_contact_sheet_tiles(dataset: Path, tmp_path: Path) -> None:
    out = contact_sheet(dataset, tmp_path / "cs.png", n=4, tile=64)
    im = np.asarray(Image.open(out).convert("L"), dtype=float)
    assert im.shape == (128, 128)
    tiles = [im[r:r + 50, c:c + 64] for r in (0, 64) for c in (0, 64)]
    assert all(t.std() > 10 for t in tiles)
    assert not np.allclose(tiles[0], tiles[1])
