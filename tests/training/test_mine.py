"""Attention mining with class-specific erasure and knowledge preservation
(iterative-attention-mining.txt Eq. 1-6) on the MSA network: the loss, learning on phantoms,
``cxr-train mine`` and its bundle in the pipeline."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrviewer.core.classes import CLASSES
from training.data import ChestDataset, load_records, split_records
from training.losses import am_classification_loss
from training.phantoms import PhantomConfig, write_phantom_dataset
from training.trainers.classify import auroc_table, predict, train_classifier
from training.trainers.loop import TrainConfig
from training.trainers.mine import MiningConfig, MiningLoss, frozen_copy, mine, n_erased

SIZE = 128  # MSA grid = stride 16 -> 8x8


def _tiny_msa(seed: int = 0):
    from cxrviewer.core.models import create_model

    torch.manual_seed(seed)
    return create_model("msa", backbone="tiny")


def _batch(n: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, len(CLASSES), generator=g) < 0.3).float()
    return {"image": torch.randn(n, 1, 64, 64, generator=g), "labels": y}


# ---- the loss ---------------------------------------------------------------------------------
def test_kp_loss_zero_for_identical_networks_then_positive():
    model = _tiny_msa()
    model.train()
    frozen = frozen_copy(model)
    loss_fn = MiningLoss(MiningConfig(kp="kp"), frozen)
    batch = _batch()
    loss, logs = loss_fn(model, batch)
    assert logs["l_kp"] == pytest.approx(0.0, abs=1e-6)  # N_A == N_B, same batch statistics
    assert loss.item() == pytest.approx(logs["l_cls"], abs=1e-6)
    ref_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss, logs = loss_fn(model, batch)
        loss.backward()
        opt.step()
    _, logs = loss_fn(model, batch)
    assert logs["l_kp"] > 1e-4
    # N_A never moves: no gradient and its BatchNorm running statistics stay put
    for k, v in frozen.state_dict().items():
        if not k.endswith("num_batches_tracked"):  # a counter, unused with momentum 0
            torch.testing.assert_close(v, ref_state[k])
    assert all(not p.requires_grad for p in frozen.parameters())
    # the KP term pulls N_B back towards N_A: a gradient step on L_KP alone lowers it
    from training.losses import knowledge_preservation_loss

    before_kp = loss_fn(model, batch)[1]["l_kp"]
    n = n_erased(16, MiningConfig(kp="kp"))
    layers = MiningConfig().layers
    with torch.no_grad():
        out_a = frozen(batch["image"])
    out_b = model(batch["image"])
    l_kp = knowledge_preservation_loss([out_a[k][n:] for k in layers], [out_b[k][n:] for k in layers])
    assert l_kp.item() == pytest.approx(before_kp, rel=1e-4)
    small = torch.optim.SGD(model.parameters(), lr=1e-3)
    small.zero_grad()
    l_kp.backward()
    small.step()
    assert loss_fn(model, batch)[1]["l_kp"] < before_kp
    # lambda weighs it (Eq. 6)
    loss2, logs2 = MiningLoss(MiningConfig(kp="kp", lam=2.0), frozen)(model, batch)
    assert loss2.item() == pytest.approx(logs2["l_cls"] + 2.0 * logs2["l_kp"], rel=1e-5)


def test_erasure_follows_the_class_specific_branches():
    """kp=none: every image erased; the branch logits are the model's own ``forward(x, feature_masks=M)``
    with M from one AM step on its current CAMs (Eq. 1-3). vanilla: only the first N/8."""
    from cxrviewer.core.explain.attention_mining import erasure_masks

    model = _tiny_msa(1).eval()
    batch = _batch(16, seed=2)
    x, y = batch["image"], batch["labels"]
    with torch.no_grad():
        out = model(x)
        w, _ = model.cam_weights()
        masks = erasure_masks(out["features"], w)  # [N, C, h, w]
        want = am_classification_loss(model(x, feature_masks=masks)["logits"], y)
        plain = am_classification_loss(out["logits"], y)
        got, logs = MiningLoss(MiningConfig(kp="none"))(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(got.item() - plain.item()) > 1e-5  # the erasure changed the branch logits
    assert 0.0 < logs["erased_fraction"] < 1.0

    n = n_erased(16, MiningConfig(kp="vanilla"))
    assert n == 2 and n_erased(16, MiningConfig(kp="none")) == 16 and n_erased(3, MiningConfig()) == 1
    mixed = torch.cat([masks[:n], torch.ones_like(masks[n:])])
    with torch.no_grad():
        want_v = am_classification_loss(model(x, feature_masks=mixed)["logits"], y)
        got_v, _ = MiningLoss(MiningConfig(kp="vanilla"))(model, batch)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6)


# ---- learning on phantoms --------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("am_phantoms") / "set"
    # no pose (the test is about mining, not alignment); the settings of the runs quoted below
    cfg = PhantomConfig(contrast=1.5, normal_fraction=0.3, max_findings=2, affine_rotation=0.0,
                        affine_scale=0.0, affine_shift=0.0,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Mass", 1.0),
                                       ("Pneumothorax", 1.0)))
    write_phantom_dataset(out, n=240, size=SIZE, seed=3, config=cfg, masks=True)
    return out


@pytest.fixture(scope="module")
def pretrained(phantom_dir, tmp_path_factory):
    records = load_records(phantom_dir)
    train_r, val_r = split_records(records, fold=0, n_folds=5, seed=0)
    train_ds, val_ds = ChestDataset(train_r, SIZE, seed=0), ChestDataset(val_r, SIZE, seed=0)
    run = tmp_path_factory.mktemp("am_pre")
    model, _ = train_classifier(_tiny_msa(0), train_ds, val_ds,
                                TrainConfig(epochs=5, batch_size=16, lr=2e-3, out_dir=str(run), seed=0, log_every=0))
    return copy.deepcopy(model.state_dict()), train_ds, val_ds


def _peak_area(model, ds) -> float:
    """Mean share of the map that one AM step erases (the connected peak region of each CAM)."""
    from cxrviewer.core.explain.attention_mining import erasure_masks

    model.eval()
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        out = model(x)
        m = erasure_masks(out["features"], model.cam_weights()[0])
    return float(1.0 - m.mean())


def _gap_outputs(model, ds) -> dict[str, torch.Tensor]:
    """GAP of the KP layers (attention-mining Eq. 4) on every image of ``ds``."""
    model.eval()
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        out = model(x)
    return {k: (out[k].flatten(2).mean(2) if out[k].dim() > 2 else out[k]) for k in ("msa", "logits")}


def _drift(model, ds, ref: dict[str, torch.Tensor], layer: str) -> float:
    return float((_gap_outputs(model, ds)[layer] - ref[layer]).norm(dim=1).mean())


def test_mining_widens_attention_and_kp_preserves_knowledge(pretrained, tmp_path):
    state, train_ds, val_ds = pretrained
    start = _tiny_msa()
    start.load_state_dict(state)
    before = auroc_table(val_ds.labels, predict(start, val_ds))["mean_auroc"]
    ref = _gap_outputs(start, val_ds)

    def run(kind: str):
        m = _tiny_msa()
        m.load_state_dict(state)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=5e-4, out_dir=str(tmp_path / kind), seed=0, log_every=1)
        return mine(m, train_ds, val_ds, cfg, MiningConfig(kp=kind))

    none, _ = run("none")
    vanilla, _ = run("vanilla")
    kp, hist_kp = run("kp")
    # Erasure drives the network to spread its evidence: the peak region of its CAMs grows
    # (AM Sec. 2.1). Measured on phantoms: ~0.50 of the 8x8 map before, ~0.48 after two plain
    # weighted-BCE epochs (control run while writing this test), ~0.74 after mining w/o KP.
    a_start, a_none = _peak_area(start, val_ds), _peak_area(none, val_ds)
    assert a_none > a_start + 0.1, (a_none, a_start)
    # KP (Eq. 4-6) keeps N_B closer to N_A: KP-Vanilla and KP erase the same images, only the
    # frozen-copy term differs. The effect at lambda = 0.5 is modest here (5-30% less MSA drift
    # in our runs), so this only asserts the direction.
    d_vanilla, d_kp = _drift(vanilla, val_ds, ref, "msa"), _drift(kp, val_ds, ref, "msa")
    assert d_kp < d_vanilla, (d_kp, d_vanilla)
    # the classifier still works after mining with KP
    after = hist_kp[-1]["metrics"]["mean_auroc"]
    assert after >= 0.7 and after >= before - 0.05, (before, after)
    import json

    steps = [json.loads(s) for s in (tmp_path / "kp" / "log.jsonl").read_text().splitlines()]
    kp_terms = [s["l_kp"] for s in steps if s["kind"] == "step" and "l_kp" in s]
    assert kp_terms and max(kp_terms) > 0


def test_mine_command_writes_a_bundle_the_pipeline_runs(phantom_dir, tmp_path):
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.io import load_study
    from cxrviewer.core.pipeline import Pipeline
    from training.cli import main

    out = tmp_path / "am.cxrbundle"
    rc = main(["mine", "--data", str(phantom_dir), "--arch", "msa", "--arch-kwargs", '{"backbone": "tiny"}',
               "--pretrain-epochs", "1", "--epochs", "1", "--kp", "kp", "--size", "96", "--limit", "48",
               "--batch-size", "16", "--device", "cpu", "--no-augment", "--out", str(out)])
    assert rc == 0
    b = load_bundle(out)
    assert b.manifest.family == "classifier" and b.manifest.architecture == "msa"
    assert b.manifest.provenance["mining"]["kp"] == "kp" and b.manifest.provenance["pretrain_epochs"] == 1
    res = Pipeline({"classifier": b}, "cpu").run(load_study(sorted((phantom_dir / "images").iterdir())[0]))
    assert res.probabilities is not None and np.isfinite(res.probabilities).all()
    assert res.am_final is not None and res.am_final.shape[0] == len(CLASSES)
