"""The one training loop every trainer shares.

- AMP on CUDA (bf16 where supported, else fp16 with a GradScaler), fp32 on CPU;
- channels_last memory format on CUDA; pinned memory and non-blocking copies on CUDA;
- with a ``device_transform`` (:class:`training.data.loader.DeviceTransform`) one loader with
  persistent workers serves every epoch and the batches do not depend on the number of workers;
  on CUDA the workers serve stored pixels and the GPU augments and normalises each batch, on
  the CPU the workers augment and normalise (the cores the network does not use);
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
from typing import Any
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
    # best checkpoint: the epoch record's value at this dotted path ("metrics.mean_auroc", "val_loss",
    # "loss"; "" = none: the last epoch is kept), better when higher ("max") or lower ("min");
    # further comma-separated paths break ties (:func:`rank_key`)
    monitor: str = ""
    monitor_mode: str = "min"
    early_stop: int = 0  # stop after N epochs without improvement of ``monitor`` (0 = never)
    # the command's resolved options (``cxr-train ... --config``), written to the run folder
    run_config: dict = field(default_factory=dict)


def hyperparameters(cfg: TrainConfig) -> dict:
    """``cfg`` as a dict without the command's options (``run_config``, recorded on their own)."""
    out = asdict(cfg)
    out.pop("run_config", None)
    return out


def use_monitor(cfg: TrainConfig, path: str, mode: str) -> TrainConfig:
    """Set ``cfg``'s best-checkpoint metric (in place) unless the caller chose one; ``cfg``."""
    if not cfg.monitor:
        cfg.monitor, cfg.monitor_mode = path, mode
    return cfg


def selection(history: list[dict], cfg: TrainConfig) -> dict:
    """Which epoch of ``history`` a run's model holds and why: the best by ``cfg.monitor`` (reason
    "best", or "stopped early" when ``cfg.early_stop`` ended the run), else the last ("last")."""
    best, value, best_key = None, None, None
    for rec in history:
        key = rank_key(rec, cfg)
        if key is not None and (best_key is None or key > best_key):
            best, value, best_key = int(rec["epoch"]), monitored(rec, cfg.monitor.split(",")[0]), key
    last = int(history[-1]["epoch"]) if history else None
    stopped = bool(cfg.early_stop > 0 and best is not None and last is not None
                   and last - best >= cfg.early_stop and last + 1 < cfg.epochs)
    reason = "stopped early" if stopped else ("best" if best is not None else "last")
    return {"epoch": best if best is not None else last, "last_epoch": last, "epochs_run": len(history),
            "metric": cfg.monitor or None, "mode": cfg.monitor_mode if cfg.monitor else None, "value": value,
            "reason": reason, "early_stop": cfg.early_stop}


def held_record(history: list[dict], cfg: TrainConfig) -> dict:
    """The epoch record of the weights a run keeps (:func:`selection`), ``{}`` without history."""
    epoch = selection(history, cfg)["epoch"]
    return next((r for r in history if r.get("epoch") == epoch), history[-1] if history else {})


def rank_key(record: dict, cfg: TrainConfig) -> tuple[float, ...] | None:
    """How good an epoch ``record`` is by ``cfg.monitor`` (bigger is better): the value at its first
    path, then ties broken by its further comma-separated paths (e.g. ``metrics.loc_iou_0.3,
    metrics.mean_auroc``; a missing one ranks last); None where the first has no value."""
    sign = 1.0 if cfg.monitor_mode == "max" else -1.0
    values = [monitored(record, p.strip()) for p in cfg.monitor.split(",")]
    if values[0] is None:
        return None
    return tuple(-math.inf if v is None else sign * v for v in values)


def monitored(record: dict, path: str) -> float | None:
    """The finite number at dotted ``path`` of an epoch ``record`` (None where absent or not finite)."""
    value = record
    for part in _split_path(path, record):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _split_path(path: str, record: dict) -> list[str]:
    """``metrics.loc_iou_0.3`` -> ["metrics", "loc_iou_0.3"] (a key may hold dots)."""
    if not path:
        return ["\0"]
    head, _, rest = path.partition(".")
    if not rest or path in record:
        return [path]
    return [head, rest]


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
    every epoch on rank 0. ``collate_fn`` builds batches. ``val_ds``: also log the mean
    ``loss_fn`` over it (eval mode) as ``val_loss`` (e.g. ``cfg.monitor = "val_loss"``).
    ``device_transform``: ``train_ds`` serves ``item(index, epoch)`` and ``raw_item(index, epoch)``
    items; on CUDA (or with :attr:`transform_on_cpu`) the raw ones, which this callable turns into the
    network's input once on the device (augmentation, normalisation).
    """

    #: run the ``device_transform`` on the CPU too (tests; the CPU default is per-item work in workers)
    transform_on_cpu = False

    def __init__(self, model: torch.nn.Module, train_ds: Dataset, loss_fn: LossFn, cfg: TrainConfig,
                 *, eval_fn: EvalFn | None = None, collate_fn=None, params=None,
                 on_epoch_end: Callable[[int, dict], None] | None = None, val_ds: Dataset | None = None,
                 device_transform: Callable[[dict], dict] | None = None) -> None:
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
            if cfg.run_config:
                from ..config_files import write_config

                write_config(self.out, cfg.run_config)
        self.val_ds = val_ds
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self._best_key: tuple | None = None
        self._best_state: dict | None = None
        self.selection: dict = {}
        self._tb = _tensorboard_writer(self.out) if self.is_main else None
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
        self.device_transform = device_transform
        self._loader: DataLoader | None = None  # the persistent loader of the device_transform path
        self._sampler = None
        self._next: tuple[int, Any] | None = None  # (epoch, its batch iterator, already filling)
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
            "config": json.dumps(hyperparameters(self.cfg)),
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
            if self._tb is not None:
                _tensorboard_scalars(self._tb, record)

    # -- best epoch and early stopping -------------------------------------------
    @property
    def best_path(self) -> Path:
        """``best.pt`` of the run folder: the best epoch's weights (``epoch``, ``value``, ``model``)."""
        return self.out / "best.pt"

    def _take_if_better(self, rec: dict) -> bool:
        """Make ``rec``'s epoch the best one if it ranks above it (:func:`rank_key`); whether it did."""
        key = rank_key(rec, self.cfg)
        if key is None or (self._best_key is not None and key <= self._best_key):
            return False
        self._best_key, self.best_epoch = key, int(rec["epoch"])
        self.best_value = monitored(rec, self.cfg.monitor.split(",")[0])
        return True

    def _update_best(self, epoch: int, rec: dict) -> None:
        """Keep ``epoch``'s weights (in memory and ``best.pt``) when its monitored value is the best."""
        if not self._take_if_better(rec):
            return
        value = self.best_value
        if self.is_main:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            _atomic_torch_save({"epoch": epoch, "value": value, "model": self._best_state}, self.best_path)

    def _restore_best(self) -> None:
        """The best epoch of a resumed run's history (and its weights from ``best.pt``)."""
        for rec in self.history:
            self._take_if_better(rec)
        if self.best_epoch is None or not self.is_main or not self.best_path.is_file():
            return
        ck = torch.load(self.best_path, map_location="cpu", weights_only=True)
        if int(ck["epoch"]) == self.best_epoch:
            self._best_state = ck["model"]

    def _should_stop(self, epoch: int) -> bool:
        """Early stopping: ``cfg.early_stop`` epochs after the best one without improvement."""
        stop = bool(self.cfg.early_stop > 0 and self.best_epoch is not None
                    and epoch - self.best_epoch >= self.cfg.early_stop)
        if self.world > 1:  # the metrics live on rank 0
            flag = torch.tensor([int(stop)], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    def _finish(self) -> None:
        """Load the best epoch's weights into the model and fill :attr:`selection`."""
        self.selection = selection(self.history, self.cfg)
        held, last = self.selection["epoch"], self.selection["last_epoch"]
        if held is not None and held != last and self.is_main:
            if self._best_state is None:  # best.pt lost: keep the last epoch, and say so
                log.warning("best epoch %s's weights are missing (%s): keeping the last epoch", held, self.best_path)
                self.selection.update(epoch=last, value=None, reason="last")
            else:
                self.model.load_state_dict(self._best_state)
        if self.selection["reason"] == "stopped early":
            log.info("early stop after epoch %s: %s has not improved for %d epochs (best %s at epoch %s)",
                     last, self.cfg.monitor, self.cfg.early_stop, self.best_value, self.best_epoch)
        self._log({"kind": "selection", **self.selection})
        if self._tb is not None:
            self._tb.flush()

    @torch.no_grad()
    def _val_loss(self) -> float | None:
        """Mean ``loss_fn`` over ``val_ds`` in eval mode (None when empty)."""
        loader = DataLoader(self.val_ds, batch_size=self.cfg.batch_size, shuffle=False,
                            num_workers=self.cfg.num_workers, collate_fn=self.collate_fn)
        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        for batch in loader:
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, _ = self.loss_fn(self.model, batch)
            total += float(loss) * int(batch["image"].shape[0])
            n += int(batch["image"].shape[0])
        self.model.train(was)
        return total / n if n else None

    def _clip_gradients(self) -> None:
        """``clip_grad_norm_(params, cfg.grad_clip)``, bit for bit; on the CPU the gradients are only
        rescaled when their norm is above the limit (the stock call multiplies every gradient by
        1.0 otherwise: a pass over all of them for nothing). On CUDA the stock call (no sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.device.type == "cuda":
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            return
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if not bool(total <= self.cfg.grad_clip):  # NaN rescales too, as the stock call does
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, total)

    def _train_loader(self, epoch: int) -> DataLoader:
        """The DataLoader of epoch ``epoch``: with a ``device_transform`` one loader kept for the
        whole run (persistent workers, :class:`EpochSampler` keys), else a new one per epoch."""
        cfg = self.cfg
        pin = self.device.type == "cuda"
        if self.device_transform is not None:
            if self._loader is None:
                from ..data.loader import EpochItems, EpochSampler

                self._sampler = EpochSampler(len(self.train_ds), cfg.seed, rank=self.rank, world=self.world)
                items = EpochItems(self.train_ds, raw=self._raw_batches)
                self._loader = DataLoader(items, batch_size=cfg.batch_size, sampler=self._sampler,
                                          num_workers=cfg.num_workers, collate_fn=self.collate_fn, pin_memory=pin,
                                          persistent_workers=cfg.num_workers > 0,
                                          generator=torch.Generator().manual_seed(cfg.seed))
            if self._next is not None and self._next[0] == epoch:
                it, self._next = self._next[1], None
                return it
            self._sampler.set_epoch(epoch)
            return self._loader
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_ds, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
            return DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler, pin_memory=pin,
                              num_workers=cfg.num_workers, collate_fn=self.collate_fn, drop_last=False)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        return DataLoader(self.train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen, pin_memory=pin,
                          num_workers=cfg.num_workers, collate_fn=self.collate_fn, drop_last=False)

    def _start_next_epoch(self, epoch: int) -> None:
        """Let the persistent workers start on epoch ``epoch``'s first batches now, while this
        epoch is evaluated and checkpointed (its items depend only on the sampler's epoch key, so
        the batches are the ones that epoch would load anyway)."""
        if self._loader is None or epoch >= self.cfg.epochs or self.cfg.num_workers == 0:
            return
        self._sampler.set_epoch(epoch)
        self._next = (epoch, iter(self._loader))

    @property
    def _raw_batches(self) -> bool:
        """Whether the batches are raw items for the ``device_transform`` (CUDA), else finished items."""
        return self.device_transform is not None and (self.device.type == "cuda" or self.transform_on_cpu)

    def _to_device(self, batch: dict) -> dict:
        """A loader batch on the device (non-blocking from pinned memory), through the
        ``device_transform``, its image ``channels_last`` on CUDA."""
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if self.device_transform is not None and self._raw_batches:
            batch = self.device_transform(batch)
        if self.device.type == "cuda" and self.cfg.channels_last and batch["image"].dim() == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def _lr_for(self, epoch: int) -> float:
        if self.cfg.lr_step_epochs > 0:
            return self.cfg.lr * (0.1 ** (epoch // self.cfg.lr_step_epochs))
        return self.cfg.lr

    # -- the loop ------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_after_epoch: int | None = None) -> list[dict]:
        """Train to ``cfg.epochs``; returns the per-epoch history (metrics included).

        After every epoch the value of ``cfg.monitor`` decides the best epoch, whose weights the
        model holds at the end (``best.pt`` in the run folder; ``checkpoint.pt`` stays the last
        epoch, for resuming); ``cfg.early_stop`` ends the run after that many epochs without
        improvement. :attr:`selection` says which epoch the model holds and why.
        ``stop_after_epoch`` ends the run early after that epoch's checkpoint
        (used to simulate a killed run in tests).
        """
        if resume:
            self.try_resume()
        self._restore_best()
        cfg = self.cfg
        stopped = self._should_stop(self.start_epoch - 1) if self.history else False
        epoch = self.start_epoch
        while not stopped and epoch < cfg.epochs:
            rec = self._train_epoch(epoch)
            self.history.append(rec)
            self._log(rec)
            if self.on_epoch_end is not None and self.is_main:
                self.on_epoch_end(epoch, rec)
            self._update_best(epoch, rec)
            self.save_checkpoint(epoch)
            stopped = self._should_stop(epoch)
            if self.world > 1:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            epoch += 1
        self._loader = self._sampler = self._next = None  # ends the persistent workers
        self._finish()
        return self.history

    def _train_epoch(self, epoch: int) -> dict:
        """One epoch of training (and ``eval_fn`` / validation loss on rank 0): its log record."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = self._lr_for(epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        loader = self._train_loader(epoch)
        self.train_model.train()
        prog = Progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=self.is_main)
        t0, c0 = time.perf_counter(), time.process_time()
        n_img, loss_sum, n_batches = 0, 0.0, 0
        for step, batch in enumerate(loader):
            batch = self._to_device(batch)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, logs = self.loss_fn(self.train_model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}: {loss.item()}")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                self._clip_gradients()
            self.scaler.step(self.opt)
            self.scaler.update()
            bs = int(batch["image"].shape[0]) * self.world
            n_img += bs
            loss_sum += float(loss.detach())
            n_batches += 1
            prog.update(step + 1, loss_sum / n_batches, n_img)
            if cfg.log_every and step % cfg.log_every == 0:
                el = time.perf_counter() - t0
                per_step = el / (step + 1)
                self._log({"kind": "step", "epoch": epoch, "epochs": cfg.epochs, "step": step,
                           "steps": len(loader), "loss": float(loss.detach()),
                           "images_per_s": n_img / max(el, 1e-9),
                           "eta_s": per_step * ((len(loader) - step - 1) + len(loader) * (cfg.epochs - epoch - 1)),
                           **{k: float(v) for k, v in logs.items()}})
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        self._start_next_epoch(epoch + 1)
        rec = {"kind": "epoch", "epoch": epoch, "epochs": cfg.epochs, "steps": n_batches,
               "loss": loss_sum / max(n_batches, 1), "seconds": dt,
               "cpu_seconds": cpu, "images_per_s": n_img / max(dt, 1e-9), "lr": self._lr_for(epoch)}
        if self.eval_fn is not None and self.is_main:
            self.model.eval()
            with torch.no_grad():
                rec["metrics"] = _jsonable(self.eval_fn(self.model))
        if self.val_ds is not None and self.is_main:
            rec["val_loss"] = self._val_loss()
        # time left if the run goes to cfg.epochs (early stopping may end it sooner)
        rec["eta_s"] = (time.perf_counter() - t0) * (cfg.epochs - epoch - 1)
        return rec

    def close(self) -> None:
        self._loader = self._sampler = self._next = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _tensorboard_writer(folder: Path):
    """A TensorBoard ``SummaryWriter`` on ``folder/tensorboard`` when the package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


def _tensorboard_scalars(writer, record: dict) -> None:
    """An epoch log record's numbers as TensorBoard scalars (``epoch/loss``, ``epoch/val_loss``,
    ``epoch/metrics/mean_auroc``, ``epoch/metrics/auroc/Effusion``...)."""
    if record.get("kind") != "epoch":
        return

    def scalars(prefix: str, d: dict):
        """(tag, number) of the finite numbers of ``d``, nested dicts as tag folders."""
        for k, v in d.items():
            if isinstance(v, dict):
                yield from scalars(f"{prefix}{k}/", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                yield f"{prefix}{k}", v

    for tag, v in scalars("epoch/", {k: v for k, v in record.items() if k not in ("kind", "epoch")}):
        writer.add_scalar(tag, v, int(record["epoch"]))


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
