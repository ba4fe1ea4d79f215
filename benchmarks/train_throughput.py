"""Benchmark: images/s of ``cxr-train classify``'s training loop against a bare PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--data ../shared/data/nih] [--n 80] [--size 128]
        [--batch-size 16] [--epochs 6] [--threads 1] [--variants auto,0,before]

Both sides train the same model (the registry's ``cam_classifier`` on ResNet-18, same initial
weights), at the same batch size and input size, on the same cached images: the first ``--n``
NIH records (generated phantoms when the folder is absent) written once by the cache builder of
``cxr-train cache`` and split as ``cxr-train classify --cache`` splits them (patient-wise fold 0).

- trainer: ``train_classifier`` on the datasets ``cxr-train classify --cache`` builds, with its
  defaults (augmentation on, gradient clipping, Adam, a log line every 10 steps); the images/s
  of each epoch is the loop's own record (the training loop; the per-epoch checkpoint and
  evaluation are outside it, so no held-out set is evaluated here);
- bare loop: the cached uint8 train images held in one tensor, a shuffled permutation per epoch,
  ``x / 255 * 2 - 1``, forward, BCE-with-logits, backward, Adam step: no augmentation, no
  workers, no logging.

The epochs interleave in one process (a bare epoch after every trainer epoch, from the trainer's
epoch-end hook) so a change of the machine's load hits both; the load average is recorded beside
every epoch, and the CPU seconds of this process (``time.process_time``: the main process, not
its workers) per epoch of each side: their ratio (``cpu_ratio``, bare CPU / trainer CPU for the
same images) is the loop's own overhead, which the load of a shared machine hardly moves.
Variants of the trainer: ``auto`` (``--workers`` default: on the CPU the workers decode nothing,
they read the cache, augment and normalise while the main process trains), ``0`` (no workers),
``before`` (the loop before issue 18: a new DataLoader per epoch, no workers), ``device`` (the
CUDA path run on the CPU: the main process augments and normalises whole batches). Writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]


def _records(data: str, n: int, work: Path) -> tuple[str, list]:
    """(folder, first ``n`` records) of the NIH folder, or of ``n`` phantoms written to ``work``."""
    from training.data import load_records

    if not (Path(data) / "images").is_dir():
        from training.phantoms import write_phantom_dataset

        data = str(write_phantom_dataset(work / "phantoms", n=n, size=256, seed=0))
    return data, load_records(data)[:n]


def _command_args(folder: str, cache: Path, work: Path, args: argparse.Namespace, workers: str) -> argparse.Namespace:
    """``cxr-train classify`` options of this run, parsed by the command's own parser."""
    from training.cli import build_parser

    argv = ["classify", "--data", folder, "--cache", str(cache), "--size", str(args.size), "--limit", str(args.n),
            "--arch", "cam_classifier", "--arch-kwargs", '{"backbone": "resnet18"}', "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--device", "cpu", "--out", str(work / "cls.cxrbundle")]
    if workers != "auto":
        argv += ["--workers", workers]
    return build_parser().parse_args(argv)


class BareLoop:
    """The bare loop: its own copy of the model and an Adam optimiser over the train images."""

    def __init__(self, model, images_u8, labels, batch_size: int, lr: float) -> None:
        import torch

        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.x, self.y, self.bs = images_u8, labels, batch_size
        self.gen = torch.Generator().manual_seed(0)

    def epoch(self) -> dict:
        """One epoch: its images/s and the load average after it."""
        import torch
        import torch.nn.functional as F

        self.model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(len(self.x), generator=self.gen)
        for s in range(0, len(perm), self.bs):
            idx = perm[s:s + self.bs]
            x = self.x[idx].float() / 255.0 * 2.0 - 1.0
            loss = F.binary_cross_entropy_with_logits(self.model(x)["logits"], self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"images_per_s": len(self.x) / dt, "seconds": dt, "cpu_seconds": cpu, "load": os.getloadavg()[0]}


def _run_variant(variant: str, folder: str, cache: Path, work: Path, args, bare: BareLoop, init: dict) -> dict:
    """Train ``args.epochs`` epochs of one trainer variant, a bare epoch after each."""
    from cxrviewer.core.models import create_model
    from training.commands.common import labelled_datasets, train_config
    from training.data import collate
    from training.trainers.classify import classification_loss, train_classifier
    from training.trainers.loop import Trainer

    workers = {"before": "0", "device": "auto"}.get(variant, variant)
    cargs = _command_args(folder, cache, work / variant, args, workers)
    data = labelled_datasets(cargs)
    model = create_model("cam_classifier", backbone="resnet18")
    model.load_state_dict(init)
    cfg = train_config(cargs, arch=model.arch)
    bare_epochs: list[dict] = []

    def after(epoch: int, rec: dict) -> None:
        rec["load"] = os.getloadavg()[0]
        bare_epochs.append(bare.epoch())

    Trainer.transform_on_cpu = variant == "device"
    if variant == "before":
        trainer = Trainer(model, data.train_ds, classification_loss, cfg, collate_fn=collate, on_epoch_end=after)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
    else:
        _, history = train_classifier(model, data.train_ds, None, cfg, on_epoch_end=after)
    trainer_epochs = [{"images_per_s": r["images_per_s"], "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                       "load": r["load"]} for r in history]
    return {"workers": cfg.num_workers, "n_train": len(data.train_ds), "trainer": trainer_epochs,
            "bare": bare_epochs, **_ratios(trainer_epochs, bare_epochs)}


def _ratios(trainer: list[dict], bare: list[dict]) -> dict:
    """Trainer / bare images/s: the median over the interleaved epoch pairs (robust to a load spike
    in one epoch), and over all epochs together (total images / total seconds of each side)."""
    import statistics

    def rate(eps):
        return sum(e["images_per_s"] * e["seconds"] for e in eps) / sum(e["seconds"] for e in eps)

    pairs = [t["images_per_s"] / b["images_per_s"] for t, b in zip(trainer, bare)]
    cpu = sum(b["cpu_seconds"] for b in bare) / sum(t["cpu_seconds"] for t in trainer)  # same images per epoch
    return {"ratio_median_of_pairs": statistics.median(pairs), "ratio_all_epochs": rate(trainer) / rate(bare),
            "per_epoch_ratios": pairs, "cpu_ratio": cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih"))
    p.add_argument("--n", type=int, default=80, help="records cached (the train split is ~80%%)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6, help="trainer epochs per variant (each followed by a bare one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--variants", default="auto,0,before", help="comma-separated: auto, 0, N, before, device")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cxrviewer.core.models import create_model
    from training.commands.common import labelled_datasets
    from training.data import CachedDataset, build_cache
    from training.data.loader import default_workers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, records = _records(args.data, args.n, work)
        cache = work / "cache.h5"
        t0 = time.perf_counter()
        build_cache(records, cache, args.size)
        build_s = time.perf_counter() - t0
        torch.manual_seed(0)
        init = copy.deepcopy(create_model("cam_classifier", backbone="resnet18").state_dict())
        train_rows = labelled_datasets(_command_args(folder, cache, work / "probe", args, "0")).train_ds.rows
        split = CachedDataset(cache, train_rows)  # the trainer's train images, not augmented
        x = torch.from_numpy(np.stack([split.image_u8(i) for i in range(len(split))]))[:, None]
        y = torch.from_numpy(np.asarray(split.labels, np.float32))
        bare_model = create_model("cam_classifier", backbone="resnet18")
        bare_model.load_state_dict(init)
        bare = BareLoop(bare_model, x, y, args.batch_size, lr=1e-4)
        warm = bare.epoch()  # allocator and kernels warm before the first timed pair
        variants = {v: _run_variant(v, folder, cache, work, args, bare, init) for v in args.variants.split(",")}
    report = {
        "what": "cxr-train classify training-loop images/s vs a bare PyTorch loop, same model/batch/size/cached data",
        "data": folder if Path(args.data).is_dir() else f"phantoms (no {args.data})",
        "n_cached": len(records), "size": args.size, "batch_size": args.batch_size,
        "model": "cam_classifier (ResNet-18), 1 channel", "epochs_per_variant": args.epochs,
        "torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "default_workers": default_workers(),
        "cache_build_s": build_s, "bare_warmup_epoch": warm, "variants": variants,
        "headline": {"variant": "auto", **{k: variants["auto"][k] for k in
                                           ("ratio_median_of_pairs", "ratio_all_epochs", "cpu_ratio", "workers")}}
        if "auto" in variants else None,
        "load_average_end": list(os.getloadavg()), "torch": torch.__version__, "python": platform.python_version(),
        "note": "ratios from epochs interleaved in one process; the machine is shared with other jobs",
    }
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
