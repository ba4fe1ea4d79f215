"""Run the explanation pipeline headless on studies and write results per study.

    cxrviewer analyze PATH ... [--list FILE] [--models DIR] --out DIR [--device auto|cpu|cuda]
                      [--classes NAME ...] [--panels | --no-panels] [--workers N] [--threads N] [--cpu-bf16]
                      [--quiet] [--progress-every SECONDS]

For each study: ``OUT/<name>/results.h5`` (all maps, boxes, timings; layout in
``cxrviewer.core.io.results``), ``summary.json`` (strict JSON, a non-finite number written as
``null``: source path, pixel_sha256, probabilities, every method's boxes
with the prior's fixed median box per class under ``prior``, ``default_box_method``,
per-stage timings, device, models, and ``not_available``: panel -> why this model set cannot
show it, e.g. ``"contrast": "needs a CIA model with a normal bank (not loaded)"``, ``"prior boxes":
"NIH classes only: not for Lung Opacity"``, ``source_file``: the file's ``bytes`` and ``mtime_ns``
and ``analysis``: each role's ``weights_sha256`` and the options ``classes``, ``map_size``,
``panels`` and, for a bf16 CPU run, ``cpu_precision``, which a rerun compares to skip the study) and, with ``--panels`` (the default
only when the input is a single file), ``panels.png`` (original, CAM, aligned, attention
mining, contrast + paired normal, disease mask, lung/heart masks, as available). A study's
folder is written (and its PNG encoded) by a background thread while the next study is
computed, where that thread has a core of its own (``_spare_core``). A study that cannot be read, analysed or written gets a one-line error; the others
go on and the exit status is non-zero at the end.

``<name>`` is the file's stem (for an NIH folder: the image id, e.g. ``00002578_000``).
Names are given in input order: two files with the same stem get ``name`` and ``name-2``.
An existing ``OUT/<name>/`` is reused only when its ``summary.json`` records the same
source file, or when it holds only our files and no ``summary.json`` (an interrupted write);
any other existing folder is left alone and the next free suffix is taken.

Archives (see :mod:`cxrviewer.cli._archive`): inputs may also come from list files
(``--list FILE``, one path a line); progress goes to stderr; a study whose folder already
holds its analysis by the same models (weights SHA-256), options and unchanged file is
skipped, so a killed run restarted with the same command finishes the rest; each study is
written into ``OUT/.partial/`` and renamed into place when complete; ``OUT/predictions.csv``
(one row per study and class: probability and the default method's box) is rebuilt from
the summaries at the end; under ``torchrun`` each rank analyses the inputs whose index modulo
``WORLD_SIZE`` is its ``RANK`` and rank 0 writes the table once all have finished.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ._archive import (ArchiveError, BackgroundWriter, Prefetcher, Progress, Shard, clean_partial, collect_inputs,
                       display_name, entry_path, is_done, is_interrupted_write, new_partial, place_study,
                       source_identity, weights_of, write_table)

log = logging.getLogger(__name__)

#: what ``cxrviewer analyze --help`` says
DESCRIPTION = """Run every model on studies without the window and write, per study, a folder
OUT/NAME/ with results.h5 (all maps and boxes, the format the app reads), summary.json
(source path, pixel SHA-256, class probabilities, every method's boxes, timings, device,
models, and the panels the models cannot make with the reason) and, for a single input file
or with --panels, panels.png (the panels the models allow; --no-panels: none). NAME is the
file's name without its
extension (for an NIH folder: the image id); two files with the same name get NAME and
NAME-2, in input order. An existing folder is reused only when it holds the results of the
same file; any other folder is left alone. A study that cannot be read gets a one-line error,
the others go on, and the exit status is 1 at the end.

Archives: folders are searched recursively and --list FILE names one study a line. A study
already analysed into OUT by the same models (weights SHA-256) with the same options, from the
same unchanged file, is skipped: a killed run restarted with the same command finishes only
the rest. OUT/predictions.csv (study, source_path, class, probability and the default box of
the class with its score) is rebuilt from every study's summary at the end. Progress (done/total,
studies/s, ETA) goes to stderr. Under torchrun (RANK and WORLD_SIZE set) each process analyses
every WORLD_SIZE-th study and rank 0 writes the table when all have finished."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help="DICOM/PNG/JPEG files, folders or NIH ChestX-ray14 folders")
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="a text file naming one study file a line (relative paths are taken from the list's "
                        "folder; blank lines and lines starting with # are skipped); may be repeated")
    p.add_argument("--models", default=None, help="folder of *.cxrbundle model bundles (default: resources/models)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per study)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="classes of the model to mine (attention-mining steps) and draw; the first is drawn in "
                        "panels.png (default: the most probable class). Names match the model's classes up to "
                        "case, spaces and _ and through its label set's synonyms; an unknown name exits 2")
    p.add_argument("--map-size", type=int, default=512, help="longest side of stored maps (default 512)")
    panels = p.add_mutually_exclusive_group()
    panels.add_argument("--panels", dest="panels", action="store_true", default=None,
                        help="write panels.png for every study (default only when the input is one file)")
    panels.add_argument("--no-panels", dest="panels", action="store_false", default=None,
                        help="do not write panels.png (the default for folders, lists and several files)")
    p.add_argument("--serial-writes", dest="write_thread", action="store_false", default=None,
                   help="write each study's folder before computing the next (default: a background thread "
                        "writes it meanwhile when it has a core of its own: beside a GPU, or on a CPU with more "
                        "cores than the models' threads)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="processes decoding studies ahead of the models (default 2; 0: decode in this process)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for the models (default 0: torch's choice, one per core); on a machine "
                        "shared with other jobs fewer threads can be much faster")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on the CPU, run the networks in bfloat16 autocast when the CPU computes bf16 natively "
                        "(AMX or AVX-512 BF16): faster for ResNet-50-size models at 512 px, not for small ones "
                        "like the bundled models; results differ from float32 in the third digit, so it is not "
                        "the default; a CPU without native bf16 runs float32 with a notice "
                        "(the same as CXRVIEWER_CPU_BF16=1)")
    p.add_argument("--quiet", action="store_true", help="no progress and no per-study lines (errors still shown)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal, a progress line at most every SECONDS (default 10; "
                        "0: one per study); on a terminal one line is updated in place")


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
            if not d.exists() or _source_of(d) == os.path.abspath(src) or is_interrupted_write(d):
                break
        used.add(name)
        names.append(name)
    return names


def _box_json(b: Any) -> dict[str, Any]:
    return {"label": b.label, "x": b.x, "y": b.y, "w": b.w, "h": b.h, "score": b.score}


def summary_dict(results: Any, files: dict[str, str], source: Path | None = None,
                 analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON summary of one analysed study (``source``: the file analysed, recorded absolute
    with its size and modification time; ``analysis``: the models' weights and options, see
    :func:`analysis_record`, both used to skip it in a rerun)."""
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
        "source_file": source_identity(os.fspath(source)) if source is not None else None,
        "analysis": analysis,
    }




def analysis_record(pipeline: Any, classes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """What makes two analyses of one file the same: each role's weights SHA-256 and the options."""
    models = {role: b.manifest.summary() for role, b in pipeline.bundles.items()}
    record = {"weights_sha256": weights_of(models), "classes": list(classes), "map_size": int(args.map_size),
              "panels": bool(args.panels)}
    dev = getattr(pipeline, "device", None)
    if dev is not None and dev.device.type == "cpu" and dev.dtype is not None:
        record["cpu_precision"] = str(dev.dtype).replace("torch.", "")  # a float32 run is not the same
    return record


def _write_study(pipeline: Any, study: Any, results: Any, d: Path, source: str, classes: list[str],
                 args: argparse.Namespace, analysis: dict[str, Any]) -> None:
    """Write the folder ``d`` of one analysed study atomically (a background thread may run it)."""
    from cxrviewer.core.io.results import write_results
    from cxrviewer.core.jsonsafe import dumps
    from cxrviewer.core.panels import below_prior_by_role, default_box_method
    from cxrviewer.core.render import save_panels

    tmp = new_partial(d.parent, d.name)
    try:
        files = {"results": "results.h5", "summary": "summary.json"}
        write_results(results, tmp / "results.h5", default_box_method=default_box_method(results.boxes))
        if args.panels:
            c = results.classes.index(classes[0]) if classes and classes[0] in results.classes else None
            cards = {b.path.name: b.manifest for b in pipeline.bundles.values()}  # model cards
            save_panels(study, results, tmp / "panels.png", class_index=c,
                        below=below_prior_by_role(results, cards))
            files["panels"] = "panels.png"
        summary = dumps(summary_dict(results, files, Path(source), analysis), indent=2, default=str)  # strict
        (tmp / "summary.json").write_text(summary + "\n", encoding="utf-8")
        place_study(tmp, d)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _failed(entry: Any, status: str, exc: BaseException, err: Any) -> None:
    """Report one study's failure as one line (typed errors as they are, others with their type)."""
    from cxrviewer.core.errors import CxrError

    if isinstance(exc, CxrError):
        msg = str(exc)
        err(msg if entry_path(entry) in msg or status != "ok" else f"{entry_path(entry)}: {msg}")
    else:
        log.debug("analysis failed", exc_info=exc)
        err(f"{entry_path(entry)}: analysis failed ({type(exc).__name__}: {exc})")


def _spare_core(pipeline: Any) -> bool:
    """Whether a background writer thread has a core of its own: beside a GPU always; on the CPU only
    when this machine has more cores than the models' threads (of every rank here). Otherwise it
    preempts the models' threads, which then wait for it: on 2 cores with 2 threads the realistic-size
    set took 3.0 s per study with the thread and 2.2 s without (benchmarks/analyze_throughput.py)."""
    import torch

    dev = getattr(pipeline, "device", None)
    if dev is not None and dev.is_cuda:
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return cores > torch.get_num_threads() * ranks_here


def _analyse(pipeline: Any, todo: list[tuple[Any, Path]], classes: list[str], args: argparse.Namespace,
             analysis: dict[str, Any], progress: Progress, err: Any) -> int:
    """Analyse ``todo`` ((entry, folder) pairs), decoded ahead by worker processes and written by
    a background thread while the next study is computed where it has a core of its own
    (:func:`_spare_core`); returns the number of failures."""
    failures = 0

    def report(outcomes: list[tuple[Any, BaseException | None]]) -> None:
        nonlocal failures
        for (entry, d, results, t0), exc in outcomes:
            if exc is not None:
                failures += 1
                _failed(entry, "ok", exc, err)
                progress.update(failed=1)
                continue
            if not args.quiet:
                top = results.top_classes(1)
                best = f"{results.classes[top[0]]} p={results.probabilities[top[0]]:.3f}" if top else "no classifier"
                progress.clear()
                print(f"{display_name(entry)}: {best}, {time.perf_counter() - t0:.1f} s on {results.device} -> {d}",
                      flush=True)
            progress.update(analysed=1)

    pre = Prefetcher([e for e, _ in todo], max(0, args.workers))
    threaded = args.write_thread if args.write_thread is not None else _spare_core(pipeline)
    writer = BackgroundWriter(ahead=1, threaded=threaded)
    try:
        for k, (entry, d) in enumerate(todo):
            t0 = time.perf_counter()
            status, study = pre.get(k)
            try:
                if status != "ok":
                    raise ArchiveError(study)
                results = pipeline.run(study)
            except Exception as exc:  # noqa: BLE001 - one bad study must not stop the batch
                failures += 1
                _failed(entry, status, exc, err)
                progress.update(failed=1)
                continue
            job = (lambda s=study, r=results, d=d, e=entry:
                   _write_study(pipeline, s, r, d, entry_path(e), classes, args, analysis))
            report(writer.submit((entry, d, results, t0), job))
        report(writer.drain())
    finally:
        writer.close()
        pre.close()
    return failures


def run(args: argparse.Namespace) -> int:
    """``cxrviewer analyze``: see :data:`DESCRIPTION`."""
    from cxrviewer.core.errors import CxrError

    def err(msg: str) -> None:
        print(f"cxrviewer analyze: {msg}", file=sys.stderr)

    if not args.paths and not args.list:
        err("name studies: PATH ... or --list FILE")
        return 2
    if args.panels is None:  # panels for a single file; folders and lists are archives: none
        args.panels = len(args.paths) == 1 and not args.list and os.path.isfile(args.paths[0])
    try:
        shard = Shard.from_env(args.device)
    except (CxrError, RuntimeError, ValueError) as exc:
        err(f"cannot join the torchrun group: {exc}")
        return 2
    try:
        return _run(args, shard, err)
    finally:
        shard.close()


def _device(args: argparse.Namespace, err: Any) -> Any:
    """The device and precision ``--device`` / ``--cpu-bf16`` ask for (``cpu_bf16`` None: the environment's)."""
    from cxrviewer.core.device import cpu_has_fast_bf16, select_device

    device = select_device(args.device, cpu_bf16=True if args.cpu_bf16 else None)
    if args.cpu_bf16 and not device.is_cuda and not cpu_has_fast_bf16():
        err("--cpu-bf16: this CPU has no native bf16 (AMX or AVX-512 BF16); the CPU runs float32")
    return device


def _run(args: argparse.Namespace, shard: Shard, err: Any) -> int:
    """The run of one process (one rank of ``shard``)."""
    from cxrviewer.core.bundle import default_models_dir
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.pipeline import Pipeline

    def rank_err(msg: str) -> None:
        progress.clear()
        err(shard.tag + msg)

    models = Path(args.models) if args.models else default_models_dir()
    if args.threads < 0:
        err(f"--threads must be 0 (torch's choice) or a positive number, not {args.threads}")
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        device = _device(args, lambda m: err(shard.tag + m))
        pipeline = Pipeline.from_dirs(models, device, map_max_side=args.map_size)
        classes = [pipeline.class_named(name) for name in args.classes or []]  # the model's own names
        entries, errors = collect_inputs(args.paths, args.list)
    except CxrError as exc:
        err(str(exc))
        return 2
    if classes:  # their attention-mining steps are mined with the top classes'
        pipeline.options["am_classes"] = tuple(classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = len(errors) if shard.rank == 0 else 0
    for e in errors if shard.rank == 0 else []:
        err(e)
    if not entries and not errors:
        err("no studies found in " + ", ".join([*args.paths, *args.list]))
        return 1
    analysis = analysis_record(pipeline, classes, args)
    names = output_names([Path(entry_path(e)) for e in entries], out)
    shard.barrier()  # every rank has named every study before any folder is written
    mine = [(entries[i], out / names[i]) for i in shard.mine(len(entries))]
    todo = [(e, d) for e, d in mine if not is_done(d, entry_path(e), analysis)]
    progress = Progress(len(mine), None if args.quiet else sys.stderr, every=args.progress_every, prefix=shard.tag)
    progress.update(skipped=len(mine) - len(todo))
    failures += _analyse(pipeline, todo, classes, args, analysis, progress, rank_err)
    progress.close()
    shard.barrier()  # rank 0 writes the table once every shard is finished
    if shard.rank == 0:
        try:
            write_table(out, ((n, entry_path(e)) for n, e in zip(names, entries)), analysis)
        except OSError as exc:
            err(f"cannot write {out / 'predictions.csv'}: {exc}")
            return 1
        clean_partial(out)
    return 1 if failures else 0
