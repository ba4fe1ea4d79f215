"""Annotation projects without the window: create, inspect, import, export, add labels.

    cxrviewer annotations new PROJECT [--label-set NAME|FILE]
    cxrviewer annotations info PROJECT [--json]
    cxrviewer annotations import PROJECT FILE --format {coco,nih,dicom-sr,gsps,dicom-seg}
        [--studies DIR] [--label-set NAME|FILE] [--map A=B ...] [--add-unknown] [--skip NAME ...]
    cxrviewer annotations export PROJECT TARGET --format {coco,coco-results,voc,yolo,nih,dicom,
        dicom-sr,gsps,dicom-seg} [--status S ...] [--model NAME] [--results PATH ...]
        [--threshold T] [--no-model]
    cxrviewer annotations add-labels PROJECT NAME ...

A project records its label set (built in: nih14, torchxrayvision18, vindr-cxr,
rsna-pneumonia, lung-heart; or a user's .json/.txt file); boxes, image labels, proposals,
imports and exports use its labels. An import whose classes the set cannot map (by spelling
or synonym) is refused whole, listing them: ``--map NAME=LABEL`` maps one onto a project
label, ``--add-unknown`` adds them to the project's label set, ``--skip NAME`` leaves their
boxes out. An import into a project file that does not exist creates it (with
``--label-set``). ``coco-results`` writes the model proposals as a COCO results list
(pycocotools ``loadRes``). ``--format dicom`` writes a folder per study with boxes: ``SR.dcm`` (TID 1500
SR) + ``PR.dcm`` (GSPS), and ``SC.dcm`` for a PNG/JPEG study (``dicom-sr``: SR only, ``gsps``:
PR only); ``--format dicom-seg`` writes per study ``SEG.dcm`` (binary lung/heart masks from the
study's stored analysis, a ``results.h5`` found beside the image or under ``--results PATH``,
else from the bundled segmentation model unless ``--no-model``) and, when the analysis holds
finding maps, ``SEG_threshold.dcm`` (maps >= ``--threshold``) and ``SEG_fractional.dcm``. An
SR/GSPS/SEG import finds the images it references in the project, else by SOP Instance UID
among the DICOM files of ``--studies DIR``; a SEG gives one box per segment (its bounding box),
lung/heart segments only when the project's label set has them (else counted as skipped).
Errors are one line on stderr and exit status 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: what ``cxrviewer annotations --help`` says
DESCRIPTION = """Create an annotation project with a label set, show what it holds, import COCO,
NIH box files or DICOM SR/GSPS/SEG into it (unknown classes: --map NAME=LABEL, --add-unknown or
--skip NAME), export it (COCO, VOC, YOLO, NIH csv, DICOM SR + GSPS, DICOM SEG), or add labels to
its label set. Errors: one line, exit status 2, nothing written."""

IMPORT_FORMATS = {"coco": "coco", "nih": "nih-csv", "nih-csv": "nih-csv", "dicom-sr": "dicom-sr",
                  "gsps": "gsps", "dicom-seg": "dicom-seg"}
EXPORT_FORMATS = {"coco": "coco", "coco-results": "coco-results", "voc": "voc", "yolo": "yolo",
                  "nih": "nih-csv", "nih-csv": "nih-csv", "dicom": "dicom", "dicom-sr": "dicom-sr",
                  "gsps": "gsps", "dicom-seg": "dicom-seg"}
#: formats served by cxrviewer.core.dicom_objects (imported only when one is used: ~1 s)
DICOM_FORMATS = ("dicom", "dicom-sr", "gsps", "dicom-seg")


TARGET_HELP = ("file (coco, coco-results, nih), folder or .zip (voc: VOCdevkit layout, yolo: Ultralytics "
               "layout; both with copies of the PNG/JPEG images), folder (dicom, dicom-sr, gsps, dicom-seg)")


def import_options(p: argparse.ArgumentParser) -> None:
    """The options of an import (also ``cxrviewer import``)."""
    p.add_argument("--format", required=True, choices=tuple(IMPORT_FORMATS))
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set of a project the import creates (default nih14)")
    p.add_argument("--map", action="append", default=[], metavar="NAME=LABEL",
                   help="import the file's class NAME as the project's LABEL (repeatable)")
    p.add_argument("--add-unknown", action="store_true",
                   help="add the file's unmapped classes to the project's label set")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="leave the boxes of class NAME out (repeatable)")
    p.add_argument("--studies", "--images", dest="images", default=None, metavar="DIR",
                   help="folder of the images the file names (coco/nih: path hints; dicom-sr/gsps/"
                        "dicom-seg: searched for the referenced SOP Instance UIDs)")


def export_options(p: argparse.ArgumentParser) -> None:
    """The options of an export (also ``cxrviewer export``)."""
    p.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS))
    p.add_argument("--status", nargs="+", default=None,
                   choices=("unseen", "in_progress", "done", "verified"), help="only these review statuses")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="coco-results: only this model's proposals (needed when there are several)")
    p.add_argument("--include-identifiers", action="store_true",
                   help="write SOP Instance UIDs and last-seen paths (may identify patients)")
    p.add_argument("--results", action="append", default=[], metavar="PATH",
                   help="dicom-seg: a results.h5, or a folder of them (cxrviewer analyze --out), "
                        "holding the studies' analyses (also looked for beside each image)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="T",
                   help="dicom-seg: threshold of the finding maps (in [0, 1]; default 0.5)")
    p.add_argument("--no-model", action="store_true",
                   help="dicom-seg: never run the bundled segmentation model (only stored masks)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sub-commands and their options."""
    p.add_argument("--annotator", default=None, help="name recorded on edits (default: the login name)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="create a project with a label set")
    new.add_argument("project", help="the new project file (.cxrann)")
    new.add_argument("--label-set", default="nih14", metavar="NAME|FILE",
                     help="built-in label set (nih14, torchxrayvision18, vindr-cxr, rsna-pneumonia, "
                          "lung-heart) or a .json/.txt file (default nih14)")
    info = sub.add_parser("info", help="label set and counts of a project")
    info.add_argument("project")
    info.add_argument("--json", action="store_true", help="print JSON")
    imp = sub.add_parser("import", help="import a COCO JSON, NIH box CSV or DICOM SR/GSPS/SEG")
    imp.add_argument("project", help="the project (created when the file does not exist)")
    imp.add_argument("file")
    import_options(imp)
    exp = sub.add_parser("export", help="export the project")
    exp.add_argument("project")
    exp.add_argument("target", help=TARGET_HELP)
    export_options(exp)
    add = sub.add_parser("add-labels", help="add labels to the project's label set")
    add.add_argument("project")
    add.add_argument("names", nargs="+", metavar="NAME")


def _err(msg: object) -> int:
    print(f"cxrviewer annotations: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _labels(n: int) -> str:
    return f"{n} label{'' if n == 1 else 's'}"


def _describe(ls: Any) -> str:
    return f"{ls.display_name} ({ls.name}, {_labels(len(ls))})"


def project_info(store: Any) -> dict[str, Any]:
    """Label set and counts of an open :class:`~cxrviewer.core.annotations.AnnotationStore`."""
    ls = store.label_set
    boxes: Counter[str] = Counter()
    pending: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    n_labels = 0
    studies = store.studies()
    for rec in studies:
        statuses[rec.status] += 1
        boxes.update(b.label for b in store.boxes(rec.id))
        pending.update(p.label for p in store.proposals(rec.id, "pending"))
        n_labels += len(store.labels(rec.id))
    return {"project": str(store.path), "schema": store.schema_version, "label_set": ls.name,
            "label_set_title": ls.display_name, "labels": list(ls.labels),
            "studies": len(studies), "statuses": dict(statuses), "boxes": sum(boxes.values()),
            "boxes_per_class": dict(sorted(boxes.items())), "image_labels": n_labels,
            "pending_proposals": sum(pending.values()),
            "unmapped_proposal_classes": sorted(c for c in pending if c not in ls)}


def _print_info(info: dict[str, Any]) -> None:
    print(f"project: {info['project']} (schema v{info['schema']})")
    print(f"label set: {info['label_set_title']} ({info['label_set']}, {_labels(len(info['labels']))}): "
          + ", ".join(info["labels"]))
    status = ", ".join(f"{k} {v}" for k, v in sorted(info["statuses"].items())) or "none"
    print(f"studies: {info['studies']} ({status})")
    per = ", ".join(f"{k} {v}" for k, v in info["boxes_per_class"].items())
    print(f"boxes: {info['boxes']}" + (f" ({per})" if per else ""))
    print(f"image labels: {info['image_labels']}")
    unmapped = info["unmapped_proposal_classes"]
    print(f"pending proposals: {info['pending_proposals']}"
          + (f" (classes not in the label set: {', '.join(unmapped)})" if unmapped else ""))


def _new(args: argparse.Namespace) -> int:
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.labelsets import get_label_set

    path = Path(args.project)
    if path.exists() and (not path.is_file() or path.stat().st_size > 0):
        return _err(f"{path}: exists already; a new project needs a new file name")
    ls = get_label_set(args.label_set)
    with AnnotationStore(path, annotator=args.annotator, label_set=ls) as store:
        print(f"created {store.path} with label set {_describe(store.label_set)}")
    return 0


def _mapping(args: argparse.Namespace) -> dict[str, str | None]:
    from cxrviewer.core.labelsets import parse_mapping

    mapping: dict[str, str | None] = dict(parse_mapping(args.map))
    mapping.update({name: None for name in args.skip})
    return mapping


def _open_for_import(args: argparse.Namespace) -> tuple[Any, bool]:
    """The project to import into and whether this import created it (``--label-set``)."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.errors import AnnotationStoreError
    from cxrviewer.core.labelsets import get_label_set

    path = Path(args.project)
    if path.exists():
        store = AnnotationStore(path, annotator=args.annotator, create=False)
        if args.label_set and get_label_set(args.label_set).name != store.label_set.name:
            store.close()
            raise AnnotationStoreError(f"the project exists with label set {store.label_set.name}; "
                                       "--label-set only applies to a new project", path=str(path))
        return store, False
    ls = get_label_set(args.label_set or "nih14")
    return AnnotationStore(path, annotator=args.annotator, label_set=ls), True


def _remove_project(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal", ".lock"))):
        p.unlink(missing_ok=True)


def _import(args: argparse.Namespace) -> int:
    from cxrviewer.core.annotations import IMPORTERS

    mapping = _mapping(args)
    fmt = IMPORT_FORMATS[args.format]
    kwargs: dict[str, Any] = {"mapping": mapping, "add_unknown": args.add_unknown}
    importer = IMPORTERS.get(fmt)
    notes: list[str] = []
    if fmt in DICOM_FORMATS:
        from cxrviewer.core.dicom_objects.exchange import import_dicom as importer
        kwargs.update(studies_dir=args.images, notes=notes)
    else:
        kwargs["images_dir"] = args.images
    store, created = _open_for_import(args)
    try:
        with store:
            before = store.label_set
            edit = importer(store, args.file, **kwargs)
            added = [lab for lab in store.label_set.labels if lab not in before.labels]
            print(f"imported {len(edit.box_ids)} box(es) from {args.file} into {store.path}"
                  + (f" (created, label set {_describe(store.label_set)})" if created else "")
                  + (f"; added to the label set: {', '.join(added)}" if added else "")
                  + "".join(f"; {n}" for n in notes))
    except BaseException:
        if created:  # a failed import leaves no new project behind
            _remove_project(Path(args.project))
        raise
    return 0


def _export(args: argparse.Namespace) -> int:
    from cxrviewer.core.annotations import AnnotationStore, export_store
    from cxrviewer.core.annotations.export import export_coco_results

    fmt = EXPORT_FORMATS[args.format]
    with AnnotationStore(args.project, read_only=True) as store:
        if fmt == "dicom-seg":
            from cxrviewer.core.seg_export import export_dicom_seg

            result = export_dicom_seg(store, args.target, results=args.results,
                                      threshold=args.threshold, run_model=not args.no_model,
                                      status=args.status)
        elif fmt in DICOM_FORMATS:
            from cxrviewer.core.dicom_objects.exchange import EXPORT_KINDS, export_dicom

            result = export_dicom(store, args.target, kinds=EXPORT_KINDS[fmt], status=args.status)
        elif fmt == "coco-results":
            out = export_coco_results(store, args.target, status=args.status, model=args.model)
        else:
            out = export_store(store, args.target, fmt, status=args.status,
                               include_identifiers=args.include_identifiers)
    if fmt not in DICOM_FORMATS:
        print(f"exported {args.format} to {out}")
        return 0
    for name, why in result.skipped:
        print(f"cxrviewer annotations: skipped {name}: {why}", file=sys.stderr)
    print(f"exported {args.format}: {result.summary()}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one action; 0 on success, 2 (and one line on stderr) on an error."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.errors import CxrError

    try:
        if args.action == "new":
            return _new(args)
        if args.action == "import":
            return _import(args)
        if args.action == "info":
            with AnnotationStore(args.project, read_only=True) as store:
                info = project_info(store)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_info(info)
            return 0
        if args.action == "export":
            return _export(args)
        with AnnotationStore(args.project, annotator=args.annotator, create=False) as store:
            before = len(store.label_set)
            ls = store.add_labels(args.names)
            print(f"label set now {_describe(ls)} ({len(ls) - before} added)")
        return 0
    except CxrError as exc:
        return _err(exc)
