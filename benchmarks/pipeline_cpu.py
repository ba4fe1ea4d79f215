"""Benchmark: the full pipeline on the CPU at 512 px with default-size random-weight bundles.

    .venv/bin/python benchmarks/pipeline_cpu.py [--runs 5] [--size 512] [--threads N] [--study PATH] [--cpu-bf16]

Builds (in a temporary folder) untrained bundles of the default architectures:
alignment (ResNet-18), U-Net (width 32, depth 4), ResNet-50-MSA classifier,
ResNet-50 DM classifier and ResNet-50 CIA-Net with a synthetic normal bank of
16; runs the pipeline ``--runs`` times on one study (RG1_UNCR.dcm from
pydicom-data by default, 1955 x 1841) after one warm-up run, and writes the
median total, median per stage and each stage's share of the total to
``benchmarks/results/pipeline_cpu.json``. Random weights time the same as
trained ones.
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

from _report import write_report

ROLES = {
    "alignment": ("alignment", {"backbone": "resnet18"}),
    "segmentation": ("unet", {"width": 32, "depth": 4}),
    "classifier": ("msa", {"backbone": "resnet50"}),
    "dm": ("dm", {"backbone": "resnet50"}),
    "cia": ("cia", {"backbone": "resnet50"}),
}
#: roles whose realistic network is trained at a smaller input than ``--size``: a lung/heart U-Net
#: needs little detail and runs at the scale it was trained at (Dice by input size on JSRT in
#: README "Speed and storage"), so a realistic one is trained and run at 256 px
ROLE_INPUT_SIZE = {"segmentation": 256}


def role_input_size(role: str, size: int) -> int:
    """The input size of the realistic ``role`` bundle when the benchmark runs at ``size``."""
    return min(size, ROLE_INPUT_SIZE.get(role, size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", type=int, default=512, help="network input size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--study", default=None, help="image to analyse (default RG1_UNCR.dcm)")
    p.add_argument("--roles", nargs="+", default=list(ROLES), choices=list(ROLES))
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on the CPU (used only where the CPU computes bf16 natively: AMX or AVX-512 BF16)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pipeline_cpu[_bf16].json)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import select_device
    from cxrviewer.core.io import load_study
    from cxrviewer.core.pipeline import Pipeline
    from training.commands.init_bundle import init_bundle

    if args.study:
        study_path = args.study
    else:
        from pydicom.data import get_testdata_file

        study_path = get_testdata_file("RG1_UNCR.dcm")
    study = load_study(study_path)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bundles = {}
        for role in args.roles:
            arch, kw = ROLES[role]
            path = init_bundle(arch, Path(tmp) / role, kwargs=kw, input_size=role_input_size(role, args.size),
                               bank_size=16)
            bundles[role] = load_bundle(path)
        setup_s = time.perf_counter() - t0
        pl = Pipeline(bundles, select_device("cpu", cpu_bf16=args.cpu_bf16))
        pl.run(study)  # warm-up (allocator, oneDNN kernels)
        runs = []
        for _ in range(args.runs):
            t = time.perf_counter()
            res = pl.run(study)
            runs.append((time.perf_counter() - t, dict(res.timings)))
    totals = [r[0] for r in runs]
    med_total = statistics.median(totals)
    stages = list(runs[0][1])
    med_stage = {s: statistics.median(r[1].get(s, 0.0) for r in runs) for s in stages}
    report = {
        "benchmark": "pipeline_cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "study": os.path.basename(str(study_path)),
        "image_shape": list(study.shape),
        "input_size": args.size,
        "roles": {r: {"architecture": ROLES[r][0], "input_size": role_input_size(r, args.size), **ROLES[r][1]}
                  for r in args.roles},
        "runs": args.runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": res.device,
        "machine": platform.machine(),
        "bundle_setup_s": round(setup_s, 3),
        "median_total_s": round(med_total, 3),
        "min_total_s": round(min(totals), 3),
        "max_total_s": round(max(totals), 3),
        "median_stage_s": {s: round(v, 4) for s, v in med_stage.items()},
        "stage_share": {s: round(v / max(sum(med_stage.values()), 1e-9), 4) for s, v in med_stage.items()},
    }
    name = "pipeline_cpu_bf16.json" if args.cpu_bf16 else "pipeline_cpu.json"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / name
    write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
