"""Benchmark: save 1,000 boxes to an annotation store, one committed transaction each.

    python benchmarks/annotations_save.py [--n 1000] [--dir TMPDIR] [--out FILE.json]

Times ``AnnotationStore.add_box`` (each call = one ``BEGIN IMMEDIATE`` ... ``COMMIT``
with its edit-log rows) under ``synchronous=FULL`` (the store's default: the WAL
is fsynced on every commit) and, for comparison, ``synchronous=NORMAL``; also a
single batch of the same boxes (one transaction) and 1,000 undos. Writes one JSON
object to ``--out`` and stdout. The store lives in ``--dir`` (default: a temp
folder beside this checkout, i.e. on the disk a user's project would be on).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(folder: Path, n: int, synchronous: str) -> dict:
    from cxrviewer.core.annotations import AnnotationStore, StudyIdentity, UndoStack
    from cxrviewer.core.geometry import Box

    path = folder / f"bench_{synchronous.lower()}.cxrann"
    rng = random.Random(0)
    with AnnotationStore(path, annotator="bench", synchronous=synchronous) as s:
        sid = s.ensure_study(StudyIdentity("bench.png", sha256="0" * 64), width=1024,
                             height=1024).id
        boxes = [(rng.uniform(0, 900), rng.uniform(0, 900), rng.uniform(5, 120),
                  rng.uniform(5, 120)) for _ in range(n)]
        per: list[float] = []
        stack = UndoStack(s)
        t0 = time.perf_counter()
        for x, y, w, h in boxes:
            t = time.perf_counter()
            stack.push(s.add_box(sid, "Mass", x, y, w, h))
            per.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        while stack.can_undo:
            stack.undo()
        undo_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.add_boxes(sid, [Box("Nodule", *b) for b in boxes], "bench batch")
        batch_total = time.perf_counter() - t0
        ok = s.integrity_check()
    size = path.stat().st_size + sum(p.stat().st_size for p in folder.glob(path.name + "-*"))
    per_ms = sorted(x * 1000 for x in per)
    return {
        "synchronous": synchronous,
        "boxes": n,
        "total_s": round(total, 4),
        "edits_per_s": round(n / total, 1),
        "per_edit_ms_median": round(statistics.median(per_ms), 3),
        "per_edit_ms_p95": round(per_ms[int(0.95 * (n - 1))], 3),
        "per_edit_ms_max": round(per_ms[-1], 3),
        "undo_all_s": round(undo_total, 4),
        "one_batch_of_all_s": round(batch_total, 4),
        "store_bytes": size,
        "integrity_check": ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="folder for the temporary stores")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                         "annotations_save.json"))
    args = ap.parse_args(argv)
    base = Path(args.dir) if args.dir else REPO.parent
    with tempfile.TemporaryDirectory(prefix="cxrann-bench-", dir=base) as tmp:
        runs = [_run(Path(tmp), args.n, mode) for mode in ("FULL", "NORMAL")]
    result = {
        "benchmark": "annotations_save",
        "description": "add_box x N, one committed transaction (data + edit log) per box, WAL",
        "runs": runs,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "note": "shared 2-core CI machine; fsync cost depends on the disk",
    }
    text = json.dumps(result, indent=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
