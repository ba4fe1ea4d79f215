"""Benchmark: the classifier-only pipeline against one plain forward of the same classifier.

    .venv/bin/python benchmarks/classifier_overhead.py [--runs 5] [--size 512] [--threads N] [--study PATH]

Builds (in a temporary folder) an untrained ResNet-50-MSA classifier bundle (benchmarks/pipeline_cpu.py
``ROLES["classifier"]``) at ``--size`` px and times, interleaved in one process (one round = one of
each, in turn), on one study (RG1_UNCR.dcm from pydicom-data by default):

* ``forward``: one plain forward of the classifier (``no_grad``, the preprocessed input),
* ``top3``: the pipeline with CAM, Grad-CAM and attention mining (T = 3), steps and boxes for
  the 3 most probable classes (``Pipeline(all_classes=False)``, the others on demand),
* ``all``: the same with boxes of every class (``all_classes=True``, what evaluation uses).

Reports the median of the per-round ratios pipeline / forward, the ratio of the fastest runs,
the median times, the pipeline's median stage times (and those after the classifier's one pass,
the ``cam`` stage, over the forward) and ``os.getloadavg()`` before and after (the machine may
be shared), and
writes ``benchmarks/results/classifier_overhead.json``. Run against an older checkout (no
``all_classes`` argument) it times that code's single pipeline as ``all`` only.
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
from pipeline_cpu import ROLES

METHODS = ("cam", "gradcam", "attention_mining")


def _study(path: str | None) -> tuple[str, Any]:
    """``(path, Study)``: ``path``, or RG1_UNCR.dcm from pydicom-data (1955 x 1841) when None."""
    from pydicom.data import get_testdata_file

    from cxrviewer.core.io import load_study

    chosen = path or get_testdata_file("RG1_UNCR.dcm")
    return str(chosen), load_study(chosen)


def _pipelines(bundle: Any, device: Any) -> dict[str, Any]:
    """The pipelines to time: ``top3`` (when this checkout has ``all_classes``) and ``all``."""
    from cxrviewer.core.pipeline import Pipeline

    kw = {"methods": list(METHODS), "am_steps": 3, "am_top_k": 3}
    try:
        return {"top3": Pipeline({"classifier": bundle}, device, all_classes=False, **kw),
                "all": Pipeline({"classifier": bundle}, device, all_classes=True, **kw)}
    except TypeError:  # an older checkout: boxes of every class only
        return {"all": Pipeline({"classifier": bundle}, device, **kw)}


def _measure(study: Any, bundle: Any, pipes: dict[str, Any], runs: int) -> tuple[dict[str, list[float]], dict]:
    """Interleaved rounds: a plain forward, then each pipeline; times and the last stage timings."""
    import torch

    from cxrviewer.core.preprocess import Preprocess, as_image_tensor, resize
    from cxrviewer.core.explain.context import scaled_shape

    pre = Preprocess.from_manifest(bundle.manifest)
    frame = resize(as_image_tensor(study.model_input).clamp(0, 1), scaled_shape(study.shape, 1024))
    x01, _ = pre.crop_resize(frame)
    x = pre.normalise(x01)

    def forward() -> None:
        with torch.no_grad():
            bundle.model(x)

    forward()
    for p in pipes.values():  # warm-up (allocator, oneDNN kernels)
        p.run(study)
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in pipes}}
    stages: dict[str, list[dict[str, float]]] = {k: [] for k in pipes}
    boxes: dict[str, int] = {}
    for _ in range(runs):
        t = time.perf_counter()
        forward()
        times["forward"].append(time.perf_counter() - t)
        for k, p in pipes.items():
            t = time.perf_counter()
            res = p.run(study)
            times[k].append(time.perf_counter() - t)
            stages[k].append(dict(res.timings))
            boxes[k] = sum(len(v) for v in res.boxes.values())
    med_stages = {k: {s: round(statistics.median(r[s] for r in v), 4) for s in v[0]} for k, v in stages.items()}
    return times, {"stages": med_stages, "boxes": boxes, "input_shape": list(x.shape)}


#: (flag, type, default, help) of the command line
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("--runs", int, 5, "interleaved rounds (a forward and each pipeline)"),
    ("--size", int, 512, "network input size"),
    ("--threads", int, None, "torch threads (default: torch's choice)"),
    ("--study", str, None, "image to analyse (default RG1_UNCR.dcm)"),
    ("--out", str, None, "JSON path (default benchmarks/results/classifier_overhead.json)"),
)


def main(argv: list[str] | None = None) -> int:
    """Time, then write the JSON report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.device import select_device
    from training.commands.init_bundle import init_bundle

    study_path, study = _study(args.study)
    arch, kw = ROLES["classifier"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(init_bundle(arch, Path(tmp) / "classifier", kwargs=kw, input_size=args.size))
        pipes = _pipelines(bundle, select_device("cpu"))
        times, extra = _measure(study, bundle, pipes, args.runs)
    load_after = os.getloadavg()
    ratios = {k: [t / f for t, f in zip(v, times["forward"])] for k, v in times.items() if k != "forward"}
    report = {
        "benchmark": "classifier_overhead",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "machine": {"arch": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "study": {"file": os.path.basename(str(study_path)), "shape": list(study.shape)},
        "classifier": {"architecture": arch, **kw, "input_size": args.size},
        "pipeline": {"methods": list(METHODS), "am_steps": 3, "am_top_k": 3},
        "runs": args.runs,
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_to_forward": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "ratios_per_round": {k: [round(r, 3) for r in v] for k, v in ratios.items()},
        # less sensitive to other jobs on a shared machine: the fastest run of each, and the
        # stages after the classifier's one pass (the "cam" stage runs it) over the forward
        "ratio_of_min_times": {k: round(min(v) / min(times["forward"]), 3) for k, v in times.items() if k != "forward"},
        "stages_after_forward_ratio": {k: round(sum(t for s, t in st.items() if s != "cam")
                                                / statistics.median(times["forward"]), 3)
                                       for k, st in extra["stages"].items()},
        "median_stage_s": extra["stages"],
        "boxes_per_study": extra["boxes"],
        "forward_input_shape": extra["input_shape"],
    }
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "classifier_overhead.json"
    write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
