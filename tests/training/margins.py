"""Measure the numbers the learning tests assert, over seeds and torch thread counts.

    .venv/bin/python -m tests.training.margins [CHECK ...] [--seeds 0,1,2] [--threads 1,2]

Every learning test in ``tests/training`` runs its training through a ``*_run``/``*_metrics``
function that takes a seed (initial weights, shuffle order, augmentation) and a ``*_slack``
function that says how far each asserted number is from its threshold (> 0: the test passes).
The test itself runs seed 0 on ``TORCH_THREADS`` (tests/conftest.py) threads; this script runs
the same functions on other seeds and thread counts (a different machine's float rounding)
and prints one JSON line per run and the smallest slack of every assertion, so a threshold
can be checked to have real room. Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _phantoms(data: dict, key: str, make: Callable[[Path], Path], work: Path) -> Path:
    """One phantom set per check, written once for all seeds and thread counts."""
    if key not in data:
        data[key] = make(work.parent / f"{key}_data")
    return data[key]


def _classify(seed: int, work: Path, data: dict):
    from tests.training import test_classify as t

    folder = _phantoms(data, "classify", t.make_phantoms, work)
    m = t.learning_run(folder, work, seed)
    return m, t.learning_slack(m)


def _cia(seed: int, work: Path, data: dict):
    from tests.training import test_cia as t

    folder = _phantoms(data, "cia", t.make_phantoms, work)
    m = t.learning_run(folder, work, seed)
    return m, t.learning_slack(m)


def _mine(seed: int, work: Path, data: dict):
    from tests.training import test_mine as t

    folder = _phantoms(data, "mine", t.make_phantoms, work)
    m = t.learning_run(t.pretrain(folder, work / "pre", seed), work, seed)
    return m, t.learning_slack(m)


def _kp_loss(seed: int, work: Path, data: dict):
    from tests.training import test_mine as t

    m = t.kp_loss_metrics(seed)
    return m, t.kp_loss_slack(m)


def _disease_masks(seed: int, work: Path, data: dict):
    from tests.training import test_disease_masks as t

    folder = _phantoms(data, "dm", t.make_phantoms, work)
    # the heart test averages len(HEART_SEEDS) classifiers: seed s measures seeds 3s, 3s+1, 3s+2
    seeds = [len(t.HEART_SEEDS) * seed + i for i in range(len(t.HEART_SEEDS))]
    first = t.train_base(folder, work / "base", seeds[0])
    m = t.heart_masks(folder, work, seeds, first=first)
    m.update(t.dm_retraining_metrics(first[0], first[1], first[2], work, seed))
    return m, t.learning_slack(m)


def _align(seed: int, work: Path, data: dict):
    from tests.training import test_align as t

    m = t.learning_run(work, seed)
    return m, t.learning_slack(m)


def _register(seed: int, work: Path, data: dict):
    from tests.training import test_align as t

    m = t.register_metrics()  # no randomness: varies with the thread count only
    return m, t.register_slack(m)


def _canonical(seed: int, work: Path, data: dict):
    from tests.training import test_align as t

    m = t.canonical_metrics(3 + seed)  # the test uses 3
    return m, t.canonical_slack(m)


def _segment(seed: int, work: Path, data: dict):
    from tests.training import test_segment as t

    m = t.learning_run(work, seed)
    return m, t.learning_slack(m)


CHECKS: dict[str, Callable] = {
    "classify": _classify, "cia": _cia, "mine": _mine, "kp_loss": _kp_loss, "disease_masks": _disease_masks,
    "align": _align, "register": _register, "canonical": _canonical, "segment": _segment,
}


def _numbers(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, (bool, np.bool_)):
            continue
        if isinstance(v, (int, float, np.floating, np.integer)):
            out[k] = round(float(v), 4)
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float, np.floating)) for x in v.values()):
            out[k] = {kk: round(float(x), 4) for kk, x in v.items()}
        elif isinstance(v, list) and v and all(isinstance(x, (int, float, np.floating)) for x in v):
            out[k] = [round(float(x), 4) for x in v]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checks", nargs="*", help=f"some of {', '.join(CHECKS)} (default: all)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the tests use 0)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (the tests use 1)")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    args.checks = args.checks or list(CHECKS)
    if set(args.checks) - set(CHECKS):
        ap.error(f"unknown checks {sorted(set(args.checks) - set(CHECKS))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(s) for s in args.threads.split(",")]
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    worst: dict[tuple[str, str], tuple[float, str]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-margins-") as tmp:
        data: dict = {}
        for name in args.checks:
            for th in threads:
                for seed in seeds:
                    torch.set_num_threads(th)
                    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as tests/conftest.py
                    work = Path(tmp) / f"{name}-t{th}-s{seed}"
                    work.mkdir(parents=True)
                    t0 = time.perf_counter()
                    m, slack = CHECKS[name](seed, work, data)
                    rec = {"check": name, "threads": th, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                           "slack": {k: round(float(v), 4) for k, v in slack.items()}, "values": _numbers(m)}
                    line = json.dumps(rec)
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a", encoding="utf-8") as f:
                            f.write(line + "\n")
                    for k, v in slack.items():
                        if (name, k) not in worst or v < worst[name, k][0]:
                            worst[name, k] = (float(v), f"t{th} s{seed}")
    print("\nsmallest slack per assertion (> 0: passes):", file=sys.stderr)
    for (name, k), (v, where) in worst.items():
        print(f"  {name:14s} {k:40s} {v:+.4f}  ({where}){'  FAILS' if v <= 0 else ''}", file=sys.stderr)
    return 0 if all(v > 0 for v, _ in worst.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
