"""The one training loop every trainer shares.

- AMP on CUDA (bf16 where supported, else fp16 with a GradScaler), fp32 on CPU;
- channels_last memory format on CUDA;
- gradient clipping; checkpoint at the end of every epoch (atomic), resume;
- deterministic seeds: the shuffle order, augmentation and dropout of epoch
  ``e`` depend only on (seed, e), so a killed run resumed from its checkpoint
  reaches the same weights as an uninterrupted one (on the same device);
- a progress line with loss and images/s on stderr; logs as JSON lines;
- DistributedDataParallel when launched by ``torchrun`` (gloo on CPU, nccl on
  CUDA) with the same command; only rank 0 writes files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from cxrviewer.core.atomic import mkstemp_beside

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
EvalFn = Callable[[torch.nn.Module], dict]


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (stored in the checkpoint and the bundle provenance)."""

    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    lr_step_epochs: int = 0  # divide lr by 10 every N epochs (0 = constant)
    grad_clip: float = 5.0
    seed: int = 0
    num_workers: int = 0
    amp: bool = True
    channels_last: bool = True
    out_dir: str = "runs/run"
    log_every: int = 10
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 otherwise)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


class Progress:
    """A one-line progress bar on stderr (no dependency); quiet when not a TTY except every 10%."""

    def __init__(self, total: int, prefix: str, enabled: bool = True) -> None:
        self.total, self.prefix, self.enabled = max(total, 1), prefix, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, loss: float, images: int) -> None:
        if not self.enabled:
            return
        rate = images / max(time.perf_counter() - self.t0, 1e-9)
        frac = done / self.total
        bar = "#" * int(frac * 20)
        line = f"{self.prefix} [{bar:<20}] {done}/{self.total} loss {loss:.4f} {rate:.1f} img/s"
        if self.tty:
            sys.stderr.write("\r" + line)
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            sys.stderr.write(line + "\n")


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = mkstemp_beside(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Trainer:
    """Runs ``epochs`` of ``loss_fn`` over ``train_ds`` with checkpoints and JSON-lines logs.

    ``loss_fn(model, batch) -> (loss, logs)`` computes the method's loss
    (the trainers differ only here); ``eval_fn(model) -> metrics`` runs after
    every epoch on rank 0. ``collate_fn`` builds batches.
    """

    def __init__(self, model: torch.nn.Module, train_ds: Dataset, loss_fn: LossFn, cfg: TrainConfig,
                 *, eval_fn: EvalFn | None = None, collate_fn=None, params=None,
                 on_epoch_end: Callable[[int, dict], None] | None = None) -> None:
        from cxrviewer.core.device import select_device

        self.cfg = cfg
        self.rank, self.local_rank, self.world = dist_info()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        if self.world > 1 and torch.cuda.is_available() and cfg.device != "cpu":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = select_device(cfg.device).device
        self.is_main = self.rank == 0
        self.out = Path(cfg.out_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.model = model.to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model = self.model
        if self.world > 1:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_ds = train_ds
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.collate_fn = collate_fn
        self.on_epoch_end = on_epoch_end
        params = list(params) if params is not None else [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
        self.amp_dtype = None
        if cfg.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self, epoch: int) -> None:
        if not self.is_main:
            return
        _atomic_torch_save({
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": json.dumps(self.history),
            "config": json.dumps(asdict(self.cfg)),
        }, self.checkpoint_path)

    def try_resume(self) -> bool:
        """Load ``checkpoint.pt`` from the run folder if there is one (safe: weights_only)."""
        if not self.checkpoint_path.is_file():
            return False
        ck = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.history = json.loads(ck["history"])
        self.start_epoch = int(ck["epoch"]) + 1
        log.info("resumed from %s at epoch %d", self.checkpoint_path, self.start_epoch)
        return True

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _lr_for(self, epoch: int) -> float:
        if self.cfg.lr_step_epochs > 0:
            return self.cfg.lr * (0.1 ** (epoch // self.cfg.lr_step_epochs))
        return self.cfg.lr

    # -- the loop ------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_after_epoch: int | None = None) -> list[dict]:
        """Train to ``cfg.epochs``; returns the per-epoch history (metrics included).

        ``stop_after_epoch`` ends the run early after that epoch's checkpoint
        (used to simulate a killed run in tests).
        """
        if resume:
            self.try_resume()
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            for g in self.opt.param_groups:
                g["lr"] = self._lr_for(epoch)
            torch.manual_seed(cfg.seed * 1000 + epoch)
            if hasattr(self.train_ds, "set_epoch"):
                self.train_ds.set_epoch(epoch)
            if self.world > 1:
                sampler = torch.utils.data.distributed.DistributedSampler(
                    self.train_ds, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed)
                sampler.set_epoch(epoch)
                loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                    num_workers=cfg.num_workers, collate_fn=self.collate_fn, drop_last=False)
            else:
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                    num_workers=cfg.num_workers, collate_fn=self.collate_fn, drop_last=False)
            self.train_model.train()
            prog = Progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=self.is_main)
            t0 = time.perf_counter()
            n_img, loss_sum, n_batches = 0, 0.0, 0
            for step, batch in enumerate(loader):
                batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                         for k, v in batch.items()}
                if self.device.type == "cuda" and cfg.channels_last and batch["image"].dim() == 4:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, logs = self.loss_fn(self.train_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}: {loss.item()}")
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                bs = int(batch["image"].shape[0]) * self.world
                n_img += bs
                loss_sum += float(loss.detach())
                n_batches += 1
                prog.update(step + 1, loss_sum / n_batches, n_img)
                if cfg.log_every and step % cfg.log_every == 0:
                    self._log({"kind": "step", "epoch": epoch, "step": step, "loss": float(loss.detach()),
                               **{k: float(v) for k, v in logs.items()}})
            dt = time.perf_counter() - t0
            rec = {"kind": "epoch", "epoch": epoch, "loss": loss_sum / max(n_batches, 1),
                   "seconds": dt, "images_per_s": n_img / max(dt, 1e-9), "lr": self._lr_for(epoch)}
            if self.eval_fn is not None and self.is_main:
                self.model.eval()
                with torch.no_grad():
                    rec["metrics"] = _jsonable(self.eval_fn(self.model))
            self.history.append(rec)
            self._log(rec)
            if self.on_epoch_end is not None and self.is_main:
                self.on_epoch_end(epoch, rec)
            self.save_checkpoint(epoch)
            if self.world > 1:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
        return self.history

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if torch.is_tensor(x):
        return _jsonable(x.tolist())
    return x
