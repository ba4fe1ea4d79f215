"""Benchmark: time to open an NIH ChestX-ray14 folder as a worklist (goal: < 2 s).

    python benchmarks/io_nih_worklist.py [NIH_DIR] [--repeat 5] [--out FILE.json]

Opens ``read_nih_folder`` on the folder (default ``../shared/data/nih``: the full
112,120-row ``Data_Entry_2017_v2020.csv.gz``, the bbox file and a 1,222-image
``images/`` folder) several times and writes one JSON object with the timings
(first call includes the module import) to ``--out`` and to stdout. Also times
loading a sample of studies.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--load-sample", type=int, default=50, help="also time load_study on this many refs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "io_nih_worklist.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    from cxrviewer.core.io import read_nih_folder

    import_s = time.perf_counter() - t0
    times = []
    wl = None
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        wl = read_nih_folder(args.nih_dir)
        times.append(time.perf_counter() - t)
    label_files = sorted(p.name for p in Path(args.nih_dir).iterdir() if p.name.endswith((".csv", ".csv.gz")))
    load_times = []
    for ref in list(wl)[: args.load_sample]:
        t = time.perf_counter()
        ref.load()
        load_times.append(time.perf_counter() - t)
    result = {
        "benchmark": "io_nih_worklist",
        "nih_dir": str(args.nih_dir),
        "label_files": label_files,
        "refs": len(wl),
        "boxed_refs": sum(1 for r in wl if r.gt_boxes),
        "import_s": round(import_s, 4),
        "open_s": [round(x, 4) for x in times],
        "open_s_median": round(statistics.median(times), 4),
        "open_s_first": round(times[0], 4),
        "goal_s": 2.0,
        "meets_goal": max(times) < 2.0,
        "load_study_ms_median": round(1000 * statistics.median(load_times), 2) if load_times else None,
        "load_sample": len(load_times),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0 if result["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
