"""Benchmark: ``cxrviewer analyze`` studies/s, bytes per study and peak RSS, beside the floor.

    .venv/bin/python benchmarks/analyze_throughput.py [--studies 8] [--size 512] [--threads N]
                                                      [--sets bundled realistic realistic_bf16]

For each model set, in a fresh process (so peak RSS is that set's own):

* ``bundled``: the bundles shipped in resources/models;
* ``realistic``: random-weight bundles of the realistic-size architectures (the ROLES of
  benchmarks/pipeline_cpu.py: ResNet-18 alignment, U-Net 32/4, ResNet-50-MSA, ResNet-50 DM,
  ResNet-50 CIA-Net) at ``--size`` px,

(a set named ``*_bf16`` is that set run with ``analyze --cpu-bf16``: bf16 autocast where the CPU
computes bf16 natively; the report's ``device`` says whether it did), it runs ``cxrviewer analyze``
(the command users run, in-process, folder defaults) over
``--studies`` 1024 px images (the first ones of ../shared/data/nih when present, else phantoms)
and reports: wall time, the model-loading time, seconds per study after loading (the wall time less
one model loading, over the studies), seconds per study in the steady state (between the first and
the last study's summary.json: what an archive of many studies costs each), bytes written per
study (results.h5, summary.json and any panels) and the process's peak RSS; beside it the floor,
one plain forward of the same classifier at its input size (median of 5, no grad, float32, BN folded
and in the channels-last layout, as the pipeline runs it), and the
per-study time as a multiple of it. Writes ``benchmarks/results/analyze_throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_cpu import ROLES, role_input_size  # noqa: E402


def _studies(folder: Path, n: int) -> list[Path]:
    nih = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared")) / "data" / "nih" / "images"
    if nih.is_dir():
        found = sorted(p for p in nih.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
        if len(found) == n:
            return found
    from training.phantoms import write_phantom_dataset

    write_phantom_dataset(folder / "phantoms", n, size=1024, seed=0)
    return sorted((folder / "phantoms" / "images").glob("*.png"))


def _models(kind: str, folder: Path, size: int) -> Path:
    if kind == "bundled":
        return ROOT / "resources" / "models"
    from training.commands.init_bundle import init_bundle

    out = folder / "models"
    out.mkdir(parents=True, exist_ok=True)
    for i, (role, (arch, kw)) in enumerate(ROLES.items()):
        init_bundle(arch, out / f"{role}.cxrbundle", kwargs=kw, input_size=role_input_size(role, size), bank_size=16, seed=i,
                    canonical=False)
    return out


def _floor_ms(models: Path) -> tuple[float, int]:
    """Median ms of one plain no-grad forward of the set's classifier at its input size."""
    import torch

    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.roles import assign_roles

    lb = assign_roles([load_bundle(b) for b in sorted(models.glob("*.cxrbundle"))]).get("classifier")
    if lb is not None:
        h, w = lb.manifest.input_size
        x = torch.rand(1, int(lb.manifest.arch_kwargs.get("in_channels", 1)), h, w)
        from cxrviewer.core.models.fold import fold_batchnorm

        fold_batchnorm(lb.model)  # as Pipeline places it: BN folded, channels-last
        lb.model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            lb.model(x)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                lb.model(x)
                times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times), h
    raise SystemExit(f"no classifier bundle in {models}")


def child(kind: str, n: int, size: int) -> dict[str, Any]:
    """One model set in this process: analyze timings, bytes, peak RSS, the forward floor."""
    bf16 = kind.endswith("_bf16")
    kind = kind.removesuffix("_bf16")
    from cxrviewer.__main__ import main as cxrviewer_main
    from cxrviewer.core.bundle import load_bundle

    with tempfile.TemporaryDirectory(prefix="cxr-throughput-") as tmp:
        work = Path(tmp)
        studies = _studies(work, n)
        models = _models(kind, work, size)
        t = time.perf_counter()
        for b in sorted(models.glob("*.cxrbundle")):
            load_bundle(b)
        load_s = time.perf_counter() - t
        lst = work / "list.txt"
        lst.write_text("\n".join(map(str, studies)) + "\n", encoding="utf-8")
        out = work / "out"
        t = time.perf_counter()
        rc = cxrviewer_main(["analyze", "--list", str(lst), "--models", str(models), "--out", str(out),
                             "--device", "cpu", "--quiet", *(["--cpu-bf16"] if bf16 else [])])
        wall = time.perf_counter() - t
        files = [f for f in out.rglob("*") if f.is_file() and f.parent != out]
        summaries = sorted(out.rglob("summary.json"), key=lambda f: f.stat().st_mtime)
        summary = summaries[0] if summaries else None
        # steady state: from the first study's summary to the last's (no model loading, no start-up)
        steady = ((summaries[-1].stat().st_mtime - summaries[0].stat().st_mtime) / (len(summaries) - 1)
                  if len(summaries) > 1 else None)
        device = json.loads(summary.read_text())["device"] if summary else None
        per_kind: dict[str, int] = {}
        for f in files:
            per_kind[f.name] = per_kind.get(f.name, 0) + f.stat().st_size
        floor_ms, in_size = _floor_ms(models)
    per_study = (wall - load_s) / n
    return {
        "exit": rc, "device": device, "studies": n, "source": "nih" if "nih" in str(studies[0]) else "phantoms",
        "classifier_input": in_size, "wall_s": round(wall, 2), "model_load_s": round(load_s, 2),
        "s_per_study_after_load": round(per_study, 3),
        "s_per_study_steady": round(steady, 3) if steady is not None else None,
        "studies_per_s": round(1 / max(per_study, 1e-9), 3),
        "bytes_per_study": int(sum(per_kind.values()) / n),
        "bytes_per_study_by_file": {k: int(v / n) for k, v in sorted(per_kind.items())},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "floor_forward_ms": round(floor_ms, 1),
        "per_study_over_floor": round(1000 * per_study / floor_ms, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="input size of the realistic bundles")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--sets", nargs="+", default=["bundled", "realistic"],
                   choices=["bundled", "realistic", "bundled_bf16", "realistic_bf16"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analyze_throughput.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.studies, args.size)))
        return 0
    sets: dict[str, Any] = {}
    load_before = os.getloadavg()
    for kind in args.sets:
        cmd = [sys.executable, __file__, "--child", kind, "--studies", str(args.studies), "--size", str(args.size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{kind}: exit {r.returncode}\n{r.stderr[-3000:]}")
        sets[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    report = {
        "benchmark": "analyze_throughput", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "realistic_roles": {r: {"architecture": a, "input_size": role_input_size(r, args.size), **kw}
                            for r, (a, kw) in ROLES.items()},
        "sets": sets,
    }
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
