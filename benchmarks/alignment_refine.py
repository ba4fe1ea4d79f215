"""Benchmark: alignment network vs classical NCC registration vs network + refinement, and the quality check.

    python benchmarks/alignment_refine.py [NIH_DIR] [--bundle resources/models/alignment.cxrbundle]
        [--repeats 1] [--limit N] [--quality-images all|held-out] [--out FILE.json]

Held-out images = patient-wise fold 0 of 5 (seed 0): the split ``cxr-train align`` trained the
bundled network without. Errors follow the consistency protocol of docs/alignment.md: each image
``I`` (256 px) is perturbed by a random affine ``R`` (rotation up to 10 deg, isotropic scale
0.9-1.1, shift up to 8 %, black outside the field of view) and the perturbation a method implies,
``R_hat = T(I) @ T(I_R)^-1``, is compared with ``R``. Methods:

* ``network``: the bundled alignment network alone;
* ``classical_identity`` / ``classical_crop``: ``register_affine`` (cxrviewer/core/registration.py,
  3 rotation starts, 32 and 64 px, 60 steps each) from the identity / from the canonical chest's
  lung-crop box, no network;
* ``network_refined``: the network, then ``refine_affine`` with the app's defaults (what the
  pipeline's alignment step runs; batched here without the per-image time budget).

Times are per image, batched (all images at once) and, for the network + refinement, also one
image at a time as the pipeline runs it. The quality score (``alignment_quality``: masked NCC to the
canonical chest) is reported for real images and for wrong inputs (each held-out image rotated by
90 deg, a lateral-like input: the outer 40 % of the width stretched to the frame, and uniform
noise), with the rejection rates at the app's threshold. Writes one JSON object to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrviewer.core.canonical import canonical_crop_box, load_canonical  # noqa: E402
from cxrviewer.core.explain.alignment import MIN_QUALITY, canonical_path, check_alignment  # noqa: E402
from cxrviewer.core.registration import alignment_quality, refine_affine, register_affine  # noqa: E402
from alignment_real import write_result  # noqa: E402  (this folder is on sys.path when run as a script)
from training.canonical import crop_theta  # noqa: E402
from training.trainers.align import (affine_errors, perturb, predict_theta, random_affines,  # noqa: E402
                                     recovered_perturbation)

Method = Callable[[torch.Tensor], torch.Tensor]  # images [N, 1, S, S] in [0, 1] -> theta [N, 2, 3]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nih_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--bundle", default=str(REPO / "resources" / "models" / "alignment.cxrbundle"))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="random perturbations per image")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N held-out images")
    ap.add_argument("--single", type=int, default=20, help="images timed one at a time (pipeline-like)")
    ap.add_argument("--quality-images", choices=("all", "held-out"), default="all",
                    help="real images whose quality score is reported (all 1,222 or the held-out fold)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "alignment_refine.json"))
    return ap.parse_args(argv)


def _quantiles(v: torch.Tensor | np.ndarray) -> dict[str, float]:
    """min, p1, p5, median, p90, p95, max of ``v`` (linear interpolation), rounded."""
    a = np.asarray(v, np.float64)
    qs = {"min": 0, "p1": 1, "p5": 5, "median": 50, "p90": 90, "p95": 95, "max": 100}
    return {k: round(float(np.percentile(a, q)), 4) for k, q in qs.items()}


def _methods(model: torch.nn.Module, canon: torch.Tensor, crop: torch.Tensor | None) -> dict[str, Method]:
    """The compared methods as functions of the images in [0, 1]."""

    def network(x01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict_theta(model, x01 * 2 - 1)

    def classical(init: torch.Tensor | None) -> Method:
        return lambda x01: register_affine(x01, canon, init=init, iters=60)[0]

    methods = {"network": network, "classical_identity": classical(None),
               "network_refined": lambda x01: refine_affine(x01, canon, network(x01), time_budget_s=None)[0]}
    if crop is not None:
        methods["classical_crop"] = classical(crop)
    return methods


def _timed(fn: Method, x01: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``fn(x01)`` and its time per image in ms."""
    t = time.perf_counter()
    out = fn(x01)
    return out, (time.perf_counter() - t) / max(1, x01.shape[0]) * 1000.0


def _consistency(methods: dict[str, Method], x01: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Median / p90 rotation, shift and scale errors and batched time of every method."""
    out: dict[str, Any] = {}
    for name, fn in methods.items():
        errs: dict[str, list[float]] = {"rotation_deg": [], "shift_pct": [], "scale": []}
        t_orig, ms = _timed(fn, x01)
        times = [ms]
        for rep in range(repeats):
            rr = random_affines(x01.shape[0], rotation_deg=10.0, scale=(0.9, 1.1), shift=0.08,
                                generator=torch.Generator().manual_seed(1000 + rep))
            t_pert, ms = _timed(fn, (perturb(x01 * 2 - 1, rr) + 1) / 2)
            times.append(ms)
            for k, v in affine_errors(recovered_perturbation(t_orig, t_pert), rr).items():
                errs[k] += v.tolist()
        out[name] = {"median_rotation_error_deg": _quantiles(errs["rotation_deg"])["median"],
                     "p90_rotation_error_deg": _quantiles(errs["rotation_deg"])["p90"],
                     "median_shift_error_pct": _quantiles(errs["shift_pct"])["median"],
                     "p90_shift_error_pct": _quantiles(errs["shift_pct"])["p90"],
                     "median_scale_error": round(float(np.median(errs["scale"])), 5),
                     "ms_per_image_batched": round(float(np.mean(times)), 1), "cases": len(errs["scale"])}
        print(name, out[name], flush=True)
    return out


def _single_image_ms(model: torch.nn.Module, canon: torch.Tensor, x01: torch.Tensor) -> dict[str, float]:
    """Median ms of the network and of the pipeline's check (``check_alignment``: refinement and
    both quality scores), one image at a time."""
    net, ref = [], []
    for i in range(x01.shape[0]):
        xi = x01[i:i + 1]
        t0 = time.perf_counter()
        with torch.no_grad():
            th = model(xi * 2 - 1)["theta"].float()
        t1 = time.perf_counter()
        check_alignment(xi, canon, th)
        ref.append(time.perf_counter() - t1)
        net.append(t1 - t0)
    return {"network_ms": round(1000 * float(np.median(net)), 1),
            "refinement_and_quality_ms": round(1000 * float(np.median(ref)), 1), "images": int(x01.shape[0])}


def wrong_inputs(x01: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deliberately wrong inputs made from ``x01``: rotated 90 deg, a lateral-like side strip, noise."""
    w = x01.shape[-1]
    strip = torch.nn.functional.interpolate(x01[..., :, : int(0.4 * w)], size=x01.shape[-2:], mode="bilinear",
                                            align_corners=False)
    return {"rotated_90": torch.rot90(x01, 1, (2, 3)), "lateral_strip": strip.clamp(0, 1),
            "noise": torch.rand(x01.shape, generator=torch.Generator().manual_seed(seed))}


def _quality(model: torch.nn.Module, canon: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Quality scores (network alone and refined) per kind of input, the share rejected, and a sweep
    of thresholds: real images rejected and wrong inputs accepted at each."""
    out: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    for name, x in inputs.items():
        with torch.no_grad():
            th = predict_theta(model, x * 2 - 1)
        q_net = alignment_quality(x, canon, th)
        _, q = refine_affine(x, canon, th, time_budget_s=None)
        scores[name] = q.numpy()
        out[name] = {"images": int(x.shape[0]), "network": _quantiles(q_net), "refined": _quantiles(q),
                     "rejected_fraction": round(float((q < MIN_QUALITY).float().mean()), 4)}
        print(name, out[name], flush=True)
    out["threshold_sweep"] = [
        {"min_quality": round(t, 2), **{k: int((v < t).sum()) if k == "real" else int((v >= t).sum())
                                        for k, v in scores.items()}}
        for t in np.arange(0.50, 0.801, 0.05).tolist()]
    out["threshold_sweep_counts"] = "real: images rejected; the others: wrong inputs accepted"
    return out


def _images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Held-out images, the real images for the quality distribution, and the split's description."""
    from training.data import load_records, split_records
    from training.trainers.align import _record_images

    records = load_records(args.nih_dir)
    _, held = split_records(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed)
    if args.limit:
        held = held[: args.limit]
    x01 = _record_images(held, 256)
    real = _record_images(records, 256) if args.quality_images == "all" and not args.limit else x01
    split = {"fold": args.fold, "n_folds": args.n_folds, "seed": args.seed, "patient_wise": True,
             "held_out_images": len(held), "quality_real_images": int(real.shape[0])}
    return x01, real, split


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from cxrviewer.core.bundle import load_bundle

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    model = bundle.model.float().eval()
    cpath = canonical_path(bundle)
    canon = load_canonical(cpath, 256)
    box = canonical_crop_box(cpath)
    x01, real, split = _images(args)
    result: dict[str, Any] = {
        "benchmark": "alignment_refine", "nih_dir": str(args.nih_dir), "bundle": str(args.bundle),
        "weights_sha256": bundle.manifest.weights_sha256, "canonical": str(cpath), "held_out": split,
        "perturbation": {"rotation_deg_max": 10.0, "scale": [0.9, 1.1], "shift_max": 0.08, "repeats": args.repeats,
                         "fill": "black outside the field of view"},
        "min_quality": MIN_QUALITY,
    }
    result["consistency"] = _consistency(_methods(model, canon, crop_theta(box) if box else None), x01,
                                         args.repeats)
    result["single_image"] = _single_image_ms(model, canon, x01[: args.single])
    result["quality"] = _quality(model, canon, {"real": real, **wrong_inputs(x01, args.seed)})
    result.update({"wall_s": round(time.perf_counter() - t0, 1), "python": platform.python_version(),
                   "torch": torch.__version__, "cpu_threads": torch.get_num_threads()})
    write_result(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
