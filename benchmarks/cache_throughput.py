"""Images/s of one epoch's data loading: HDF5 cache vs decoding the image files.

    python benchmarks/cache_throughput.py [--data ../shared/data/nih] [--n 300] [--size 256]

Writes benchmarks/results/cache_throughput.json. No model runs: this isolates I/O +
decode + resize + augmentation, the part the cache removes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    from training.data import AugmentConfig, CachedDataset, ChestDataset, build_cache, load_records

    records = load_records(args.data)[: args.n]
    aug = AugmentConfig()
    files_ds = ChestDataset(records, args.size, augment_cfg=aug)
    t0 = time.perf_counter()
    for i in range(len(files_ds)):
        files_ds[i]
    t_files = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache.h5"
        t0 = time.perf_counter()
        build_cache(records, cache, args.size)
        t_build = time.perf_counter() - t0
        ds = CachedDataset(cache, augment_cfg=aug)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        t_cache = time.perf_counter() - t0
        cache_mb = cache.stat().st_size / 1e6
    out = {
        "data": args.data, "n": len(records), "size": args.size,
        "decode_files_images_per_s": len(records) / t_files,
        "hdf5_cache_images_per_s": len(records) / t_cache,
        "speedup": t_files / t_cache,
        "cache_build_s": t_build, "cache_mb": cache_mb,
        "note": "single process, augmentation on in both; 2-core machine shared with other jobs",
    }
    res = REPO / "benchmarks" / "results" / "cache_throughput.json"
    res.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
