"""Disease masks (disease-masks-attention.txt Eq. 2-5) learned on phantoms, the DM retraining,
the "dm" bundle and ``cxr-train disease-masks``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrviewer.core.classes import CLASSES
from training.data import ChestDataset, load_records, split_records
from training.phantoms import PhantomConfig, write_phantom_dataset
from training.trainers.classify import save_classifier_bundle, train_classifier
from training.trainers.disease_masks import (
    accumulate_disease_masks,
    align_dataset,
    anatomy_from_folder,
    dm_from_classifier,
    pseudo_masks_from_anatomy,
    save_dm_bundle,
    train_disease_masks,
)
from training.trainers.loop import TrainConfig

# 256 px: the stride-32 CAM grid is 8x8, a cell is 32 px against a ~130 x 80 px heart region.
# At 128 px (4x4) a cell is as tall as the whole heart box, and at 192 px (6x6) the mask's edge
# cells straddle a 1.2x box (0.69 inside), so the acceptance test needs this size.
SIZE = 256
GRID = SIZE // 32
CARDIO = CLASSES.index("Cardiomegaly")


def make_phantoms(out: Path) -> Path:
    # The pose is switched off (no rotation, scale or shift): the heart sits where the patient's
    # anatomy puts it, so one box region per class is meaningful without an alignment network.
    cfg = PhantomConfig(contrast=1.5, normal_fraction=0.3, max_findings=2, affine_rotation=0.0,
                        affine_scale=0.0, affine_shift=0.0,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Mass", 1.0),
                                       ("Pneumothorax", 1.0)))
    write_phantom_dataset(out, n=200, size=SIZE, seed=3, config=cfg, masks=True)
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("dm_phantoms") / "set")


def train_base(folder: Path, work: Path, seed: int = 0):
    """The CAM classifier the disease masks come from (initial weights and data order from ``seed``)."""
    from cxrviewer.core.models import create_model

    records = load_records(folder)
    train_r, val_r = split_records(records, fold=0, n_folds=5, seed=0)
    train_ds, val_ds = ChestDataset(train_r, SIZE, seed=0), ChestDataset(val_r, SIZE, seed=0)
    torch.manual_seed(seed)
    model, _ = train_classifier(create_model("cam_classifier", backbone="tiny"), train_ds, val_ds,
                                TrainConfig(epochs=5, batch_size=16, lr=2e-3, out_dir=str(work), seed=seed,
                                            log_every=0, device="cpu"))
    return model, train_ds, val_ds, train_r


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    return train_base(phantoms, tmp_path_factory.mktemp("dm_cls_run"))


def _overlap_fraction(psi: np.ndarray, box: tuple[float, float, float, float], size: int) -> float:
    """Share of the mask mass inside ``box`` (x0, y0, x1, y1 in pixels); each grid cell
    contributes its value times the fraction of its area inside the box."""
    h, w = psi.shape
    ch, cw = size / h, size / w
    x0, y0, x1, y1 = box
    inside = 0.0
    for i in range(h):
        fy = max(0.0, min(y1, (i + 1) * ch) - max(y0, i * ch)) / ch
        for j in range(w):
            fx = max(0.0, min(x1, (j + 1) * cw) - max(x0, j * cw)) / cw
            inside += psi[i, j] * fx * fy
    return inside / max(float(psi.sum()), 1e-12)


#: Acceptance of the learning tests (heart_masks, dm_retraining_metrics). Measured with
#: ``python -m tests.training.margins disease_masks`` (1 and 2 threads): one classifier's heart
#: fraction swings with its training trajectory, 0.70-0.80 over seeds 0-5 (the binary 8x8 mask keeps
#: 11-19 cells; longer, shorter, slower, faster or augmented training did not narrow it), so the
#: acceptance is checked on the mean over HEART_SEEDS classifiers: 0.74-0.79 for seeds 0-2 and 3-5.
#: Per classifier: 27-56 cardiomegaly images kept, fraction / area share (0.23) >= 3.0 (asserted: 2).
#: DM retraining from the seed-0 classifier: Cardiomegaly AUROC 0.97-1.0, mean AUROC 0.78-0.87.
HEART_SEEDS = (0, 1, 2)
MIN_CARDIO_IMAGES = 10
MIN_HEART_FRACTION = 0.70
MIN_HEART_OVER_AREA = 2.0
MIN_DM_CARDIO_AUROC = 0.85
MIN_DM_MEAN_AUROC = 0.75


def heart_mask_metrics(model, train_ds, train_r, folder: Path) -> dict:
    """The Cardiomegaly disease mask (Eq. 2-3) against the heart region of the training population.

    Heart region: the union of the heart boxes of the cardiomegaly training images (the heart
    varies with the sampled anatomy even without a pose), dilated by 20% of its size (1.2x its
    width and height, 10% on each side: the stricter reading of the acceptance), in pixels of
    the 256-px input."""
    psi, counts = accumulate_disease_masks(model, train_ds)
    cardio = psi[CARDIO].numpy()
    truth = json.loads((folder / "phantom_truth.json").read_text())["images"]
    boxes = np.array([truth[r.path.name]["anatomy"]["heart"] for r in train_r if r.labels[CARDIO] > 0])
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * 1.2, (y1 - y0) * 1.2
    region = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    frac = _overlap_fraction(cardio, region, SIZE)
    area_share = (min(region[2], SIZE) - max(region[0], 0)) * (min(region[3], SIZE) - max(region[1], 0)) / SIZE**2
    return {"psi": psi, "counts": counts, "cardio_images": int(counts[CARDIO]), "heart_fraction": frac,
            "area_share": area_share}


def dm_retraining_metrics(model, train_ds, val_ds, work: Path, seed: int = 0) -> dict:
    """One epoch of DM retraining (Eq. 4-5) from ``model``; the validation AUROC after it."""
    cfg = TrainConfig(epochs=1, batch_size=16, lr=5e-4, out_dir=str(work / "run"), seed=seed, log_every=0,
                      device="cpu")
    res = train_disease_masks(model, train_ds, val_ds, cfg)
    table = res.history[-1]["metrics"]  # validation AUROC after the retraining epoch
    return {"res": res, "table": table, "dm_cardio_auroc": table["auroc"]["Cardiomegaly"],
            "dm_mean_auroc": table["mean_auroc"]}


def heart_masks(folder: Path, work: Path, seeds=HEART_SEEDS, first=None) -> dict:
    """:func:`heart_mask_metrics` of one classifier per seed (``first``: the already trained
    ``(model, train_ds, val_ds, train_r)`` of ``seeds[0]``) and their mean heart fraction."""
    runs = []
    for i, seed in enumerate(seeds):
        model, train_ds, _, train_r = first if (i == 0 and first is not None) else \
            train_base(folder, work / f"base{seed}", seed)
        runs.append(heart_mask_metrics(model, train_ds, train_r, folder))
    return {"runs": runs, "heart_fraction_mean": float(np.mean([r["heart_fraction"] for r in runs])),
            "heart_fractions": [r["heart_fraction"] for r in runs],
            "min_cardio_images": min(r["cardio_images"] for r in runs),
            "min_fraction_over_area": min(r["heart_fraction"] / r["area_share"] for r in runs)}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning tests is from failing (> 0: passes)."""
    out = {}
    if "heart_fraction_mean" in m:
        out.update({"min_cardio_images - MIN": m["min_cardio_images"] - MIN_CARDIO_IMAGES,
                    "heart_fraction_mean - MIN": m["heart_fraction_mean"] - MIN_HEART_FRACTION,
                    "min fraction / area_share - 2": m["min_fraction_over_area"] - MIN_HEART_OVER_AREA})
    if "dm_cardio_auroc" in m:
        out.update({"dm_cardio_auroc - MIN": m["dm_cardio_auroc"] - MIN_DM_CARDIO_AUROC,
                    "dm_mean_auroc - MIN": m["dm_mean_auroc"] - MIN_DM_MEAN_AUROC})
    return out


def test_cardiomegaly_mask_concentrates_on_heart(trained, phantoms, tmp_path):
    m = heart_masks(phantoms, tmp_path, first=trained)
    for run in m["runs"]:
        psi, counts = run["psi"], run["counts"]
        assert psi.shape == (len(CLASSES), GRID, GRID)
        assert counts[CARDIO] >= MIN_CARDIO_IMAGES, counts  # Eq. 2 filter P >= 0.8 kept enough cardiomegaly images
        cardio = psi[CARDIO].numpy()
        assert cardio.sum() > 0 and set(np.unique(cardio)) <= {0.0, 1.0}
        frac, area_share = run["heart_fraction"], run["area_share"]
        assert frac >= MIN_HEART_OVER_AREA * area_share, (frac, area_share)  # far from a mask spread over the image
    assert m["heart_fraction_mean"] >= MIN_HEART_FRACTION, m["heart_fractions"]

    model, train_ds = trained[0], trained[1]
    # streaming Eq. 3 == the explain module's batch form on the stacked CAMs
    from cxrviewer.core.explain.disease_masks import disease_masks_from_cams

    sub = torch.utils.data.Subset(train_ds, range(48))
    psi_sub, counts_sub = accumulate_disease_masks(model, sub, batch_size=16)
    model.eval()
    with torch.no_grad():
        out = model(torch.stack([train_ds[i]["image"] for i in range(48)]))
    ref, ref_counts = disease_masks_from_cams(out["cam"], torch.sigmoid(out["logits"]))
    assert ref_counts == counts_sub
    torch.testing.assert_close(ref, psi_sub)


def test_dm_copy_keeps_classifier_outputs(trained):
    model, train_ds, _, _ = trained
    model.eval()
    x = torch.stack([train_ds[i]["image"] for i in range(4)])
    dm = dm_from_classifier(model, torch.zeros(len(CLASSES), GRID, GRID)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dm(x)["logits"], model(x)["logits"])  # psi = 0: f' = f (Eq. 4)
    psi = torch.zeros(len(CLASSES), GRID, GRID)
    psi[CARDIO, 2:5, 2:5] = 1.0
    dm.set_disease_masks(psi)
    with torch.no_grad():
        a, b = dm(x)["cam"], model(x)["cam"]
    torch.testing.assert_close(a[:, CARDIO], b[:, CARDIO] * (1.0 + psi[CARDIO]))  # Eq. 5
    with pytest.raises(Exception, match="cam_classifier"):
        from cxrviewer.core.models import create_model

        dm_from_classifier(create_model("msa", backbone="tiny"), psi)


def test_dm_retraining_bundle_and_pipeline(trained, tmp_path):
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.io import load_study
    from cxrviewer.core.pipeline import Pipeline

    model, train_ds, val_ds, _ = trained
    m = dm_retraining_metrics(model, train_ds, val_ds, tmp_path)
    res, table = m["res"], m["table"]
    assert res.source == "dm" and res.psi.shape == (len(CLASSES), GRID, GRID)
    assert table["auroc"]["Cardiomegaly"] >= MIN_DM_CARDIO_AUROC, table
    assert table["mean_auroc"] >= MIN_DM_MEAN_AUROC, table

    dm_path = save_dm_bundle(res, tmp_path / "dm", input_size=SIZE, provenance={"test": True})
    cls_path = save_classifier_bundle(model, tmp_path / "cls", input_size=SIZE, provenance={"test": True})
    b = load_bundle(dm_path)
    assert b.manifest.role == "dm" and b.manifest.architecture == "dm"
    np.testing.assert_array_equal(b.extras["disease_masks"], res.psi.numpy())
    torch.testing.assert_close(b.model.disease_masks, res.psi)

    pipe = Pipeline({"classifier": load_bundle(cls_path), "dm": b}, "cpu")
    study = load_study(val_ds.records[0].path)
    out = pipe.run(study)
    assert out.attr("disease_mask", "source") == "dm"
    psi = out.get("disease_mask", "psi")
    assert psi is not None and psi.shape[0] == len(CLASSES)
    dm_p = out.get("disease_mask", "dm_probabilities")
    assert dm_p is not None and np.isfinite(dm_p).all()


def test_pseudo_masks_from_phantom_anatomy(trained):
    model, train_ds, _, train_r = trained
    psi = pseudo_masks_from_anatomy(anatomy_from_folder(train_r, SIZE), len(train_r), grid=(GRID, GRID))
    assert psi.shape == (len(CLASSES), GRID, GRID)
    heart, lungs = psi[CARDIO], psi[CLASSES.index("Mass")]
    assert heart.sum() > 0 and lungs.sum() > heart.sum()
    # the heart sits between the lungs, low and slightly to the image right
    ys, xs = np.nonzero(heart.numpy() > 0.5)
    assert ys.mean() >= 2.0 and 1.5 <= xs.mean() <= 4.0
    # the PDM drop into the same DM model
    dm = dm_from_classifier(model, psi)
    torch.testing.assert_close(dm.disease_masks, psi)


def test_align_dataset_identity_and_boxes(trained):
    from cxrviewer.core.models import create_model
    from training.trainers.disease_masks import AlignedDataset

    _, _, val_ds, _ = trained
    al = create_model("alignment", backbone="tiny")  # identity at init
    small = torch.utils.data.Subset(val_ds, range(3))
    small.labels = val_ds.labels[:3]
    aligned = align_dataset(small, al, batch_size=3)
    torch.testing.assert_close(aligned[0]["image"], val_ds[0]["image"], atol=1e-5, rtol=0)
    # a pure shift by half the half-width: content moves left by SIZE/4 pixels
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]).repeat(3, 1, 1)
    shifted = AlignedDataset(small, theta)
    item = {"boxes": torch.tensor([[1.0, 100.0, 50.0, 40.0, 30.0]])}
    from training.trainers.disease_masks import _warp_boxes

    wb = _warp_boxes(item["boxes"], theta[0], (SIZE, SIZE))
    torch.testing.assert_close(wb, torch.tensor([[1.0, 100.0 - SIZE / 4, 50.0, 40.0, 30.0]]))
    assert shifted[0]["image"].shape == val_ds[0]["image"].shape


def test_disease_masks_command(trained, phantoms, tmp_path):
    from cxrviewer.core.bundle import load_bundle
    from training.cli import main

    model, _, _, _ = trained
    cls = save_classifier_bundle(model, tmp_path / "cls", input_size=SIZE, provenance={"test": True})
    out = tmp_path / "pdm.cxrbundle"
    rc = main(["disease-masks", "--data", str(phantoms), "--classifier", str(cls), "--pseudo",
               "--size", str(SIZE), "--limit", "40", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
               "--no-augment", "--out", str(out)])
    assert rc == 0
    b = load_bundle(out)
    assert b.manifest.role == "dm"
    assert b.manifest.provenance["disease_mask_source"] == "pdm"
    assert b.extras["disease_masks"][CARDIO].sum() > 0
