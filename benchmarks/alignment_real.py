"""Benchmark: recovery of known random affines by the alignment module on held-out real NIH images.

    python benchmarks/alignment_real.py [NIH_DIR] [--bundle resources/models/alignment.cxrbundle]
        [--canonical resources/canonical_chest.png] [--repeats 3] [--out FILE.json]

Held-out images = patient-wise fold 0 of 5 (seed 0, the split ``cxr-train align`` trains
without). Each image ``I`` (resized to the bundle's input size) is perturbed by a random
affine ``R`` (rotation up to 10 deg, isotropic scale 0.9-1.1, shift up to 8 % of the size;
black outside the field of view) and the perturbation the network implies,
``R_hat = T(I) @ T(I_R)^-1`` (``F.affine_grid`` convention), is compared with ``R``.
Goals: median rotation error <= 2 deg, median shift error <= 2 % of the width.
Also reports the NCC of the (grid-smoothed) images to the canonical chest before and after
alignment and the inference time. Writes one JSON object to ``--out`` and stdout.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--bundle", default=str(REPO / "resources" / "models" / "alignment.cxrbundle"))
    ap.add_argument("--canonical", default=str(REPO / "resources" / "canonical_chest.png"))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="random perturbations per image")
    ap.add_argument("--rotation", type=float, default=10.0)
    ap.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.1))
    ap.add_argument("--shift", type=float, default=0.08)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N held-out images")
    ap.add_argument("--classical", action="store_true",
                    help="also measure the classical NCC registration (training.canonical) as a baseline")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "alignment_real.json"))
    return ap.parse_args(argv)


def _recovery(model: Any, x01: Any, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-sample errors of the network's recovered perturbation and of the identity guess, all repeats."""
    import torch

    from training.trainers.align import affine_errors, random_affines, recovery_errors

    errs: dict[str, list[float]] = {"rotation_deg": [], "shift_pct": [], "scale": []}
    ident: dict[str, list[float]] = {"rotation_deg": [], "shift_pct": [], "scale": []}
    for rep in range(args.repeats):
        r = recovery_errors(model, x01 * 2 - 1, rotation_deg=args.rotation, scale=tuple(args.scale),
                            shift=args.shift, seed=1000 + rep, per_sample=True)
        for k in errs:
            errs[k] += r["per_sample"][k]
        g = torch.Generator().manual_seed(1000 + rep)
        rr = random_affines(x01.shape[0], rotation_deg=args.rotation, scale=tuple(args.scale), shift=args.shift,
                            generator=g)
        e0 = affine_errors(torch.eye(2, 3).expand_as(rr), rr)
        for k in ident:
            ident[k] += e0[k].tolist()
    return errs, ident


def _median_errors(e: dict[str, Any], t0: float, n: int) -> dict[str, float]:
    """Median errors of one method and its time per image (two registrations per image since ``t0``)."""
    return {"median_rotation_error_deg": round(float(e["rotation_deg"].median()), 4),
            "median_shift_error_pct": round(float(e["shift_pct"].median()), 4),
            "median_scale_error": round(float(e["scale"].median()), 5),
            "ms_per_image": round((time.perf_counter() - t0) / (2 * n) * 1000, 1)}


def _classical(model: Any, x01: Any, args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Classical NCC registration as a baseline, and the network followed by an NCC polish."""
    import torch

    from training.canonical import register_affine
    from training.trainers.align import (affine_errors, canonical_crop_box, crop_theta, load_canonical, perturb,
                                         predict_theta, random_affines, recovered_perturbation, refine_with_ncc)

    tc = time.perf_counter()
    canon = load_canonical(args.canonical, size)
    box = canonical_crop_box(args.canonical)
    init = crop_theta(box) if box else None
    g = torch.Generator().manual_seed(1000)
    rr = random_affines(x01.shape[0], rotation_deg=args.rotation, scale=tuple(args.scale), shift=args.shift,
                        generator=g)
    t_orig, _ = register_affine(x01, canon, init=init, iters=60)
    t_pert, _ = register_affine((perturb(x01 * 2 - 1, rr) + 1) / 2, canon, init=init, iters=60)
    e = affine_errors(recovered_perturbation(t_orig, t_pert), rr)
    classical: dict[str, Any] = {**_median_errors(e, tc, x01.shape[0]), "perturbations": 1}
    # network + NCC polish (initialised at the network's affine)
    tr = time.perf_counter()
    xp01 = (perturb(x01 * 2 - 1, rr) + 1) / 2
    n_orig = refine_with_ncc(x01, canon, predict_theta(model, x01 * 2 - 1))
    n_pert = refine_with_ncc(xp01, canon, predict_theta(model, xp01 * 2 - 1))
    e = affine_errors(recovered_perturbation(n_orig, n_pert), rr)
    classical["network_plus_ncc_polish"] = _median_errors(e, tr, x01.shape[0])
    return classical


def _quantile(v: list[float], p: float) -> float:
    """The ``p`` quantile of ``v`` (nearest rank below), rounded."""
    s = sorted(v)
    return round(s[min(len(s) - 1, int(p * len(s)))], 4)


def _error_summary(errs: dict[str, list[float]], ident: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and 90th percentiles of the network's errors, medians of the identity's, the goal check."""
    med = statistics.median
    return {
        "median_rotation_error_deg": round(med(errs["rotation_deg"]), 4),
        "median_shift_error_pct": round(med(errs["shift_pct"]), 4),
        "median_scale_error": round(med(errs["scale"]), 5),
        "p90_rotation_error_deg": _quantile(errs["rotation_deg"], 0.9),
        "p90_shift_error_pct": _quantile(errs["shift_pct"], 0.9),
        "identity_median_rotation_error_deg": round(med(ident["rotation_deg"]), 4),
        "identity_median_shift_error_pct": round(med(ident["shift_pct"]), 4),
        "identity_median_scale_error": round(med(ident["scale"]), 5),
        "goal": {"median_rotation_error_deg": 2.0, "median_shift_error_pct": 2.0},
        "goal_met": bool(med(errs["rotation_deg"]) <= 2.0 and med(errs["shift_pct"]) <= 2.0),
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` as indented JSON to ``out`` (creating its folder) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    import torch

    from cxrviewer.core.bundle import load_bundle
    from training.data import load_records, split_records
    from training.trainers.align import _record_images, evaluate_alignment, predict_theta

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    size = int(bundle.manifest.input_size[0])
    records = load_records(args.nih_dir)
    _, held = split_records(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed)
    if args.limit:
        held = held[: args.limit]
    x01 = _record_images(held, size)
    load_s = time.perf_counter() - t0
    model = bundle.model.float().eval()
    t = time.perf_counter()
    predict_theta(model, x01 * 2 - 1)
    infer_ms = (time.perf_counter() - t) / max(1, len(held)) * 1000.0
    base = evaluate_alignment(bundle, x01, args.canonical, size=size, rotation_deg=args.rotation,
                              scale=tuple(args.scale), shift=args.shift, seed=1000)
    errs, ident = _recovery(model, x01, args)
    classical = _classical(model, x01, args, size) if args.classical else None
    result = {
        "benchmark": "alignment_real",
        "nih_dir": str(args.nih_dir),
        "bundle": str(args.bundle),
        "architecture": bundle.manifest.architecture,
        "arch_kwargs": bundle.manifest.arch_kwargs,
        "input_size": size,
        "weights_sha256": bundle.manifest.weights_sha256,
        "canonical": str(args.canonical),
        "held_out": {"fold": args.fold, "n_folds": args.n_folds, "seed": args.seed, "images": len(held)},
        "perturbation": {"rotation_deg_max": args.rotation, "scale": list(args.scale), "shift_max": args.shift,
                         "repeats": args.repeats, "fill": "black outside the field of view"},
        **_error_summary(errs, ident),
        "ncc_to_canonical_before": round(base["ncc_before"], 4),
        "ncc_to_canonical_after": round(base["ncc_after"], 4),
        "inference_ms_per_image": round(infer_ms, 2),
        "classical_ncc_registration": classical,
        "load_s": round(load_s, 2),
        "training": bundle.manifest.provenance.get("command"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    write_result(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
