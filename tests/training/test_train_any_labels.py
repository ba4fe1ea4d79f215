"""Training on any label set (issue 16): the annotate -> fine-tune loop for a project whose labels are
not the NIH 14.

- ``cxr-train cia --annotations`` on a VinDr-CXR project (phantom images, boxes and image labels of
  classes the NIH 14 lack: "Aortic enlargement", "Lung Opacity") trains the project's 14 classes in
  its order; the bundle records them and the set's name, loads in the app, and its provenance
  counts exactly the boxes and labels the project holds (none left out);
- ``cxr-train classify --annotations`` on a project whose set extends the NIH 14 ("nih14+custom")
  writes the set's JSON into the manifest; ``--init-weights`` from an NIH-14 bundle reuses its
  backbone and starts a new head (the classes differ);
- the folder's NIH labels and boxes are mapped onto the project's set by name and synonym, and the
  ones with no counterpart are reported in one warning line naming the classes (never dropped silently);
- an NIH folder alone still trains the NIH 14 (its manifest says ``nih14``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cxrviewer.core.bundle import load_bundle, read_manifest
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.labelsets import NIH14, VINDR_CXR, extended
from training.data import load_records
from training.phantoms import PhantomConfig, write_phantom_dataset

SIZE = 48
PHANTOMS = PhantomConfig(contrast=2.0, normal_fraction=0.4, max_findings=1, lesion_scale=1.5,
                         class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Nodule", 1.0)))
TINY = ["--size", str(SIZE), "--no-augment", "--device", "cpu", "--seed", "0", "--epochs", "1",
        "--batch-size", "8", "--no-resume"]
CIA = ["cia", "--backbone", "tiny", "--arch-kwargs", '{"head_channels": 8}', "--optimizer", "adam",
       "--box-fraction", "1.0", "--bank-size", "4"]
CLASSIFY = ["classify", "--arch-kwargs", '{"backbone": "tiny"}']


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("any_labels") / "set"
    write_phantom_dataset(root, n=24, size=SIZE, seed=7, config=PHANTOMS)
    return root


def _project(path: Path, data: Path, label_set, *, box_class: str, label_class: str) -> dict:
    """A project over every phantom: a ``box_class`` box (at the phantom's own box, else a fixed one)
    and ``label_class`` present on the abnormal images, ``label_class`` absent on the normal ones."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations.model import StudyIdentity

    n_boxes = n_labels = 0
    with AnnotationStore(path, annotator="test", label_set=label_set) as s:
        for i, r in enumerate(load_records(data)):
            st = s.ensure_study(StudyIdentity(file_name=r.path.name, sha256=f"{i:064x}"), width=SIZE, height=SIZE,
                                path=r.path)
            if r.is_normal:
                s.set_label(st.id, label_class, "absent")
                n_labels += 1
                continue
            b = r.boxes[0] if r.boxes else None
            s.add_box(st.id, box_class, *((b.x, b.y, b.w, b.h) if b else (8.0, 10.0, 16.0, 14.0)))
            s.set_label(st.id, label_class, "present")
            n_boxes += 1
            n_labels += 1
    return {"path": path, "boxes": n_boxes, "labels": n_labels}


def _train(args: list[str], out: Path) -> dict:
    from training.cli import main

    assert main([*args, *TINY, "--out", str(out)]) == 0
    return read_manifest(out).provenance


def test_cia_trains_a_vindr_project_with_its_classes(phantoms, tmp_path, caplog):
    proj = _project(tmp_path / "vindr.cxrann", phantoms, "vindr-cxr", box_class="Aortic enlargement",
                    label_class="Lung Opacity")
    out = tmp_path / "vindr_cia.cxrbundle"
    with caplog.at_level(logging.WARNING):
        prov = _train([*CIA, "--annotations", str(proj["path"])], out)
    b = load_bundle(out)  # what the app does
    assert b.manifest.classes == VINDR_CXR.labels and b.manifest.label_set == "vindr-cxr"
    assert b.manifest.labels == VINDR_CXR and b.model.num_classes == len(VINDR_CXR) == 14
    ann = prov["annotations"]
    print(f"\nVinDr project: {proj['boxes']} boxes / {proj['labels']} labels held; used "
          f"{ann['boxes_used']} / {ann['labels_used']}; images added {ann['images_added']}")
    assert proj["boxes"] >= 8 and proj["labels"] == 24
    assert ann["boxes_used"] == ann["project_boxes"] == proj["boxes"]
    assert ann["labels_used"] == ann["project_labels"] == proj["labels"]
    assert ann["images_added"] == 24 and ann["images_skipped"] == 0
    assert ann["left_out"] == {"labels": {}, "boxes": {}} and "labels_left_out" not in prov
    assert not [r for r in caplog.records if "left out" in r.getMessage()]
    assert prov["cia"]["n_boxed"] >= 1 and prov["cia"]["n_revealed"] == prov["cia"]["n_boxed"]
    # the app runs it, and its classes map into the project as they are
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.labelsets import map_names
    from cxrviewer.core.pipeline import Pipeline
    from tests.core._tiny_bundles import synthetic_study

    with AnnotationStore(proj["path"], read_only=True) as s:
        mapping, unmapped = map_names(b.manifest.classes, s.label_set)
    assert not unmapped and all(k == v for k, v in mapping.items())
    r = Pipeline({"cia": b}, "cpu").run(synthetic_study())
    assert r.get("contrast", "grid_raw").shape[0] == 14 and tuple(r.classes) == VINDR_CXR.labels


def test_folder_labels_map_onto_the_project_and_the_rest_is_reported(phantoms, tmp_path, caplog):
    from training.data.labels import read_annotations

    proj = _project(tmp_path / "vindr.cxrann", phantoms, "vindr-cxr", box_class="Lung Opacity",
                    label_class="Aortic enlargement")
    records = load_records(phantoms)
    nih = {c: int(sum(r.labels[CLASSES.index(c)] for r in records)) for c in ("Cardiomegaly", "Effusion", "Nodule")}
    nih_boxes = {c: sum(b.label == c for r in records for b in r.boxes) for c in ("Nodule",)}
    ann = read_annotations(records, proj["path"])
    assert ann.label_set == VINDR_CXR and ann.counts["images_updated"] == 24
    # Effusion -> "Pleural effusion" by synonym, Cardiomegaly by name; Nodule has no VinDr label
    # (its labels and boxes are counted as left out)
    labels = np.stack([r.labels for r in ann.records])
    assert labels[:, VINDR_CXR.index("Cardiomegaly")].sum() == nih["Cardiomegaly"] > 0
    assert labels[:, VINDR_CXR.index("Pleural effusion")].sum() == nih["Effusion"] > 0
    assert dict(ann.dropped.labels) == {"Nodule": nih["Nodule"]} and nih["Nodule"] > 0
    assert dict(ann.dropped.boxes) == {"Nodule": nih_boxes["Nodule"]}
    assert all(b.label == "Lung Opacity" for r in ann.records for b in r.boxes)
    with caplog.at_level(logging.WARNING):
        prov = _train([*CIA, "--data", str(phantoms), "--annotations", str(proj["path"])],
                      tmp_path / "mixed.cxrbundle")
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    print(f"\nwarning: {lines}")
    assert len(lines) == 1 and "'Nodule'" in lines[0] and "VinDr-CXR" in lines[0]
    assert prov["labels_left_out"]["labels"] == {"Nodule": nih["Nodule"]}
    assert prov["annotations"]["boxes_used"] == proj["boxes"] and prov["annotations"]["labels_used"] == proj["labels"]


@pytest.fixture(scope="module")
def nih_classifier(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nih_cls") / "nih.cxrbundle"
    prov = _train([*CLASSIFY, "--data", str(phantoms)], out)
    assert prov["annotations"] is None
    return out


def test_nih_folder_still_trains_the_nih_14(nih_classifier):
    m = read_manifest(nih_classifier)
    assert m.classes == tuple(CLASSES) and m.label_set == "nih14" and m.labels == NIH14
    assert "labels_left_out" not in m.provenance


def test_classify_an_extended_set_from_an_nih_bundle_gets_a_new_head(phantoms, nih_classifier, tmp_path):
    custom = extended(NIH14, ["Aortic enlargement"])
    proj = _project(tmp_path / "custom.cxrann", phantoms, custom, box_class="Aortic enlargement",
                    label_class="Aortic enlargement")
    out = tmp_path / "custom_cls.cxrbundle"
    prov = _train([*CLASSIFY, "--annotations", str(proj["path"]), "--init-weights", str(nih_classifier)], out)
    b = load_bundle(out)
    assert b.manifest.classes == (*CLASSES, "Aortic enlargement") and len(b.manifest.classes) == 15
    assert isinstance(b.manifest.label_set, dict) and b.manifest.label_set["name"] == "nih14+custom"
    assert b.manifest.labels == custom
    iw = prov["init_weights"]
    assert iw["loaded"]["backbone"] > 0 and "head" not in iw["loaded"]
    assert any("classes differ" in why for why in iw["random"].values()), iw["random"]
    assert prov["annotations"]["boxes_used"] == proj["boxes"] and prov["annotations"]["labels_used"] == proj["labels"]
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    import torch

    assert b.model(torch.from_numpy(x))["logits"].shape == (1, 15)


def test_label_set_option_maps_a_folder_and_refuses_with_annotations(phantoms, tmp_path):
    from training.cli import main

    prov = _train([*CLASSIFY, "--data", str(phantoms), "--label-set", "vindr-cxr"], tmp_path / "v.cxrbundle")
    m = read_manifest(tmp_path / "v.cxrbundle")
    assert m.classes == VINDR_CXR.labels and m.label_set == "vindr-cxr"
    assert set(prov["labels_left_out"]["labels"]) == {"Nodule"}
    proj = _project(tmp_path / "p.cxrann", phantoms, "vindr-cxr", box_class="ILD", label_class="ILD")
    with pytest.raises(SystemExit, match="own label set"):
        main([*CLASSIFY, "--annotations", str(proj["path"]), "--label-set", "nih14", *TINY,
              "--out", str(tmp_path / "x.cxrbundle")])
    with pytest.raises(SystemExit, match="--data DIR, --annotations PROJECT"):
        main([*CLASSIFY, *TINY, "--out", str(tmp_path / "y.cxrbundle")])
    assert not (tmp_path / "x.cxrbundle").exists() and not (tmp_path / "y.cxrbundle").exists()
    assert json.loads(json.dumps(prov["labels_left_out"]))  # JSON-able as the manifest stores it


def test_nih_only_parts_skip_other_classes_with_a_reason(phantoms, tmp_path):
    from training.cli import main
    from training.evaluate import _nih_name, not_scored

    reasons = not_scored(VINDR_CXR.labels)
    assert "Aortic enlargement" in reasons and "NIH" in reasons["Aortic enlargement"]
    assert "Cardiomegaly" not in reasons and "Pleural effusion" not in reasons  # by name / synonym
    assert _nih_name("Pleural effusion") == "Effusion" and _nih_name("Lung Opacity") == "Lung Opacity"
    assert not not_scored(CLASSES)
    vindr = tmp_path / "vindr_cls.cxrbundle"
    _train([*CLASSIFY, "--data", str(phantoms), "--label-set", "vindr-cxr"], vindr)
    # evaluation against the NIH folder: synonyms scored under their NIH names, the rest listed
    from cxrviewer.core.io import read_nih_folder
    from cxrviewer.core.pipeline import Pipeline
    from training.evaluate import evaluate_pipeline

    refs = list(read_nih_folder(phantoms))[:8]
    res = evaluate_pipeline(Pipeline({"classifier": load_bundle(vindr)}, "cpu", map_max_side=48), refs,
                            methods=["cam"])
    assert res["n_images"] == 8 and res["classes"] == list(VINDR_CXR.labels)
    assert set(res["not_scored"]) == set(reasons)
    effusion = sum(int((r.labels or {}).get("Effusion", 0) > 0) for r in refs)
    assert 0 < effusion < 8 and res["auroc"]["Pleural effusion"] is not None  # scored as NIH "Effusion"
    assert res["auroc"]["Aortic enlargement"] is None
    with pytest.raises(SystemExit, match="NIH-14 classifier"):
        main(["disease-masks", "--classifier", str(vindr), "--data", str(phantoms), *TINY,
              "--out", str(tmp_path / "dm.cxrbundle")])
    assert not (tmp_path / "dm.cxrbundle").exists()


def test_fine_tune_loop_from_a_torchxrayvision_style_bundle(phantoms, tmp_path):
    """An 18-class torchxrayvision-style bundle fine-tuned on a torchxrayvision18 project: classify keeps
    its head (same classes); cia takes its backbone (CIA-Net's head is its own); the written bundles
    carry the 18 classes and feed the next round of the loop."""
    import torch

    from cxrviewer.core.bundle import save_bundle
    from cxrviewer.core.labelsets import TORCHXRAYVISION18
    from cxrviewer.core.models import create_model

    torch.manual_seed(0)
    txv = save_bundle(create_model("cam_classifier", backbone="tiny", num_classes=18), tmp_path / "txv",
                      classes=TORCHXRAYVISION18.labels, label_set="torchxrayvision18", input_size=SIZE)
    proj = _project(tmp_path / "txv.cxrann", phantoms, "torchxrayvision18", box_class="Lung Opacity",
                    label_class="Lung Lesion")
    cls = tmp_path / "txv_ft.cxrbundle"
    prov = _train([*CLASSIFY, "--annotations", str(proj["path"]), "--init-weights", str(txv)], cls)
    assert prov["init_weights"]["loaded"]["head"] > 0 and prov["init_weights"]["loaded"]["backbone"] > 0
    m = read_manifest(cls)
    assert m.classes == TORCHXRAYVISION18.labels and m.label_set == "torchxrayvision18"
    assert prov["annotations"]["boxes_used"] == proj["boxes"] and prov["annotations"]["labels_used"] == proj["labels"]
    cia = tmp_path / "txv_cia.cxrbundle"
    prov = _train([*CIA, "--annotations", str(proj["path"]), "--init-weights", str(cls)], cia)
    iw = prov["init_weights"]
    assert iw["loaded"]["backbone"] == iw["loaded"]["encoder"] > 0 and "head" not in iw["loaded"]
    assert load_bundle(cia).manifest.classes == TORCHXRAYVISION18.labels


def test_a_cache_records_its_classes(phantoms, tmp_path):
    from training.cli import main

    cache = tmp_path / "c.h5"
    _train([*CLASSIFY, "--data", str(phantoms), "--label-set", "vindr-cxr", "--cache", str(cache)],
           tmp_path / "a.cxrbundle")
    from training.data import CachedDataset

    ds = CachedDataset(cache)
    assert ds.classes == VINDR_CXR.labels and ds.labels.shape == (24, 14)
    assert all(b.label in VINDR_CXR.labels for i in range(len(ds)) for b in ds.boxes_of(i))
    with pytest.raises(SystemExit, match="other classes"):
        main([*CLASSIFY, "--data", str(phantoms), "--cache", str(cache), *TINY, "--out", str(tmp_path / "b")])


def test_a_folder_that_is_not_nih_layout_leaves_the_project_images(phantoms, tmp_path, caplog):
    """The app passes the opened folder as --data: a folder of a VinDr project's images (no NIH CSVs)
    adds nothing and says so; the project's images are trained. Without a project it is an error line."""
    from training.cli import main

    folder = tmp_path / "vindr_images"
    folder.mkdir()
    proj = _project(tmp_path / "v.cxrann", phantoms, "vindr-cxr", box_class="Lung Opacity", label_class="ILD")
    with caplog.at_level(logging.WARNING):
        prov = _train([*CLASSIFY, "--data", str(folder), "--annotations", str(proj["path"])], tmp_path / "a.cxrbundle")
    assert any("not an NIH-layout folder" in r.getMessage() for r in caplog.records)
    assert prov["n_train"] + prov["n_val"] == 24 and prov["annotations"]["images_added"] == 24
    with pytest.raises(SystemExit, match="--data: .*not an NIH"):
        main([*CLASSIFY, "--data", str(folder), *TINY, "--out", str(tmp_path / "b.cxrbundle")])


def test_mine_trains_a_vindr_project(phantoms, tmp_path):
    proj = _project(tmp_path / "v.cxrann", phantoms, "vindr-cxr", box_class="Aortic enlargement",
                    label_class="Aortic enlargement")
    out = tmp_path / "am.cxrbundle"
    prov = _train(["mine", "--arch", "msa", "--arch-kwargs", '{"backbone": "tiny"}', "--pretrain-epochs", "1",
                   "--annotations", str(proj["path"])], out)
    b = load_bundle(out)
    assert b.manifest.classes == VINDR_CXR.labels and b.manifest.label_set == "vindr-cxr"
    assert prov["pretrain_epochs"] == 1 and prov["annotations"]["labels_used"] == proj["labels"]
    from training.cli import main

    with pytest.raises(SystemExit, match="not a grayscale classifier of the 18 training classes"):
        main(["mine", "--init", str(out), "--data", str(phantoms), "--label-set", "torchxrayvision18", *TINY,
              "--out", str(tmp_path / "x.cxrbundle")])
