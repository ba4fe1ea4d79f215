"""Run the explanation pipeline headless on studies and write results per study.

    cxrviewer analyze PATH ... [--models DIR] --out DIR [--device auto|cpu|cuda] [--classes NAME ...]

For each study: ``OUT/<name>/results.h5`` (all maps, boxes, timings; layout in
``cxrviewer.core.io.results``), ``summary.json`` (strict JSON, a non-finite number written as
``null``: source path, pixel_sha256, probabilities, every method's boxes
with the prior's fixed median box per class under ``prior``, ``default_box_method``,
per-stage timings, device, models, and ``not_available``: panel -> why this model set cannot
show it, e.g. ``"contrast": "needs a CIA model with a normal bank (not loaded)"``, ``"prior boxes":
"NIH classes only: not for Lung Opacity"``) and ``panels.png`` (original, CAM, aligned, attention
mining, contrast + paired normal, disease mask, lung/heart masks, as available).
A study that cannot be read or analysed gets a one-line error; the others go on
and the exit status is non-zero at the end.

``<name>`` is the file's stem (for an NIH folder: the image id, e.g. ``00002578_000``).
Names are given in input order: two files with the same stem get ``name`` and ``name-2``.
An existing ``OUT/<name>/`` is reused only when its ``summary.json`` records the same
source file (a rerun overwrites its own results); any other existing folder is left
alone and the next free suffix is taken.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: what ``cxrviewer analyze --help`` says
DESCRIPTION = """Run every model on studies without the window and write, per study, a folder
OUT/NAME/ with results.h5 (all maps and boxes, the format the app reads), summary.json
(source path, pixel SHA-256, class probabilities, every method's boxes, timings, device,
models, and the panels the models cannot make with the reason) and panels.png (the panels the
models allow). NAME is the file's name without its
extension (for an NIH folder: the image id); two files with the same name get NAME and
NAME-2, in input order. An existing folder is reused only when it holds the results of the
same file; any other folder is left alone. A study that cannot be read gets a one-line error,
the others go on, and the exit status is 1 at the end."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="DICOM/PNG/JPEG files, folders or NIH ChestX-ray14 folders")
    p.add_argument("--models", default=None, help="folder of *.cxrbundle model bundles (default: resources/models)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per study)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="classes of the model to mine (attention-mining steps) and draw; the first is drawn in "
                        "panels.png (default: the most probable class). Names match the model's classes up to "
                        "case, spaces and _ and through its label set's synonyms; an unknown name exits 2")
    p.add_argument("--map-size", type=int, default=512, help="longest side of stored maps (default 512)")
    p.add_argument("--no-panels", action="store_true", help="do not write panels.png")


def _safe_name(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "study"
    return s[:120]


def _source_of(folder: Path) -> str | None:
    """The absolute source path recorded in ``folder/summary.json`` (None: none readable)."""
    try:
        src = json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("source_path")
    except (OSError, ValueError, AttributeError):
        return None
    return os.path.abspath(src) if isinstance(src, str) and src else None


def output_names(sources: list[Path], out: Path) -> list[str]:
    """One folder name per source file, in input order: the file's stem, ``stem-2``, ... .

    A name is taken when no folder of that name exists in ``out`` or when the existing
    folder's ``summary.json`` records the same source file (a rerun); a folder of another
    file, or one that is not an analysis of ours, is never reused.
    """
    used: set[str] = set()
    names: list[str] = []
    for src in sources:
        base, k = _safe_name(src.stem), 1
        while True:
            name = base if k == 1 else f"{base}-{k}"
            k += 1
            if name in used:
                continue
            d = out / name
            if not d.exists() or _source_of(d) == os.path.abspath(src):
                break
        used.add(name)
        names.append(name)
    return names


def _box_json(b: Any) -> dict[str, Any]:
    return {"label": b.label, "x": b.x, "y": b.y, "w": b.w, "h": b.h, "score": b.score}


def summary_dict(results: Any, files: dict[str, str], source: Path | None = None) -> dict[str, Any]:
    """The JSON summary of one analysed study (``source``: the file analysed, recorded absolute)."""
    from cxrviewer.core.panels import default_box_method, not_available

    r = results
    probs = ({n: float(p) for n, p in zip(r.classes, r.probabilities)} if r.probabilities is not None else {})
    return {
        "study_id": r.study_id,
        "source_path": os.path.abspath(source) if source is not None else r.source_path,
        "pixel_sha256": r.pixel_sha256,
        "image_shape": list(r.image_shape),
        "classes": list(r.classes),
        "probabilities": probs,
        "top_classes": [r.classes[i] for i in r.top_classes(3)],
        "boxes": {src: [_box_json(b) for b in bs] for src, bs in r.boxes.items()},
        "default_box_method": default_box_method(r.boxes),
        "timings": r.timings,
        "total_seconds": float(sum(r.timings.values())),
        "device": r.device,
        "models": r.models,
        "methods": {name: {"maps": sorted(maps), **r.attrs.get(name, {})} for name, maps in r.maps.items()},
        "disease_mask_source": r.attr("disease_mask", "source"),
        "paired_normal_id": r.attr("contrast", "paired_normal_id"),
        "notices": list(r.notices),
        "not_available": not_available(r.models, r),
        "files": files,
    }


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import default_models_dir
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.io import open_worklist
    from cxrviewer.core.io.results import write_results
    from cxrviewer.core.jsonsafe import dumps
    from cxrviewer.core.panels import below_prior_by_role, default_box_method
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.render import save_panels

    def err(msg: str) -> None:
        print(f"cxrviewer analyze: {msg}", file=sys.stderr)

    models = Path(args.models) if args.models else default_models_dir()
    try:
        pipeline = Pipeline.from_dirs(models, args.device, map_max_side=args.map_size)
        classes = [pipeline.class_named(name) for name in args.classes or []]  # the model's own names
    except CxrError as exc:
        err(str(exc))
        return 2
    if classes:  # their attention-mining steps are mined with the top classes'
        pipeline.options["am_classes"] = tuple(classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wl = open_worklist(args.paths)
    failures = len(wl.errors)
    for e in wl.errors:
        err(e)
    if not wl.refs and not wl.errors:
        err("no studies found in " + ", ".join(args.paths))
        return 1
    names = output_names([Path(ref.path) for ref in wl.refs], out)
    for ref, name in zip(wl.refs, names):
        t0 = time.perf_counter()
        try:
            study = ref.load()
            results = pipeline.run(study)
            d = out / name
            d.mkdir(parents=True, exist_ok=True)
            files = {"results": "results.h5", "summary": "summary.json"}
            write_results(results, d / "results.h5", default_box_method=default_box_method(results.boxes))
            if not args.no_panels:
                c = results.classes.index(classes[0]) if classes and classes[0] in results.classes else None
                cards = {b.path.name: b.manifest for b in pipeline.bundles.values()}  # model cards
                save_panels(study, results, d / "panels.png", class_index=c, below=below_prior_by_role(results, cards))
                files["panels"] = "panels.png"
            summary = dumps(summary_dict(results, files, ref.path), indent=2, default=str)  # strict JSON
            (d / "summary.json").write_text(summary + "\n", encoding="utf-8")
        except CxrError as exc:
            failures += 1
            err(str(exc) if str(ref.path) in str(exc) else f"{ref.path}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the batch
            failures += 1
            log.debug("analysis failed", exc_info=True)
            err(f"{ref.path}: analysis failed ({type(exc).__name__}: {exc})")
            continue
        top = results.top_classes(1)
        best = f"{results.classes[top[0]]} p={results.probabilities[top[0]]:.3f}" if top else "no classifier"
        print(f"{ref.display_name}: {best}, {time.perf_counter() - t0:.1f} s on {results.device} -> {d}")
    return 1 if failures else 0
