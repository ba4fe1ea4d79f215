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
from training.trainers.mine import KP_LAYERS, MiningConfig, MiningLoss, frozen_copy, mine, n_erased

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
def kp_loss_metrics(seed: int = 0) -> dict:
    """L_KP of a network against its frozen copy: at the start, after two SGD steps on L (Eq. 6),
    and after one more small step on L_KP alone (weights and batch from ``seed``)."""
    from training.losses import knowledge_preservation_loss

    model = _tiny_msa(seed)
    model.train()
    frozen = frozen_copy(model)
    ref_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    loss_fn = MiningLoss(MiningConfig(kp="kp"), frozen)
    batch = _batch(seed=seed)
    loss, logs = loss_fn(model, batch)
    out = {"l_kp_start": logs["l_kp"], "loss_minus_cls_start": loss.item() - logs["l_cls"]}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss, logs = loss_fn(model, batch)
        loss.backward()
        opt.step()
    out["l_kp_trained"] = loss_fn(model, batch)[1]["l_kp"]
    # N_A never moves: no gradient and its BatchNorm running statistics stay put
    out["frozen_unchanged"] = all(torch.allclose(v.float(), ref_state[k].float())
                                  for k, v in frozen.state_dict().items()
                                  if not k.endswith("num_batches_tracked"))  # a counter, unused with momentum 0
    out["frozen_no_grad"] = all(not p.requires_grad for p in frozen.parameters())
    # the KP term pulls N_B back towards N_A: a gradient step on L_KP alone lowers it
    n = n_erased(16, MiningConfig(kp="kp"))
    layers = MiningConfig().layers
    with torch.no_grad():
        out_a = frozen(batch["image"])
    out_b = model(batch["image"])
    l_kp = knowledge_preservation_loss([out_a[k][n:] for k in layers], [out_b[k][n:] for k in layers])
    out["l_kp_recomputed"] = l_kp.item()
    small = torch.optim.SGD(model.parameters(), lr=1e-3)
    small.zero_grad()
    l_kp.backward()
    small.step()
    out["l_kp_after_kp_step"] = loss_fn(model, batch)[1]["l_kp"]
    # lambda weighs it (Eq. 6)
    loss2, logs2 = MiningLoss(MiningConfig(kp="kp", lam=2.0), frozen)(model, batch)
    out["lam2_loss"], out["lam2_expected"] = loss2.item(), logs2["l_cls"] + 2.0 * logs2["l_kp"]
    return out


#: L_KP after two SGD steps on L: clearly above 0, the networks differ (measured 0.03-0.05)
MIN_TRAINED_KP = 1e-4


def kp_loss_slack(m: dict) -> dict[str, float]:
    """How far each learned number of the loss test is from failing (> 0: passes)."""
    return {"l_kp_trained - MIN_TRAINED_KP": m["l_kp_trained"] - MIN_TRAINED_KP,
            "l_kp_trained - l_kp_after_kp_step": m["l_kp_trained"] - m["l_kp_after_kp_step"]}


def test_kp_loss_zero_for_identical_networks_then_positive():
    m = kp_loss_metrics()
    assert m["l_kp_start"] == pytest.approx(0.0, abs=1e-6)  # N_A == N_B, same batch statistics
    assert m["loss_minus_cls_start"] == pytest.approx(0.0, abs=1e-6)
    assert m["l_kp_trained"] > MIN_TRAINED_KP, m
    assert m["frozen_unchanged"] and m["frozen_no_grad"]
    assert m["l_kp_recomputed"] == pytest.approx(m["l_kp_trained"], rel=1e-4)
    assert m["l_kp_after_kp_step"] < m["l_kp_trained"], m
    assert m["lam2_loss"] == pytest.approx(m["lam2_expected"], rel=1e-5)


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
def make_phantoms(out: Path) -> Path:
    # no pose (the test is about mining, not alignment)
    cfg = PhantomConfig(contrast=1.5, normal_fraction=0.3, max_findings=2, affine_rotation=0.0,
                        affine_scale=0.0, affine_shift=0.0,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Mass", 1.0),
                                       ("Pneumothorax", 1.0)))
    write_phantom_dataset(out, n=240, size=SIZE, seed=3, config=cfg, masks=True)
    return out


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("am_phantoms") / "set")


def pretrain(folder: Path, work: Path, seed: int = 0):
    """The MSA classifier before mining (initial weights and data order from ``seed``)."""
    records = load_records(folder)
    train_r, val_r = split_records(records, fold=0, n_folds=5, seed=0)
    train_ds, val_ds = ChestDataset(train_r, SIZE, seed=0), ChestDataset(val_r, SIZE, seed=0)
    model, _ = train_classifier(_tiny_msa(seed), train_ds, val_ds,
                                TrainConfig(epochs=5, batch_size=16, lr=2e-3, out_dir=str(work), seed=seed,
                                            log_every=0, device="cpu"))
    return copy.deepcopy(model.state_dict()), train_ds, val_ds


@pytest.fixture(scope="module")
def pretrained(phantom_dir, tmp_path_factory):
    return pretrain(phantom_dir, tmp_path_factory.mktemp("am_pre"))


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
    """GAP of the KP layers (attention-mining Eq. 4) on every image of ``ds``, with BatchNorm on
    batch statistics (the held-out set as one batch), as N_A and N_B run in the KP term."""
    net = copy.deepcopy(model).train()  # a copy: its running statistics may move
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        out = net(x)
    return {k: (out[k].flatten(2).mean(2) if out[k].dim() > 2 else out[k]) for k in KP_LAYERS}


def _drift(model, ds, ref: dict[str, torch.Tensor], layer: str) -> float:
    return float((_gap_outputs(model, ds)[layer] - ref[layer]).norm(dim=1).mean())


#: Acceptance of the learning test; the measured values are in its comments.
MIN_AREA_GAIN = 0.1
MAX_KP_DRIFT_RATIO = 0.6
MIN_AUROC_AFTER_KP = 0.7
MAX_AUROC_LOSS_KP = 0.05


def learning_run(pretrained, work: Path, seed: int = 0) -> dict:
    """Mine the pre-trained network three ways (no KP, KP-Vanilla, KP) for three epochs. All runs
    start from the same weights and see the same batches in the same order (``seed``): they
    differ only in the method."""
    state, train_ds, val_ds = pretrained
    start = _tiny_msa()
    start.load_state_dict(state)
    before = auroc_table(val_ds.labels, predict(start, val_ds))["mean_auroc"]
    ref = _gap_outputs(start, val_ds)

    def run(kind: str):
        m = _tiny_msa()
        m.load_state_dict(state)
        cfg = TrainConfig(epochs=3, batch_size=16, lr=5e-4, out_dir=str(work / kind), seed=seed, log_every=1,
                          device="cpu")
        return mine(m, train_ds, val_ds, cfg, MiningConfig(kp=kind))

    none, _ = run("none")
    vanilla, _ = run("vanilla")
    kp, hist_kp = run("kp")
    return {"auroc_before": before, "auroc_after_kp": hist_kp[-1]["metrics"]["mean_auroc"],
            "area_start": _peak_area(start, val_ds), "area_none": _peak_area(none, val_ds),
            "drift_vanilla": {k: _drift(vanilla, val_ds, ref, k) for k in KP_LAYERS},
            "drift_kp": {k: _drift(kp, val_ds, ref, k) for k in KP_LAYERS}}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning test is from failing (> 0: passes)."""
    return {"area_none - area_start - MIN_AREA_GAIN": m["area_none"] - m["area_start"] - MIN_AREA_GAIN,
            **{f"{MAX_KP_DRIFT_RATIO} x drift_vanilla - drift_kp ({k}, relative)":
               MAX_KP_DRIFT_RATIO - m["drift_kp"][k] / m["drift_vanilla"][k] for k in ("msa", "logits")},
            "auroc_after_kp - MIN": m["auroc_after_kp"] - MIN_AUROC_AFTER_KP,
            "auroc_after_kp - (before - MAX_LOSS)": m["auroc_after_kp"] - m["auroc_before"] + MAX_AUROC_LOSS_KP}


def test_mining_widens_attention_and_kp_preserves_knowledge(pretrained, tmp_path):
    m = learning_run(pretrained, tmp_path)
    # Erasure drives the network to spread its evidence: the peak region of its CAMs grows
    # (AM Sec. 2.1). Measured (python -m tests.training.margins mine, seeds 0-5, 1 and 2 threads):
    # 0.45-0.50 of the 8x8 map before, 0.63-0.75 after three epochs of mining without KP (gain
    # 0.17-0.24; two epochs gave 0.08-0.23), 0.44-0.49 after two plain weighted-BCE epochs.
    assert m["area_none"] > m["area_start"] + MIN_AREA_GAIN, m
    # KP (Eq. 4-6) keeps N_B close to N_A: KP-Vanilla and KP erase the same images from the same
    # start in the same order, only the frozen-copy term differs. The drift is measured as KP
    # defines it (GAP of the layers with batch statistics): eval-mode outputs also carry the
    # BatchNorm running statistics, which keep catching up with the pre-trained weights whatever
    # the loss (no KP term reaches them), so there both runs share a floor and the gap was only
    # 6-40 % (once reversed, 8.58 vs 8.22, in a fresh clone). With batch statistics KP's drift is
    # 0.20-0.36 of KP-Vanilla's (msa and logits; seeds 0-5, 1 and 2 threads), whatever lambda in 0.5-4.
    for layer in ("msa", "logits"):
        d_van, d_kp = m["drift_vanilla"][layer], m["drift_kp"][layer]
        assert d_kp < MAX_KP_DRIFT_RATIO * d_van, (layer, d_kp, d_van)
    # the classifier still works after mining with KP
    before, after = m["auroc_before"], m["auroc_after_kp"]
    assert after >= MIN_AUROC_AFTER_KP and after >= before - MAX_AUROC_LOSS_KP, (before, after)
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
    assert res.get("attention_mining", "final") is not None and res.get("attention_mining", "final").shape[0] == len(CLASSES)
