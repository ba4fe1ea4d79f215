"""Benchmark: ``cxrviewer analyze`` over NIH images with 1 and 2 processes, and resume after a kill.

    python benchmarks/analyze_archive.py [NIH_DIR] [--n 20] [--models DIR] [--out FILE.json]

Takes the first N images (sorted) of ``NIH_DIR/images`` (default ``../shared/data/nih``; the
benchmark says so and exits 0 when it is absent), writes them to a list file and runs, on the CPU
with ``--no-panels``:

1. one process (``OMP_NUM_THREADS`` = all cores): studies/s over the whole command (start-up and
   model loading included) and over the analysis alone (between the first and the last summary);
2. one process with the threads of one rank (half the cores), then ``torchrun --nproc_per_node 2``
   (gloo, half the cores each): the same rates, and whether the two-process ``predictions.csv``
   equals each one-process table (with the same threads per process it should, bit for bit; with
   a different thread count the float sums differ in the last digits: the largest probability
   difference is reported);
3. the same command again on the finished folder: the resume check (every study skipped);
4. a run (half the cores) SIGKILLed once half of the summaries exist, then restarted: how many studies the
   restart recomputed (by the summaries' modification times) and whether the table is the same.

The load average (1, 5, 15 min) before and after is recorded: this machine may be shared.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _cmd(list_file: Path, out: Path, models: str, procs: int) -> list[str]:
    args = ["-m", "cxrviewer", "analyze", "--list", str(list_file), "--out", str(out), "--models", models,
            "--device", "cpu", "--no-panels", "--quiet", "--workers", "1"]
    if procs == 1:
        return [sys.executable, *args]
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(procs), *args]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}


def _summaries(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


def _timed(cmd: list[str], env: dict[str, str], out: Path, n: int) -> dict:
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"analyze failed ({r.returncode}): {r.stderr[-2000:]}")
    stamps = sorted(_summaries(out).values())
    first = (stamps[0] / 1e9 - t0) if stamps else None
    span = (stamps[-1] - stamps[0]) / 1e9 if len(stamps) > 1 else None
    return {"wall_s": round(wall, 2), "studies_per_s": round(n / wall, 4),
            "first_study_done_after_s": round(first, 2) if first is not None else None,
            "analysis_studies_per_s": round((len(stamps) - 1) / span, 4) if span else None}


def _table(out: Path) -> list[list[str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _max_prob_diff(a: list[list[str]], b: list[list[str]]) -> float | None:
    if len(a) != len(b) or [r[:3] for r in a] != [r[:3] for r in b]:
        return None
    return max((abs(float(x[3]) - float(y[3])) for x, y in zip(a[1:], b[1:]) if x[3] and y[3]), default=0.0)


def _kill_and_resume(cmd: list[str], env: dict[str, str], out: Path, n: int, clean: list[list[str]]) -> dict:
    """Kill a run once half the summaries exist; restart it; count what the restart redid."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and len(_summaries(out)) < n // 2:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = _summaries(out)
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = _summaries(out)
    redone = sorted(k for k in before if after.get(k) != before[k])
    table = _table(out) if (out / "predictions.csv").exists() else []
    return {"done_at_kill": len(before), "restart_rc": r.returncode, "restart_wall_s": round(time.time() - t0, 2),
            "recomputed_on_restart": len(after) - len(before) + len(redone), "done_ones_redone": redone,
            "table_equals_clean_run": table == clean, "max_probability_diff": _max_prob_diff(table, clean)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--n", type=int, default=20, help="images (default 20)")
    ap.add_argument("--models", default=str(REPO / "resources" / "models"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "analyze_archive.json"))
    args = ap.parse_args(argv)
    images = Path(args.nih_dir) / "images"
    if not images.is_dir():
        print(f"analyze_archive: {images} not found; nothing measured")
        return 0
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:args.n]
    n, cores = len(files), os.cpu_count() or 1
    from _report import write_report

    work = Path(tempfile.mkdtemp(prefix="analyze_archive."))
    try:
        lst = work / "list.txt"
        lst.write_text("".join(f"{p}\n" for p in files), encoding="utf-8")
        load_before = os.getloadavg()
        one, one1, two, killed = work / "one", work / "one1", work / "two", work / "killed"
        half = max(1, cores // 2)
        r1 = _timed(_cmd(lst, one, args.models, 1), _env(cores), one, n)
        r11 = _timed(_cmd(lst, one1, args.models, 1), _env(half), one1, n)
        r2 = _timed(_cmd(lst, two, args.models, 2), _env(half), two, n)
        t1, t11, t2 = _table(one), _table(one1), _table(two)
        t0 = time.time()
        subprocess.run(_cmd(lst, one, args.models, 1), env=_env(cores), check=True, capture_output=True)
        resume_noop = time.time() - t0
        kill = _kill_and_resume(_cmd(lst, killed, args.models, 1), _env(half), killed, n, t11)
        report = {
            "benchmark": "analyze_archive", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "images": n, "source": str(images), "models": args.models, "device": "cpu", "panels": False,
            "cpu_count": cores, "machine": platform.machine(),
            "one_process": {**r1, "omp_threads": cores},
            "one_process_same_threads_as_a_rank": {**r11, "omp_threads": half},
            "two_processes_torchrun": {**r2, "omp_threads_each": half, "backend": "gloo"},
            "speedup_2_over_1": round(r2["studies_per_s"] / r1["studies_per_s"], 3),
            "table_2_equals_1_same_threads": t2 == t11,
            "max_probability_diff_2_vs_1_same_threads": _max_prob_diff(t2, t11),
            "table_2_equals_1_all_cores": t2 == t1,
            "max_probability_diff_2_vs_1_all_cores": _max_prob_diff(t2, t1),
            "rerun_all_done_wall_s": round(resume_noop, 2), "kill_and_resume": kill,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
