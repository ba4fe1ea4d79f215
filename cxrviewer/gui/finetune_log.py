"""The trainer's structured progress, as the fine-tune panel reads it (no Qt, no torch).

``cxr-train`` training commands write JSON lines to ``OUT.run/log.jsonl``
(:class:`training.trainers.loop.Trainer`): ``{"kind": "step", "epoch", "step", "loss", ...}`` every
few steps, ``{"kind": "epoch", "epoch", "loss", "seconds", "images_per_s", "lr", "metrics": {...},
"val_loss"}`` after every epoch and ``{"kind": "selection", "epoch", "reason", ...}`` at the end.
Epochs count from 0. Optional fields a trainer may add are used when present: ``epochs`` (the
run's total), ``steps`` (steps per epoch) and ``eta_s`` (seconds left).

:class:`RunLog` tails the file; :class:`RunProgress` turns its records into the fraction done and
the time left; :func:`run_dir_of` and :func:`total_epochs` find the run folder and the number of
epochs from the command line (and the run's resolved ``config.yaml``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"


def option(args: Sequence[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` / ``name=VALUE`` of a command line, or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def run_dir_of(args: Sequence[str]) -> Path | None:
    """The run folder of a ``cxr-train`` training command line: ``--run-dir``, else ``--out`` + ``.run``."""
    run = option(args, "--run-dir")
    if run:
        return Path(run)
    out = option(args, "--out")
    return Path(str(out).rstrip("/\\") + ".run") if out else None


def total_epochs(args: Sequence[str], run_dir: Path | None = None) -> int | None:
    """The run's number of epochs: ``--epochs`` of the command line, else ``epochs`` of the resolved
    config the trainer writes to the run folder (``config.yaml`` / ``config.json``), else None."""
    text = option(args, "--epochs")
    if text and text.isdigit():
        return int(text)
    for name in ("config.yaml", "config.json") if run_dir else ():
        path = run_dir / name  # type: ignore[operator]
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError:
            continue
        try:
            if name.endswith(".json"):
                data = json.loads(raw)
            else:
                import yaml

                data = yaml.safe_load(raw)
        except Exception:  # noqa: BLE001 - a half-written file or no PyYAML: none yet
            continue
        if isinstance(data, dict) and isinstance(data.get("epochs"), int):
            return int(data["epochs"])
    return None


class RunLog:
    """Tails a JSON-lines log: :meth:`poll` returns the records appended since the last call
    (complete lines only; a line that is not a JSON object is skipped)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._pos = 0
        self._buf = b""

    def poll(self) -> list[dict[str, Any]]:
        """New records (none while the file does not exist)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return []
        self._pos += len(data)
        *lines, self._buf = (self._buf + data).split(b"\n")
        out = []
        for line in lines:
            try:
                rec = json.loads(line.decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class RunProgress:
    """Fraction done and time left of one run from its log records.

    Time left: the record's ``eta_s`` when the trainer gives one; else the mean wall time of the
    epochs seen so far (the first one timed from :attr:`t0`, the start of the process) times the
    epochs left, less the time since the last epoch ended. None until an epoch has ended.
    """

    def __init__(self, epochs: int | None, t0: float) -> None:
        self.epochs = epochs
        self.t0 = t0
        self.done = 0  # epochs completed
        self.epoch_times: list[float] = []
        self.last: dict[str, Any] = {}
        self._eta: tuple[float, float] | None = None  # (eta_s, when)
        self._in_epoch = 0.0

    def add(self, rec: dict[str, Any], now: float, *, timed: bool = True) -> None:
        """Take one log record seen at ``now`` (``timed=False``: written before this process started,
        e.g. the epochs a resumed run already has; they count as done but do not time an epoch)."""
        if isinstance(rec.get("epochs"), int) and rec["epochs"] > 0:
            self.epochs = int(rec["epochs"])
        eta = number(rec.get("eta_s"))
        if eta is not None:
            self._eta = (eta, now)
        kind = rec.get("kind")
        if kind == "epoch" and isinstance(rec.get("epoch"), int):
            self.done = int(rec["epoch"]) + 1
            if timed:
                self.epoch_times.append(now)
            self._in_epoch = 0.0
        elif kind == "step" and isinstance(rec.get("step"), int) and number(rec.get("steps")):
            self._in_epoch = min(1.0, (rec["step"] + 1) / float(rec["steps"]))
        if kind in ("step", "epoch"):
            self.last = rec

    @property
    def fraction(self) -> float | None:
        """Share of the epochs done (None while the number of epochs is unknown)."""
        if not self.epochs:
            return None
        return max(0.0, min(1.0, (self.done + self._in_epoch) / self.epochs))

    def seconds_left(self, now: float) -> float | None:
        """Estimated seconds until the last epoch ends (see the class docstring)."""
        if self._eta is not None:
            return max(0.0, self._eta[0] - (now - self._eta[1]))
        if not self.epochs or not self.epoch_times:
            return None
        times = self.epoch_times
        per = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0] - self.t0
        return max(0.0, per * (self.epochs - self.done) - (now - times[-1]))


def format_duration(seconds: float | None) -> str:
    """``1 h 02 min``, ``4 min 05 s``, ``12 s``; "estimating…" for None."""
    if seconds is None:
        return "estimating…"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
