"""Classifier training on phantoms: it learns, it resumes to the same result, it runs under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import AugmentConfig, ChestDataset, load_records, split_records
from training.phantoms import PhantomConfig, write_phantom_dataset
from training.trainers.classify import auroc_table, predict, train_classifier
from training.trainers.loop import TrainConfig

REPO = Path(__file__).resolve().parents[2]


#: Acceptance of the learning test. Measured (``python -m tests.training.margins classify``):
#: 0.905-0.967 over seeds 0-5 (initial weights, shuffle, augmentation) at 1 and 2 threads.
MIN_MEAN_AUROC = 0.85


def make_phantoms(out: Path) -> Path:
    # only the commonest findings, high contrast: the test is about the trainer, not about hard data
    cfg = PhantomConfig(contrast=2.0, lesion_scale=1.4, normal_fraction=0.3, max_findings=2,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Mass", 1.0),
                                       ("Pneumothorax", 1.0)))
    write_phantom_dataset(out, n=640, size=128, seed=3, config=cfg)
    return out


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "set")


def _datasets(folder: Path, size: int = 128, augment: bool = True):
    records = load_records(folder)
    train_r, val_r = split_records(records, fold=0, n_folds=5, seed=0)
    aug = AugmentConfig() if augment else None
    return ChestDataset(train_r, size, augment_cfg=aug, seed=0), ChestDataset(val_r, size, seed=0)


def learning_run(folder: Path, work: Path, seed: int = 0) -> dict:
    """Train the tiny CAM classifier on the phantoms (initial weights, shuffle and augmentation
    from ``seed``) and score the held-out fold."""
    from cxrviewer.core.models import create_model

    train_ds, val_ds = _datasets(folder)
    torch.manual_seed(seed)
    model = create_model("cam_classifier", backbone="tiny")
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-3, out_dir=str(work / "run"), seed=seed, log_every=0,
                      device="cpu")
    model, history = train_classifier(model, train_ds, val_ds, cfg)
    table = auroc_table(val_ds.labels, predict(model, val_ds))
    return {"mean_auroc": table["mean_auroc"], "table": table, "epochs": cfg.epochs}


def learning_slack(m: dict) -> dict[str, float]:
    """How far each number of the learning test is from failing (> 0: passes)."""
    return {"mean_auroc - MIN_MEAN_AUROC": m["mean_auroc"] - MIN_MEAN_AUROC}


def test_classifier_learns_on_phantoms(phantom_dir, tmp_path):
    m = learning_run(phantom_dir, tmp_path)
    table = m["table"]
    present = {c: v for c, v in table["auroc"].items() if np.isfinite(v)}
    assert set(present) >= {"Cardiomegaly", "Effusion", "Mass", "Pneumothorax"}
    assert table["mean_auroc"] >= MIN_MEAN_AUROC, table
    # the log records every epoch with its metrics
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in lines if r["kind"] == "epoch") == m["epochs"]


def test_killed_run_resumes_to_same_metrics(phantom_dir, tmp_path):
    from cxrviewer.core.models import create_model

    train_ds, val_ds = _datasets(phantom_dir, size=64)  # augmented: resume must replay the same draws
    train_ds.records = train_ds.records[:96]
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, seed=5, log_every=0, out_dir=str(tmp_path / "a"),
                      device="cpu")
    torch.manual_seed(1)
    straight, hist_a = train_classifier(create_model("cam_classifier", backbone="tiny"), train_ds, val_ds, cfg)

    cfg_b = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "b")})
    torch.manual_seed(1)
    # "killed" after the first epoch's checkpoint
    train_classifier(create_model("cam_classifier", backbone="tiny"), train_ds, val_ds, cfg_b, stop_after_epoch=0)
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    torch.manual_seed(123)  # a new process would start from other random weights: resume must override them
    resumed, hist_b = train_classifier(create_model("cam_classifier", backbone="tiny"), train_ds, val_ds, cfg_b)
    assert len(hist_b) == 3
    for (ka, va), (kb, vb) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)
    assert hist_a[-1]["metrics"]["mean_auroc"] == pytest.approx(hist_b[-1]["metrics"]["mean_auroc"], abs=1e-6)


def test_classify_command_under_torchrun(phantom_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "cls.cxrbundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # --standalone: a free rendezvous port, so two suites running at once on one machine never collide
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.cli", "classify",
           "--data", str(phantom_dir), "--arch", "tiny", "--size", "64", "--epochs", "1", "--batch-size", "16",
           "--limit", "64", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from cxrviewer.core.bundle import load_bundle

    b = load_bundle(out)
    assert b.manifest.architecture == "cam_classifier"
    assert b.manifest.provenance["epochs_trained"] == 1


@pytest.mark.parametrize("scale", [1e-3, 100.0])
def test_loop_gradient_clipping_equals_clip_grad_norm(tmp_path, scale):
    """The loop rescales gradients only above cfg.grad_clip on the CPU: bit-identical to the stock call."""
    import copy

    from torch.utils.data import TensorDataset

    from training.trainers.loop import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 3))
    cfg = TrainConfig(grad_clip=5.0, out_dir=str(tmp_path), device="cpu")
    trainer = Trainer(model, TensorDataset(torch.zeros(1)), lambda m, b: (torch.zeros(()), {}), cfg)
    ref = copy.deepcopy(model)
    x = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    for m in (model, ref):
        (m(x).sum() * scale).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
    trainer._clip_gradients()
    trainer.close()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)
    total = torch.linalg.vector_norm(torch.cat([p.grad.ravel() for p in model.parameters()]))
    assert float(total) <= 5.0 + 1e-4
