"""``cxr-train compare`` (issue 20): the fine-tune panel's before/after numbers on a project's studies.

- a model's classes are matched to the project's labels; only labels the user set count for AUROC
  (a box means present; uncertain and unset studies are left out);
- the fixed-box prior is scored against the user's boxes: a box drawn exactly on the prior is a hit,
  a small box in a corner is a miss (accuracy 0.5 on two of each);
- the same bundle as old and new gives the same numbers, and the JSON holds what the panel shows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrviewer.core.geometry import Box
from cxrviewer.core.labelsets import NIH14
from training.commands.compare import _records

SIZE = 32


def test_records_use_only_the_labels_the_user_set(tmp_path):
    p = [tmp_path / f"{i}.png" for i in range(4)]
    studies = [(p[0], {"Nodule": 1}, []), (p[1], {"Nodule": 0, "Mass": 0}, []),
               (p[2], {}, [Box("Mass", 1, 2, 3, 4)]), (p[3], {"Nodule": -1}, [])]
    recs, mask = _records(studies, NIH14, ["Nodule", "Mass", "Pneumonia"])
    assert mask.tolist() == [[True, False, False], [True, True, False], [False, True, False],
                             [False, False, False]]
    assert np.stack([r.labels for r in recs]).tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert recs[2].boxes == [Box("Mass", 1, 2, 3, 4)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Path]:
    """Four phantoms with a Nodule box each: two drawn on the shipped prior's Nodule box, two in a corner;
    Nodule present on them, absent on two unboxed ones; and an untrained tiny CIA-Net bundle."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations.model import StudyIdentity
    from cxrviewer.core.explain.prior import load_prior
    from training.cli import main
    from training.data import load_records
    from training.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("compare")
    write_phantom_dataset(root / "ph", n=6, size=SIZE, seed=3)
    x, y, w, h = (v * SIZE for v in load_prior()["boxes"]["Nodule"])
    store = root / "p.cxrann"
    with AnnotationStore(store, annotator="t") as s:
        for i, r in enumerate(load_records(root / "ph")):
            st = s.ensure_study(StudyIdentity(file_name=r.path.name, sha256=f"{i:064x}"), width=SIZE, height=SIZE,
                                path=r.path)
            if i < 2:
                s.add_box(st.id, "Nodule", x, y, w, h)
            elif i < 4:
                s.add_box(st.id, "Nodule", 0.0, 0.0, 2.0, 2.0)
            else:
                s.set_label(st.id, "Nodule", "absent")
    bundle = root / "cia.cxrbundle"
    assert main(["init-bundle", "--arch", "cia", "--kwargs", '{"backbone": "tiny", "head_channels": 8}',
                 "--input-size", "64", "--bank-size", "4", "--out", str(bundle)]) == 0
    return store, bundle


def test_compare_scores_both_models_and_the_prior(project, tmp_path):
    from training.cli import main

    store, bundle = project
    out = tmp_path / "cmp.json"
    assert main(["compare", "--annotations", str(store), "--new", str(bundle), "--old", str(bundle),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_studies"] == 6 and "trained on" in res["caveat"]
    assert res["prior"]["loc"] == {"Nodule": 0.5} and res["prior"]["loc_iou_0.3"] == 0.5
    new, old = res["new"], res["old"]
    assert new["n_boxed"] == 4 and new["n_labelled"] == 6 and set(new["auroc"]) == {"Nodule"}
    for key in ("mean_auroc", "loc_iou_0.3", "auroc", "loc"):
        assert new[key] == old[key]  # the same bundle twice: the same numbers
    assert 0.0 <= new["mean_auroc"] <= 1.0 and set(new["loc"]) == {"Nodule"}
