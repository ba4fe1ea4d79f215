"""Benchmark: what the CPU's fast paths change in what the user sees, and what they save.

    .venv/bin/python benchmarks/cpu_precision.py [--studies 10] [--models DIR] [--threads N]

Runs the app's pipeline (``cxrviewer.core.pipeline.Pipeline``, every model of ``--models``,
default the shipped trained bundles of resources/models) on the first ``--studies`` NIH images of
../shared/data/nih (phantoms when absent) three ways, each study in turn:

* ``reference``: float32 with the weights in the contiguous (NCHW) layout, the pipeline before
  channels-last;
* ``channels_last``: float32 as the pipeline now places the models (the default);
* ``bf16``: bfloat16 autocast on the CPU (``cxrviewer analyze --cpu-bf16``; native on CPUs with
  AMX or AVX-512 BF16, :func:`cxrviewer.core.device.cpu_has_fast_bf16` is recorded).

Against the reference it reports the largest probability difference, the largest and median map
difference relative to each map's range, and for every box method the IoU of each class's best
box with the reference's (median, 10th percentile, the share of classes whose box is the same
within IoU 0.9); and the median seconds per study of each variant (the order of the three rotates
from study to study). Writes
``benchmarks/results/cpu_precision.json``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import write_report
from analyze_throughput import _studies
from gpu_check import agreement

ROOT = Path(__file__).resolve().parents[1]


def _best_boxes(res: Any) -> dict[tuple[str, str], Any]:
    """(method, class) -> the class's highest-scoring box."""
    best: dict[tuple[str, str], Any] = {}
    for method, boxes in res.boxes.items():
        for b in boxes:
            key = (method, b.label)
            if key not in best or (b.score or 0.0) > (best[key].score or 0.0):
                best[key] = b
    return best


def _box_agreement(ref: Any, other: Any) -> dict[str, list[float]]:
    """Per box method, the IoU of each class's best box with the reference's (0 when one is missing)."""
    from cxrviewer.core.explain.metrics import iou

    a, b = _best_boxes(ref), _best_boxes(other)
    out: dict[str, list[float]] = {}
    for key in sorted(set(a) | set(b)):
        out.setdefault(key[0], []).append(iou(a[key], b[key]) if key in a and key in b else 0.0)
    return out


def _summary(ious: list[float]) -> dict[str, float]:
    s = sorted(ious)
    return {"n": len(s), "median_iou": round(statistics.median(s), 4), "p10_iou": round(s[len(s) // 10], 4),
            "share_iou_over_0.9": round(sum(v > 0.9 for v in s) / len(s), 4)}


def measure(models: Path, studies: list[Path]) -> dict[str, Any]:
    import torch

    from cxrviewer.core.bundle import find_bundles, load_bundle
    from cxrviewer.core.device import DeviceInfo, cpu_device, cpu_has_fast_bf16
    from cxrviewer.core.io import load_study
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.roles import assign_roles

    def pipeline(dev: DeviceInfo, layout: Any) -> Pipeline:
        pl = Pipeline(assign_roles([load_bundle(p) for p in find_bundles(models)]), dev)
        for b in pl.bundles.values():
            b.model.to(memory_format=layout)
        return pl

    fp32 = cpu_device(cpu_bf16=False)
    variants = {"reference": pipeline(fp32, torch.contiguous_format),
                "channels_last": pipeline(fp32, torch.channels_last),
                "bf16": pipeline(DeviceInfo(torch.device("cpu"), torch.bfloat16, "cpu bf16"), torch.channels_last)}
    first = load_study(studies[0])
    for pl in variants.values():
        pl.run(first)  # warm-up: oneDNN kernels, allocator
    secs: dict[str, list[float]] = {k: [] for k in variants}
    maps: dict[str, list[dict]] = {k: [] for k in variants if k != "reference"}
    boxes: dict[str, dict[str, list[float]]] = {k: {} for k in maps}
    names = list(variants)
    for i, path in enumerate(studies):
        study = load_study(path)
        out = {}
        for name in names[i % 3:] + names[:i % 3]:  # each variant goes first as often as the others
            t = time.perf_counter()
            out[name] = variants[name].run(study)
            secs[name].append(time.perf_counter() - t)
        for name in maps:
            maps[name].append(agreement(out["reference"], out[name]))
            for method, ious in _box_agreement(out["reference"], out[name]).items():
                boxes[name].setdefault(method, []).extend(ious)
    return {
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "median_s_per_study": {k: round(statistics.median(v), 3) for k, v in secs.items()},
        "speedup_over_reference": {k: round(statistics.median(secs["reference"]) / statistics.median(v), 3)
                                   for k, v in secs.items()},
        "vs_reference": {name: {
            "max_prob_diff": max(r["max_prob_diff"] for r in rows),
            "max_map_diff_rel": max(r["max_map_diff_rel"] for r in rows),
            "median_map_diff_rel": round(statistics.median(r["median_map_diff_rel"] for r in rows), 6),
            "worst_map": max(rows, key=lambda r: r["max_map_diff_rel"])["worst_map"],
            "best_box_per_class": {m: _summary(v) for m, v in sorted(boxes[name].items())},
        } for name, rows in maps.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--models", default=str(ROOT / "resources" / "models"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_precision.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cxr-precision-") as tmp:
        studies = _studies(Path(tmp), args.studies)
        result = measure(Path(args.models), studies)
    report = {
        "benchmark": "cpu_precision", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": os.path.relpath(args.models, ROOT) if Path(args.models).is_relative_to(ROOT) else args.models,
        "studies": len(studies), "source": "nih" if "nih" in str(studies[0]) else "phantoms",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "cpu": platform.processor() or None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **result,
    }
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
