"""GPU check: every CUDA path of the app and the trainer in one go, in under 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py [--studies 50] [--size 512] [--budget 450] [--cpu-smoke]

On a CUDA machine it runs, each part with its own time limit:

1. ``pytest -m cuda`` (tests/core/test_cuda.py: CUDA vs CPU agreement, autocast, a training step;
   tests/training/test_data_loader.py: pinned uint8 batches, the GPU augmentation, one epoch);
2. ``cxrviewer analyze`` on ``--studies`` phantom studies (1024 px, written here) with realistic-size
   random-weight bundles (the ROLES of benchmarks/pipeline_cpu.py) at ``--size`` px: studies/s
   of the CLI as a user runs it, and in-process the median ms per pipeline stage, the peak GPU
   memory, and the agreement of autocast bf16 / fp16 with float32 (probabilities, and every map
   relative to its range);
3. one epoch of ``cxr-train classify`` (ResNet-50) on an HDF5 cache (``cxr-train cache``): images/s
   from the trainer's ``log.jsonl``;
4. ``torchrun --nproc_per_node 2 -m cxrviewer analyze`` over the same studies: the two ranks share
   the GPU; studies/s and whether the combined predictions table has every study.

It writes ``benchmarks/results/gpu_check.json``. Without CUDA the GPU parts are reported as
skipped (the script still runs end to end); ``--cpu-smoke`` runs every part on the CPU at toy
scale instead, which is how the test suite checks this script's logic.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from pipeline_cpu import ROLES, role_input_size  # noqa: E402  (one realistic-size model set for every benchmark)

from cxrviewer.selftest import TINY_BUNDLES  # noqa: E402

#: toy roles for --cpu-smoke: the self-test's tiny networks, plus a DM
SMOKE_ROLES = {**TINY_BUNDLES, "dm": ("dm", {"backbone": "tiny", "mask_size": 8})}


#: the files holding tests marked ``cuda`` (tests/core/test_gpu_check_script.py checks this list is complete)
CUDA_TEST_FILES = ("tests/core/test_cuda.py", "tests/training/test_data_loader.py")


class Check:
    """Runs the parts, keeps their results and the time left of the overall budget."""

    def __init__(self, args: argparse.Namespace, work: Path, cuda: bool) -> None:
        self.args, self.work, self.cuda = args, work, cuda
        self.device = "cuda" if cuda else "cpu"
        self.t0 = time.perf_counter()
        self.parts: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def part(self, name: str, fn: Callable[[], dict[str, Any]], *, gpu_only: bool = True) -> None:
        """Run one part; a failure is recorded (with its message), never fatal to the others."""
        if gpu_only and not self.cuda and not self.args.cpu_smoke:
            self.parts[name] = {"status": "skipped", "why": "no CUDA device (run with --cpu-smoke to test the logic)"}
            return
        if self.left() < 20:
            self.parts[name] = {"status": "skipped", "why": f"time budget of {self.args.budget:.0f} s spent"}
            return
        t = time.perf_counter()
        try:
            out = {"status": "ok", **fn()}
        except Exception as e:  # noqa: BLE001  (one part failing must not hide the others' numbers)
            out = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        out["wall_s"] = round(time.perf_counter() - t, 2)
        self.parts[name] = out
        print(f"[gpu_check] {name}: {out['status']} in {out['wall_s']} s", file=sys.stderr, flush=True)

    def run(self, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A subprocess with a limit (never beyond the budget); raises with its output tail on failure."""
        limit = max(10.0, min(limit, self.left() - 5))
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=limit)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
        return p


def _roles(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    return SMOKE_ROLES if args.cpu_smoke else ROLES


def make_bundles(folder: Path, args: argparse.Namespace) -> Path:
    """Random-weight bundles of every role in ``folder`` (what ``--models`` points at)."""
    from training.commands.init_bundle import init_bundle

    folder.mkdir(parents=True, exist_ok=True)
    for i, (role, (arch, kw)) in enumerate(_roles(args).items()):
        init_bundle(arch, folder / f"{role}.cxrbundle", kwargs=kw, input_size=role_input_size(role, args.size), bank_size=16,
                    seed=i, canonical=False)
    return folder


def make_studies(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` phantom chest images (NIH layout, with boxes) to analyse and train on."""
    from training.phantoms import write_phantom_dataset

    write_phantom_dataset(folder, n, size=size, seed=0)
    return sorted((folder / "images").glob("*.png"))


def part_pytest(c: Check) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                        *CUDA_TEST_FILES], cwd=ROOT, capture_output=True, text=True,
                       timeout=max(10.0, min(180.0, c.left() - 5)))
    tail = (p.stdout + p.stderr).strip().splitlines()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    last = tail[-1] if tail else ""
    for chunk in last.split(","):
        bits = chunk.strip().split()
        if len(bits) >= 2 and bits[0].isdigit():
            key = bits[1].rstrip("s") if bits[1].startswith("error") else bits[1]
            counts[key] = counts.get(key, 0) + int(bits[0])
    if p.returncode not in (0, 5) or counts.get("failed") or counts.get("error"):
        return {"exit": p.returncode, **counts, "status": "failed", "tail": "\n".join(tail[-30:])}
    return {"exit": p.returncode, **counts, "summary": last}


def _flat_maps(res: Any) -> dict[str, Any]:
    import numpy as np

    out = {}
    for ex, maps in res.maps.items():
        for key, val in maps.items():
            for sub, arr in (val.items() if isinstance(val, dict) else [("", val)]):
                if isinstance(arr, np.ndarray) and arr.ndim >= 2 and arr.dtype.kind == "f":
                    out[f"{ex}/{key}/{sub}"] = arr
    return out


def agreement(ref: Any, other: Any) -> dict[str, float]:
    """Max |probability difference| and max map difference relative to the map's range."""
    import numpy as np

    a, b = _flat_maps(ref), _flat_maps(other)
    worst, where, rel = 0.0, "", []
    for k in sorted(set(a) & set(b)):
        if a[k].shape == b[k].shape:
            rng = float(np.nanmax(a[k]) - np.nanmin(a[k])) or 1.0
            rel.append(float(np.nanmax(np.abs(a[k] - b[k]))) / rng)
            if rel[-1] > worst:
                worst, where = rel[-1], k
    dp = float(np.abs(ref.probabilities - other.probabilities).max()) if ref.probabilities is not None else 0.0
    return {"max_prob_diff": round(dp, 6), "max_map_diff_rel": round(worst, 6),
            "median_map_diff_rel": round(float(np.median(rel)), 6) if rel else 0.0, "worst_map": where,
            "maps_compared": len(rel)}


def part_pipeline(c: Check, models: Path, studies: list[Path]) -> dict[str, Any]:
    """In-process: ms per stage (median over the studies), peak GPU memory, autocast agreement."""
    import torch

    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import DeviceInfo, cpu_device, select_device
    from cxrviewer.core.io import load_study
    from cxrviewer.core.pipeline import Pipeline

    bundles = {b.stem: load_bundle(b) for b in sorted(models.glob("*.cxrbundle"))}
    if c.cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
        fp32 = DeviceInfo(dev, None, "fp32")
        variants = {"bf16": DeviceInfo(dev, torch.bfloat16, "bf16"), "fp16": DeviceInfo(dev, torch.float16, "fp16")}
        default = select_device("cuda")
    else:
        fp32 = cpu_device(cpu_bf16=False)
        variants = {"bf16": DeviceInfo(torch.device("cpu"), torch.bfloat16, "cpu bf16")}
        default = fp32
    pl = Pipeline(bundles, default)
    pl.run(load_study(studies[0]))  # warm-up: kernels, allocator
    if c.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stage_ms: dict[str, list[float]] = {}
    totals = []
    for s in studies:
        if c.left() < 60:
            break
        study = load_study(s)
        t = time.perf_counter()
        res = pl.run(study)
        if c.cuda:
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - t)
        for k, v in res.timings.items():
            stage_ms.setdefault(k, []).append(1000 * v)
    out: dict[str, Any] = {
        "device": str(default), "studies": len(totals),
        "pipeline_studies_per_s": round(len(totals) / max(sum(totals), 1e-9), 3),
        "median_ms_per_stage": {k: round(statistics.median(v), 2) for k, v in stage_ms.items()},
    }
    if c.cuda:
        out["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    agree: dict[str, Any] = {}
    for name, dinfo in variants.items():
        rows = [agreement(Pipeline(bundles, fp32).run(load_study(s)), Pipeline(bundles, dinfo).run(load_study(s)))
                for s in studies[:3]]
        agree[name] = max(rows, key=lambda r: r["max_map_diff_rel"])
        agree[name]["max_prob_diff"] = max(r["max_prob_diff"] for r in rows)
    out["autocast_vs_fp32"] = agree
    return out


def _studies_per_s(out_dir: Path, wall: float, n: int) -> dict[str, Any]:
    table = out_dir / "predictions.csv"
    rows = 0
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            rows = len({r.get("study") or r.get("study_id") or next(iter(r.values())) for r in csv.DictReader(f)})
    return {"wall_s_with_model_load": round(wall, 2), "studies_per_s": round(n / max(wall, 1e-9), 3),
            "studies_in_predictions_csv": rows}


def part_analyze_cli(c: Check, models: Path, studies: list[Path], nproc: int = 1) -> dict[str, Any]:
    """``cxrviewer analyze`` over the studies as a user runs it (1 process, or torchrun with ``nproc``)."""
    lst = c.work / "studies.txt"
    lst.write_text("\n".join(str(s) for s in studies) + "\n", encoding="utf-8")
    out = c.work / f"analyze_{nproc}"
    args = ["--list", str(lst), "--models", str(models), "--out", str(out), "--device", c.device,
            "--map-size", str(min(512, c.args.size)), "--no-panels", "--quiet"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "cxrviewer", "analyze", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cxrviewer", "analyze", *args]
    t = time.perf_counter()
    c.run(cmd, limit=240)
    return {"processes": nproc, **_studies_per_s(out, time.perf_counter() - t, len(studies))}


def part_train(c: Check, data: Path) -> dict[str, Any]:
    """One epoch of ``cxr-train classify`` on an HDF5 cache; images/s from log.jsonl."""
    cache = c.work / "train_cache.h5"
    size = 64 if c.args.cpu_smoke else 256
    c.run([sys.executable, "-m", "training.cli", "cache", "--data", str(data), "--out", str(cache),
           "--size", str(size)], limit=120)
    out = c.work / "classify.cxrbundle"
    arch = ["--arch", "msa", "--arch-kwargs", '{"backbone": "tiny"}'] if c.args.cpu_smoke else ["--arch", "resnet50"]
    workers = "0" if c.args.cpu_smoke else str(min(8, os.cpu_count() or 1))
    t = time.perf_counter()
    c.run([sys.executable, "-m", "training.cli", "classify", "--data", str(data), "--cache", str(cache),
           "--size", str(size), *arch, "--epochs", "1", "--batch-size", "16" if c.args.cpu_smoke else "64",
           "--device", c.device, "--workers", workers, "--out", str(out)], limit=200)
    wall = time.perf_counter() - t
    recs = []
    log = Path(str(out) + ".run") / "log.jsonl"
    if log.is_file():
        recs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    ips = [v for r in recs for k, v in r.items() if isinstance(v, (int, float)) and "images" in k and "s" in k]
    return {"wall_s": round(wall, 2), "images_per_s": round(max(ips), 1) if ips else None,
            "log_records": len(recs), "bundle_written": out.exists()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="network input size of the analysis bundles")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    p.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU at toy scale")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.studies, args.size = min(args.studies, 4), min(args.size, 128)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    with tempfile.TemporaryDirectory(prefix="cxr-gpu-check-") as tmp:
        c = Check(args, Path(tmp), cuda)
        c.part("cuda_tests", lambda: part_pytest(c), gpu_only=False)
        need_data = cuda or args.cpu_smoke
        models = make_bundles(c.work / "models", args) if need_data else None
        data = c.work / "phantoms"
        studies = make_studies(data, args.studies, 256 if args.cpu_smoke else 1024) if need_data else []
        c.part("analyze_cli_1_process", lambda: part_analyze_cli(c, models, studies))
        c.part("pipeline_stages_and_autocast", lambda: part_pipeline(c, models, studies))
        c.part("train_one_epoch", lambda: part_train(c, data))
        c.part("analyze_torchrun_2_processes", lambda: part_analyze_cli(c, models, studies, nproc=2))
        elapsed = time.perf_counter() - c.t0
    report = {
        "benchmark": "gpu_check", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cuda" if cuda else ("cpu-smoke" if args.cpu_smoke else "no CUDA: GPU parts skipped"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "studies": args.studies, "input_size": args.size,
        "roles": {r: {"architecture": a, **kw} for r, (a, kw) in _roles(args).items()},
        "elapsed_s": round(elapsed, 1), "parts": c.parts,
        "ok": all(v.get("status") in ("ok", "skipped") for v in c.parts.values()),
    }
    write_report(report, Path(args.out))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
