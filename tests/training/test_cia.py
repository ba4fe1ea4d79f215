"""CIA-Net training (cia-net-alignment-contrast-attention.txt Eq. 4-6, Sec. 4.4, Table 3).

- the box-fraction selection is deterministic, the right share, nested across fractions;
- pairing picks the most similar normal (cosine on 16x16 hash codes), never the image itself;
- grid targets / revealed boxes feed the box loss only for revealed images;
- learning: 40 % revealed boxes localise better at T(IoU)=0.3 than 0 % on held-out phantoms;
- ``cxr-train cia`` writes a bundle that loads and runs in the pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cxrviewer.core.classes import CLASSES
from training.data import ChestDataset, load_records, split_records
from training.phantoms import PhantomConfig, write_phantom_dataset
from training.trainers.cia import (bank_negatives, cia_collate, evaluate_cia, grid_targets,
                                   pair_indices, prepare_pairs, select_revealed, train_cia)
from training.trainers.loop import TrainConfig

SIZE = 192  # stride-32 grid of 6 x 6 cells (at 128 px the 4 x 4 grid is too coarse for T(IoU) = 0.3)
#: large boxed findings only, high contrast, half the default pose range: one finding per image
PHANTOMS = PhantomConfig(contrast=1.5, normal_fraction=0.35, max_findings=1, lesion_scale=1.5,
                         affine_rotation=4.0, affine_scale=0.04, affine_shift=0.025,
                         class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Pneumothorax", 1.0),
                                        ("Infiltration", 1.0)))


def make_phantoms(out: Path) -> Path:
    write_phantom_dataset(out, n=260, size=SIZE, seed=3, config=PHANTOMS)
    return out


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("cia_phantoms") / "set")


def _split(folder: Path):
    records = load_records(folder)
    train_r, val_r = split_records(records, fold=0, n_folds=4, seed=0)
    return ChestDataset(train_r, SIZE, seed=0), ChestDataset(val_r, SIZE, seed=0)


# ---- unit tests -------------------------------------------------------------------------------
def test_box_fraction_selection_is_deterministic_share_and_nested():
    keys = [f"img{i:04d}" for i in range(500)]
    has = [i % 3 != 0 for i in range(500)]  # 333 boxed
    n_boxed = sum(has)
    a = select_revealed(keys, has, 0.4, seed=1)
    b = select_revealed(list(keys), list(has), 0.4, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == round(0.4 * n_boxed)
    assert not a[~np.asarray(has)].any()  # only boxed images can be revealed
    big = select_revealed(keys, has, 0.8, seed=1)
    assert big.sum() == round(0.8 * n_boxed) and np.all(big[a])  # 40 % set inside the 80 % set
    assert select_revealed(keys, has, 0.0).sum() == 0
    assert select_revealed(keys, has, 1.0).sum() == n_boxed
    other = select_revealed(keys, has, 0.4, seed=2)
    assert other.sum() == a.sum() and not np.array_equal(other, a)  # the seed matters
    with pytest.raises(Exception):
        select_revealed(keys, has, 1.5)


def test_pairing_picks_most_similar_normal_not_itself():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 256, generator=g) + 0.1
    queries = pool[[3, 1]] * 2.0 + 0.01 * torch.rand(2, 256, generator=g)  # scaled copies: cosine ~ 1
    assert pair_indices(queries, pool).tolist() == [3, 1]
    # a normal used as a positive never pairs with itself: its runner-up instead
    sim = torch.nn.functional.normalize(pool, dim=1) @ torch.nn.functional.normalize(pool, dim=1).t()
    sim.fill_diagonal_(-2)
    got = pair_indices(pool, pool, exclude=torch.arange(6))
    assert got.tolist() == sim.argmax(1).tolist()
    assert all(int(i) != j for j, i in enumerate(got))


def test_prepare_pairs_pairs_by_hash_codes(phantom_dir):
    from cxrviewer.core.models.cia import cosine_similarity_matrix, hash_codes

    train_ds, _ = _split(phantom_dir)
    ds, pool, info = prepare_pairs(train_ds, mode="paired", box_fraction=0.4, seed=0)
    assert info["n_normals"] == len(pool) > 0 and info["n_revealed"] == round(0.4 * info["n_boxed"])
    # brute force for a few positives: the chosen negative maximises cosine similarity of 16x16 codes
    pos = [i for i in range(len(train_ds)) if train_ds.labels[i].any()][:5]
    normal_imgs = torch.stack([pool.image(j) for j in range(len(pool))])
    bank = hash_codes((normal_imgs + 1) / 2)
    for i in pos:
        code = hash_codes((train_ds[i]["image"][None] + 1) / 2)
        best = int(cosine_similarity_matrix(code, bank).argmax())
        assert ds.negative_index(i) == best
        item = ds[i]
        torch.testing.assert_close(item["negative"], pool.image(best))
        assert item["reveal"] == bool(ds.revealed[i])
    batch = cia_collate([ds[i] for i in pos])
    assert batch["negative"].shape == batch["image"].shape and batch["reveal"].dtype == torch.bool


def test_grid_targets_only_for_revealed_images():
    boxes = [torch.tensor([[1.0, 0.0, 0.0, 40.0, 40.0]]), torch.tensor([[2.0, 64.0, 64.0, 10.0, 10.0]])]
    gl, hb = grid_targets(boxes, torch.tensor([True, False]), len(CLASSES), (128, 128), (4, 4))  # 32 px cells
    assert hb[0, 1] == 1 and hb.sum() == 1  # the unrevealed image keeps MIL for every class
    expect = torch.zeros(4, 4)
    expect[:2, :2] = 1  # 40 px from the corner overlaps cells 0 and 1 of 32 px
    torch.testing.assert_close(gl[0, 1], expect)
    assert gl[1].sum() == 0


def test_random_and_canonical_negatives(phantom_dir):
    train_ds, _ = _split(phantom_dir)
    ds, pool, _ = prepare_pairs(train_ds, mode="random", box_fraction=0.0, seed=0)
    ds.set_epoch(0)
    a = [ds.negative_index(i) for i in range(20)]
    ds.set_epoch(1)
    b = [ds.negative_index(i) for i in range(20)]
    assert a != b and max(a + b) < len(pool)
    ds_c, _, info = prepare_pairs(train_ds, mode="canonical", box_fraction=0.0, seed=0,
                                  canonical_path=phantom_dir / "no_such.png")
    neg = ds_c[0]["negative"]
    assert neg.shape == (1, SIZE, SIZE) and info["canonical"].startswith("mean")
    torch.testing.assert_close(ds_c[5]["negative"], neg)


# ---- learning test ---------------------------------------------------------------------------
#: Acceptance of the learning test (T(IoU) = 0.3 accuracy on the held-out fold, 4 classes of ~12
#: boxed images each). Measured (``python -m tests.training.margins cia``, initial weights from
#: seeds 0-5, 1 and 2 threads): 40 % boxes 0.26-0.45, 0 % boxes 0.00 (MIL alone never crosses the
#: 0.5 cell threshold here). Other revealed-box draws (cfg.seed 1 instead of 0) reach 0.18-0.26.
MIN_ACC_40 = 0.2
MIN_GAIN_40_OVER_0 = 0.1


def _train_and_score(train_ds, val_ds, fraction: float, tmp: Path, seed: int = 0) -> tuple[dict, dict]:
    from cxrviewer.core.models import create_model

    torch.manual_seed(seed)  # the same initial weights for every fraction
    model = create_model("cia", backbone="tiny", head_channels=16, share_encoder=True)
    # cfg.seed picks the revealed boxes (select_revealed) and the batch order: the experiment's
    # design, fixed; ``seed`` varies the initial weights only
    cfg = TrainConfig(epochs=6, batch_size=16, lr=3e-3, lr_step_epochs=5, seed=0, log_every=0,
                      out_dir=str(tmp / f"run{fraction}"), device="cpu")
    model, history, extras, info = train_cia(model, train_ds, None, cfg, box_fraction=fraction)
    bank = SimpleNamespace(extras=extras, manifest=SimpleNamespace(normalisation={"kind": "minus1_1"}), path="")
    res = evaluate_cia(model, val_ds, bank_negatives(bank, val_ds))
    return res, info


def learning_run(folder: Path, work: Path, seed: int = 0) -> dict:
    """0 % and 40 % revealed boxes from the same initial weights (``seed``), batch order and pairs."""
    train_ds, val_ds = _split(folder)
    res0, info0 = _train_and_score(train_ds, val_ds, 0.0, work, seed)
    res40, info40 = _train_and_score(train_ds, val_ds, 0.4, work, seed)
    return {"acc0": res0["loc_iou_0.3"], "acc40": res40["loc_iou_0.3"], "res0": res0, "res40": res40,
            "info0": info0, "info40": info40}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning test is from failing (> 0: passes)."""
    return {"acc40 - MIN_ACC_40": m["acc40"] - MIN_ACC_40,
            "acc40 - acc0 - MIN_GAIN": m["acc40"] - m["acc0"] - MIN_GAIN_40_OVER_0}


def test_boxes_improve_localisation(phantom_dir, tmp_path):
    """CIA-Net Table 3: more annotated images -> better localisation (0 % vs 40 %, T(IoU) = 0.3)."""
    m = learning_run(phantom_dir, tmp_path)
    res0, res40, info0, info40 = m["res0"], m["res40"], m["info0"], m["info40"]
    assert info0["n_revealed"] == 0 and info40["n_revealed"] == round(0.4 * info40["n_boxed"]) > 10
    present = [c for c, v in res40["iou"]["0.3"].items() if v["n"]]
    assert len(present) >= 3, present
    acc0, acc40 = m["acc0"], m["acc40"]
    print(json.dumps({"acc_iou0.3_0pct": acc0, "acc_iou0.3_40pct": acc40,
                      "per_class_40": {c: res40["iou"]["0.3"][c]["acc"] for c in present},
                      "per_class_0": {c: res0["iou"]["0.3"][c]["acc"] for c in present},
                      "auroc_0": res0["mean_auroc"], "auroc_40": res40["mean_auroc"]}))
    assert acc40 >= MIN_ACC_40, res40["iou"]["0.3"]
    assert acc40 >= acc0 + MIN_GAIN_40_OVER_0, (acc0, acc40)


# ---- command, bundle, pipeline, annotations ----------------------------------------------------
@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cia_small") / "set"
    write_phantom_dataset(out, n=40, size=64, seed=5, config=PHANTOMS)
    return out


def test_cia_command_writes_bundle_that_runs_in_pipeline(small_dir, tmp_path):
    from cxrviewer.core.bundle import load_bundle
    from training.cli import main

    out = tmp_path / "cia"
    rc = main(["cia", "--data", str(small_dir), "--out", str(out), "--backbone", "tiny",
               "--arch-kwargs", '{"head_channels": 8}', "--size", "64", "--epochs", "1", "--batch-size", "8",
               "--optimizer", "adam", "--box-fraction", "0.4", "--bank-size", "5", "--no-augment"])
    assert rc == 0
    b = load_bundle(str(out) + ".cxrbundle")
    assert b.manifest.family == "cia" and b.manifest.role == "cia" and b.manifest.input_size == (64, 64)
    bank = b.extras["normal_bank_images"]
    assert bank.dtype == np.uint8 and bank.shape[1:] == (64, 64) and 1 <= bank.shape[0] <= 5
    assert b.extras["normal_bank_codes"].shape == (bank.shape[0], 256)
    assert len(b.extras["normal_bank_ids"]) == bank.shape[0]
    prov = b.manifest.provenance
    assert prov["cia"]["box_fraction"] == 0.4 and prov["cia"]["negatives"] == "paired"
    # bank_negatives pairs held-out images with the stored bank
    ds = ChestDataset(load_records(small_dir)[:4], 64)
    neg = bank_negatives(b, ds)
    assert neg(0).shape == (1, 64, 64) and 0 <= neg.chosen[0] < bank.shape[0]
    res = evaluate_cia(b.model, ds, neg)
    assert res["n_images"] == 4
    # the app's pipeline runs it as the "cia" role
    from cxrviewer.core.pipeline import Pipeline
    from tests.core._tiny_bundles import synthetic_study

    pipe = Pipeline({"cia": b}, "cpu")
    r = pipe.run(synthetic_study())
    assert r.get("contrast", "grid_raw") is not None and r.get("contrast", "grid_raw").shape == (len(CLASSES), 2, 2)
    assert r.attr("contrast", "paired_normal_id") in set(b.extras["normal_bank_ids"].tolist())


def test_annotations_store_overrides_boxes_and_labels(small_dir, tmp_path):
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations.model import StudyIdentity
    from training.commands.cia import merge_annotations

    records = load_records(small_dir)
    normal = next(r for r in records if r.is_normal)
    store_path = tmp_path / "project.cxrannot"
    with AnnotationStore(store_path, annotator="test") as s:
        st = s.ensure_study(StudyIdentity(file_name=normal.path.name, sha256="ab" * 32), width=64, height=64,
                            path=normal.path)
        s.add_box(st.id, "Nodule", 10, 12, 8, 9)
        s.set_label(st.id, "Effusion", "present")
    merged = merge_annotations(records, store_path)
    assert len(merged) == len(records)
    rec = next(r for r in merged if r.key == normal.key)
    assert [b.label for b in rec.boxes] == ["Nodule"] and rec.boxes[0].w == pytest.approx(8)
    assert rec.labels[CLASSES.index("Nodule")] == 1 and rec.labels[CLASSES.index("Effusion")] == 1
    assert rec.labels.sum() == 2
