"""The training data path (training.data.loader): stored pixels from workers, augmentation and
normalisation of whole batches on the device, the same batches and weights with 0 or N workers."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data import AugmentConfig, CachedDataset, ChestDataset, build_cache, collate, load_records
from training.data.loader import DeviceTransform, EpochSampler, EpochItems, resolve_workers
from training.phantoms import PhantomConfig, write_phantom_dataset
from training.trainers.classify import train_classifier
from training.trainers.loop import TrainConfig

SIZE = 64


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """(records, cache path) of 40 phantoms at 96 px, cached at 64 px."""
    folder = tmp_path_factory.mktemp("loader")
    cfg = PhantomConfig(contrast=2.0, normal_fraction=0.3, max_findings=2)
    records = load_records(write_phantom_dataset(folder / "set", n=40, size=96, seed=11, config=cfg))
    return records, build_cache(records, folder / "cache.h5", SIZE)


def _strong() -> AugmentConfig:
    """Large ranges, so a wrong warp or a wrong draw shows."""
    return AugmentConfig(rotation_deg=20.0, scale=0.2, shift=0.1, brightness=0.1, contrast=0.2, gamma=0.3)


def _item_batch(ds, idx: list[int]) -> dict:
    return collate([ds[i] for i in idx])


def _device_batch(ds, idx: list[int], epoch: int) -> dict:
    return DeviceTransform.of(ds)(collate([ds.raw_item(i, epoch) for i in idx]))


@pytest.mark.parametrize("kind", ["cache", "files"])
def test_device_batch_equals_the_per_item_path(phantoms, kind):
    records, cache = phantoms
    if kind == "cache":
        ds = CachedDataset(cache, augment_cfg=_strong(), normalisation="mean_std", seed=3)
    else:
        ds = ChestDataset(records, SIZE, augment_cfg=_strong(), normalisation="mean_std", seed=3)
    idx = [0, 5, 7, 12, 31]
    ds.set_epoch(2)
    old = _item_batch(ds, idx)
    new = _device_batch(ds, idx, epoch=2)
    assert new["image"].shape == old["image"].shape == (5, 1, SIZE, SIZE) and new["image"].dtype == torch.float32
    torch.testing.assert_close(new["image"], old["image"], rtol=0, atol=2e-5)
    torch.testing.assert_close(new["labels"], old["labels"])
    assert any(len(b) for b in old["boxes"])  # the phantoms have boxes: they must move the same way
    for a, b in zip(new["boxes"], old["boxes"]):
        torch.testing.assert_close(a, b)
    # another epoch draws another augmentation
    assert (new["image"] - _device_batch(ds, idx, epoch=3)["image"]).abs().max() > 0.05
    raw = ds.raw_item(0, 2)["image"]
    assert raw.dtype == (torch.uint8 if kind == "cache" else torch.float32)  # the cache's bytes travel as they are


def test_epoch_sampler_keeps_the_loops_shuffle():
    n = 37
    for epoch in range(3):
        gen = torch.Generator().manual_seed(5 * 1000 + epoch)
        old = [int(i) for b in DataLoader(range(n), batch_size=4, shuffle=True, generator=gen) for i in b]
        s = EpochSampler(n, 5)
        s.set_epoch(epoch)
        assert list(s) == [(epoch, i) for i in old]
    shares = []
    for rank in range(2):
        s = EpochSampler(n, 5, rank=rank, world=2)
        s.set_epoch(1)
        shares.append([i for _, i in s])
        assert len(shares[-1]) == len(s) == 19
    assert set(shares[0]) | set(shares[1]) == set(range(n))


def test_cached_dataset_pickles_and_reopens_its_file(phantoms):
    _, cache = phantoms
    ds = CachedDataset(cache, rows=[3, 4, 9], augment_cfg=_strong(), seed=1)
    before = ds.raw_item(2, 0)  # opens the file in this process
    copy = pickle.loads(pickle.dumps(ds))  # what spawn (Windows, macOS) does to the data set
    assert copy._file is None
    after = copy.raw_item(2, 0)
    assert torch.equal(before["image"], after["image"]) and torch.equal(before["aug"], after["aug"])


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])  # spawn: ~10 s
def test_workers_serve_the_same_batches(phantoms, context):
    import multiprocessing

    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} here")
    _, cache = phantoms
    ds = CachedDataset(cache, augment_cfg=_strong(), seed=2)
    ds.image_u8(0)  # an open h5py handle in the parent must not reach a forked worker
    sampler = EpochSampler(len(ds), 2)
    sampler.set_epoch(1)
    kw = dict(batch_size=8, sampler=sampler, collate_fn=collate)
    main = list(DataLoader(EpochItems(ds), num_workers=0, **kw))
    work = list(DataLoader(EpochItems(ds), num_workers=1 if context == "spawn" else 2,
                           multiprocessing_context=context, **kw))
    assert len(main) == len(work) == 5
    for a, b in zip(main, work):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["aug"], b["aug"])
        assert torch.equal(a["index"], b["index"])


def _train(cache, out, workers: int, *, old_loop: bool = False) -> dict:
    """Weights after 2 epochs of the tiny classifier on 32 cached images (augmented)."""
    from cxrviewer.core.models import create_model
    from training.trainers.classify import classification_loss
    from training.trainers.loop import Trainer

    train_ds = CachedDataset(cache, rows=list(range(32)), augment_cfg=AugmentConfig(), seed=4)
    torch.manual_seed(0)
    model = create_model("cam_classifier", backbone="tiny")
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, seed=4, log_every=0, num_workers=workers,
                      out_dir=str(out), device="cpu")
    if old_loop:  # the loop before the keyed data path: a new DataLoader per epoch over ds[i]
        trainer = Trainer(model, train_ds, classification_loss, cfg, collate_fn=collate)
        history = trainer.fit()
        trainer.close()
    else:
        model, history = train_classifier(model, train_ds, None, cfg)
    assert len(history) == 2
    return model.state_dict()


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("where", ["workers augment (CPU default)", "device transform"])
def test_runs_with_and_without_workers_reach_identical_weights(phantoms, tmp_path, monkeypatch, where):
    from training.trainers.loop import Trainer

    if where == "device transform":
        monkeypatch.setattr(Trainer, "transform_on_cpu", True)  # what a CUDA run does, here on the CPU
    _, cache = phantoms
    none = _train(cache, tmp_path / "w0", 0)
    two = _train(cache, tmp_path / "w2", 2)
    again = _train(cache, tmp_path / "w2b", 2)
    start = _untrained()
    assert any(not torch.equal(start[k], none[k]) for k in none)  # it trained
    _assert_same(two, again)  # two runs with workers: identical
    _assert_same(none, two)  # with and without workers (which start on epoch 2 during epoch 1's end): identical
    if where != "device transform":  # the CPU path feeds exactly what the loop fed before
        _assert_same(none, _train(cache, tmp_path / "old", 0, old_loop=True))


def _untrained() -> dict:
    from cxrviewer.core.models import create_model

    torch.manual_seed(0)
    return create_model("cam_classifier", backbone="tiny").state_dict()


def test_workers_option():
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3
    assert resolve_workers(None) >= 0
    with pytest.raises(ValueError):
        resolve_workers(-1)
    assert np.isfinite(resolve_workers(None))


@pytest.mark.cuda
def test_cuda_pinned_path_matches_the_cpu(phantoms, tmp_path):
    """On a GPU: pinned uint8 batches, the device transform on CUDA equals the CPU one, a run trains."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    _, cache = phantoms
    ds = CachedDataset(cache, augment_cfg=_strong(), seed=2)
    batch = next(iter(DataLoader(EpochItems(ds), batch_size=8, sampler=EpochSampler(len(ds), 2),
                                 collate_fn=collate, pin_memory=True, num_workers=1)))
    assert batch["image"].is_pinned() and batch["image"].dtype == torch.uint8
    gpu = {k: (v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    on_gpu = DeviceTransform.of(ds)(gpu)["image"]
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), DeviceTransform.of(ds)(batch)["image"], rtol=0, atol=1e-4)
    from cxrviewer.core.models import create_model

    cfg = TrainConfig(epochs=1, batch_size=8, seed=1, log_every=0, num_workers=1, out_dir=str(tmp_path / "r"),
                      device="cuda")
    _, history = train_classifier(create_model("cam_classifier", backbone="tiny"), ds, None, cfg)
    assert np.isfinite(history[0]["loss"]) and history[0]["images_per_s"] > 0


def test_predict_on_stored_pixels_equals_the_per_item_path(phantoms):
    from torch.utils.data import Subset

    from cxrviewer.core.models import create_model
    from training.trainers.classify import predict

    _, cache = phantoms
    ds = CachedDataset(cache, rows=list(range(20)), normalisation="mean_std")
    torch.manual_seed(0)
    model = create_model("cam_classifier", backbone="tiny")
    fast = predict(model, ds, batch_size=8)  # stored uint8 pixels, normalised as a batch
    slow = predict(model, Subset(ds, range(len(ds))), batch_size=8)  # a wrapper: per-item normalisation
    assert fast.shape == (20, 14) and np.ptp(fast) > 0
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
