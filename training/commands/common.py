"""Arguments and data set-up shared by the training sub-commands."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.labelsets import LabelSet

from ..trainers.loop import TrainConfig


def add_data_arguments(p: argparse.ArgumentParser, *, labels: bool = False) -> None:
    """The data options of the training commands (folder, cache, size, fold). ``labels``: also
    ``--annotations``/``--annotation-status``/``--label-set`` (the class list comes from the data,
    :func:`labelled_datasets`), and ``--data`` becomes optional beside ``--annotations``."""
    g = p.add_argument_group("data")
    if labels:
        g.add_argument("--data", default=None,
                       help="NIH-layout folder (real NIH or phantoms); optional with --annotations "
                            "(then only the project's images with a readable file are used)")
        g.add_argument("--annotations", default=None,
                       help="annotation project (.cxrann): the classes trained are its label set (all its "
                            "labels, in its order); its labels and accepted boxes override the folder's "
                            "for the images it knows, its other images with a readable path are added")
        g.add_argument("--annotation-status", default=None,
                       help="only studies with these review statuses, comma-separated (e.g. done,verified)")
        g.add_argument("--label-set", default=None, metavar="NAME|FILE",
                       help="without --annotations: the classes to train (a built-in set such as nih14, "
                            "torchxrayvision18, vindr-cxr, rsna-pneumonia, or a .json/.txt file); the "
                            "folder's NIH labels and boxes are mapped onto it by name and synonym, the "
                            "others reported (default nih14)")
    else:
        g.add_argument("--data", required=True, help="NIH-layout folder (real NIH or phantoms)")
    g.add_argument("--cache", default=None,
                   help="HDF5 cache (cxr-train cache); built here first if the file does not exist")
    g.add_argument("--size", type=int, default=256, help="network input size in pixels")
    g.add_argument("--align", default=None, metavar="BUNDLE",
                   help="train on the images exactly as the app feeds them: --cache is built (if missing) "
                        "by the app's alignment step with this alignment bundle (whole registered chest, "
                        "rejected alignments unaligned); an existing --cache must be an aligned one")
    g.add_argument("--fold", type=int, default=0,
                   help="held-out patient-wise fold; -1 = the official split if present")
    g.add_argument("--n-folds", type=int, default=5, help="number of patient-wise folds")
    g.add_argument("--limit", type=int, default=0, help="use only the first N records (0 = all)")
    g.add_argument("--no-augment", action="store_true", help="turn augmentation off")


def add_train_arguments(p: argparse.ArgumentParser, *, epochs: int = 5, batch_size: int = 16,
                        lr: float = 1e-4, optimizer: str = "adam", auto_workers: bool = False) -> None:
    """The training-loop options (epochs, optimiser, device, checkpoints, output bundle).
    ``auto_workers``: ``--workers`` defaults to :func:`~training.data.loader.default_workers`
    (a command whose data path gives the same batches with any number of workers), else to 0."""
    from ..data.loader import default_workers

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (per GPU)")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=optimizer,
                   help="adam, or sgd (Nesterov, momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    g.add_argument("--lr-step-epochs", type=int, default=0, help="divide the lr by 10 every N epochs (0 = never)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the split, the augmentation and the weights")
    if auto_workers:
        g.add_argument("--workers", type=int, default=None, metavar="N",
                       help="DataLoader worker processes reading the images (0 = load in the main process; "
                            f"default: half the CPU cores, at most 4 on Linux, 2 on Windows/macOS: {default_workers()} "
                            "here); the batches and the weights are the same with any number")
    else:
        g.add_argument("--workers", type=int, default=0,
                       help="DataLoader worker processes (0 = load in the main process)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (auto: the GPU when there is one)")
    g.add_argument("--run-dir", default=None,
                   help="folder for checkpoints and log.jsonl (default: OUT.run next to the bundle)")
    g.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    g.add_argument("--early-stop", type=int, default=0, metavar="N",
                   help="stop after N epochs without improvement of the validation metric (classifiers: "
                        "held-out mean AUROC; cia: localisation at IoU 0.3; segment: validation loss); the "
                        "bundle always holds the best epoch's weights (0 = train all --epochs; default 0)")
    g.add_argument("--out", required=True, help="bundle to write (*.cxrbundle)")


def train_config(args: argparse.Namespace, **extra) -> TrainConfig:
    """The loop's :class:`TrainConfig` of the training options (and the command's resolved options,
    written to the run folder as config.yaml)."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, lr_step_epochs=args.lr_step_epochs, seed=args.seed,
                       num_workers=_workers(args), device=args.device,
                       out_dir=args.run_dir or (str(args.out).rstrip("/") + ".run"), extra=extra,
                       early_stop=getattr(args, "early_stop", 0) or 0,
                       run_config=dict(getattr(args, "resolved_config", None) or {}))


def _workers(args: argparse.Namespace) -> int:
    """``--workers`` resolved (None: the platform's default); a negative count exits with one line."""
    from ..data.loader import resolve_workers

    try:
        return resolve_workers(getattr(args, "workers", 0))
    except ValueError as err:
        raise SystemExit(f"cxr-train: {err}") from None


def command_line() -> str:
    return "cxr-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def datasets(args: argparse.Namespace, *, augment: bool = True):
    """(records, train_ds, val_ds, train_records, val_records) of the NIH folder ``--data`` (the NIH 14)."""
    from ..data import load_records

    return datasets_of(args, load_records(args.data), augment=augment)


def datasets_of(args: argparse.Namespace, records: list, *, augment: bool = True,
                classes: Sequence[str] = CLASSES) -> tuple:
    """:func:`datasets` of ``records`` whose labels are in ``classes`` order (``--limit``, fold, cache)."""
    from pathlib import Path

    from ..data import AugmentConfig, CachedDataset, ChestDataset, build_cache, split_records

    if args.limit:
        records = records[: args.limit]
    try:
        train_r, val_r = split_records(records, fold=args.fold, n_folds=args.n_folds, seed=args.seed,
                                       folder=args.data)
    except ValueError as exc:
        raise SystemExit(f"cxr-train: {exc}") from None
    aug = None if (args.no_augment or not augment) else AugmentConfig()
    align = getattr(args, "align", None)
    if align and not args.cache:
        raise SystemExit("--align needs --cache (the aligned images are built into the cache once)")
    if not args.cache:
        return (records, ChestDataset(train_r, args.size, augment_cfg=aug, seed=args.seed, classes=classes),
                ChestDataset(val_r, args.size, seed=args.seed, classes=classes), train_r, val_r)
    cache = Path(args.cache)
    if not cache.is_file():
        build_cache(records, cache, args.size, align=align, classes=classes)
    ds = CachedDataset(cache)
    if ds.size != args.size:
        raise SystemExit(f"--size {args.size} but the cache {cache} holds {ds.size} px images "
                         f"(give --size {ds.size} or another --cache)")
    if tuple(ds.classes) != tuple(classes):
        raise SystemExit(f"cache {cache} holds {len(ds.classes)} other classes than the {len(classes)} trained "
                         f"(build another --cache)")
    if align and ds.alignment is None:
        raise SystemExit(f"--align: cache {cache} holds unaligned images (build a new one)")
    index = {k: i for i, k in enumerate(ds.keys)}
    missing = [r.key for r in train_r + val_r if r.key not in index]
    if missing:
        raise SystemExit(f"cache {cache} lacks {len(missing)} records of {args.data} (rebuild it)")
    return (records, CachedDataset(cache, [index[r.key] for r in train_r], augment_cfg=aug, seed=args.seed),
            CachedDataset(cache, [index[r.key] for r in val_r], seed=args.seed), train_r, val_r)


@dataclass
class TrainingData:
    """What :func:`labelled_datasets` gives a trainer: the data sets and the classes they carry."""

    records: list
    train_ds: Any
    val_ds: Any
    train_r: list
    val_r: list
    label_set: LabelSet
    annotated: Any = None  # training.data.labels.Annotated with --annotations
    dropped: Any = None  # training.data.labels.Dropped

    @property
    def classes(self) -> tuple[str, ...]:
        """The trained classes, in the order of the labels and of the model's outputs."""
        return tuple(self.label_set.labels)

    def manifest_label_set(self) -> str | dict:
        """The written bundle's manifest ``label_set``."""
        from ..data.labels import manifest_label_set

        return manifest_label_set(self.label_set)

    def provenance(self, args: argparse.Namespace) -> dict:
        """``annotations`` (project, counts, left out) and ``labels_left_out`` for the bundle's provenance."""
        out: dict = {"annotations": self.annotated.provenance(args.annotations) if self.annotated
                     else args.annotations}
        if self.dropped:
            out["labels_left_out"] = self.dropped.to_json()
        return out


def _folder_records(args: argparse.Namespace, name: str) -> list:
    """The NIH records of ``--data`` (none without it). Beside ``--annotations`` a folder that is not
    NIH-layout (no ``Data_Entry_2017*.csv``, e.g. the folder of a VinDr project's images) adds nothing,
    with a warning: the project's images are the training set."""
    import logging
    from pathlib import Path

    from cxrviewer.core.errors import CxrError

    from ..data import load_records

    if not args.data:
        return []
    folder = Path(args.data)
    if args.annotations and folder.is_dir() and not any(folder.glob("Data_Entry_2017*.csv")):
        logging.getLogger(__name__).warning(
            "--data %s is not an NIH-layout folder (no Data_Entry_2017*.csv): training on the images of "
            "%s only", folder, args.annotations)
        return []
    try:
        return load_records(folder)
    except (CxrError, FileNotFoundError) as err:
        raise SystemExit(f"{name}: --data: {err}") from err


def labelled_datasets(args: argparse.Namespace) -> TrainingData:
    """The data sets of ``--data`` and/or ``--annotations`` with the classes they carry: the project's
    label set, else ``--label-set``, else the NIH 14 (:mod:`training.data.labels`)."""
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.labelsets import NIH14, get_label_set

    from ..data.labels import Dropped, read_annotations, remap_records

    name = f"cxr-train {getattr(args, 'command', '') or ''}".rstrip()
    if not args.data and not args.annotations:
        raise SystemExit(f"{name}: give --data DIR, --annotations PROJECT, or both")
    records = _folder_records(args, name)
    annotated, dropped = None, Dropped()
    try:
        if args.annotations:
            if args.cache:
                raise SystemExit("--annotations cannot be combined with --cache (the cache holds the CSV boxes)")
            if args.label_set:
                raise SystemExit(f"{name}: --label-set: a project trains its own label set (extend it with "
                                 "'cxrviewer annotations add-labels')")
            status = [s.strip() for s in args.annotation_status.split(",")] if args.annotation_status else None
            annotated = read_annotations(records, args.annotations, status=status)
            records, label_set, dropped = annotated.records, annotated.label_set, annotated.dropped
        else:
            label_set = get_label_set(args.label_set) if args.label_set else NIH14
            records = remap_records(records, label_set, dropped)
    except CxrError as err:
        raise SystemExit(f"{name}: {err}") from err
    dropped.warn(label_set)
    if not records:
        raise SystemExit(f"{name}: no training images (the project's images need a readable file, or give --data)")
    data = datasets_of(args, records, classes=label_set.labels)
    return TrainingData(*data, label_set=label_set, annotated=annotated, dropped=dropped)


def model_kwargs(args: argparse.Namespace, classes: Sequence[str], **kwargs: Any) -> dict:
    """``--arch-kwargs`` (plus ``kwargs``) with ``num_classes`` for ``classes`` (left to the
    architecture's default for the NIH 14, so NIH runs are unchanged); a contradicting
    ``num_classes`` exits with one line."""
    out = {**kwargs, **parse_kwargs(args.arch_kwargs)}
    if tuple(classes) != tuple(CLASSES) or "num_classes" in out:
        if int(out.get("num_classes", len(classes))) != len(classes):
            raise SystemExit(f"--arch-kwargs num_classes {out['num_classes']} but the data has "
                             f"{len(classes)} classes")
        out["num_classes"] = len(classes)
    return out


def parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--arch-kwargs must be a JSON object: {err}") from err
    if not isinstance(d, dict):
        raise SystemExit("--arch-kwargs must be a JSON object")
    return d


#: help of ``--init-weights`` (each command adds what it reuses)
INIT_WEIGHTS_HELP = ("start from the weights of this model bundle (one of ours, or a torchvision/CheXNet/"
                     "torchxrayvision model made a bundle by 'cxrviewer import-model'): its backbone must be "
                     "the same (densenet121, resnet18/34/50, tiny); a 3-channel bundle's first conv is folded "
                     "to grayscale. The images are normalised as the bundle says and the written bundle "
                     "records it and the source (provenance.init_weights)")


def add_init_weights_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, reuse: str) -> None:
    """``--init-weights BUNDLE``; ``reuse`` says what this command takes from it."""
    p.add_argument("--init-weights", default=None, metavar="BUNDLE", help=f"{INIT_WEIGHTS_HELP}. {reuse}")


def init_weights(args: argparse.Namespace, model, classes: Sequence[str] | None = None):
    """Apply ``--init-weights`` to ``model`` (in place): its :class:`~training.init_weights.InitReport`,
    or None without the option. ``classes``: those trained (default the NIH 14); a bundle's head is
    reused only for the same classes. A bundle that does not fit exits with its one-line error."""
    if not getattr(args, "init_weights", None):
        return None
    import logging

    from cxrviewer.core.errors import CxrError

    from ..init_weights import init_from_bundle

    try:
        report = init_from_bundle(model, args.init_weights, classes=classes, input_size=getattr(args, "size", None))
    except CxrError as err:
        raise SystemExit(f"cxr-train {getattr(args, 'command', '')}: --init-weights: {err}") from err
    for note in report.notes:
        logging.getLogger(__name__).warning("--init-weights: %s", note)
    return report


def init_normalisation(report, *datasets) -> dict | None:
    """Make ``datasets`` feed ``report``'s normalisation; the manifest normalisation to write
    (None without ``--init-weights``: the command's own)."""
    if report is None:
        return None
    from cxrviewer.core.errors import CxrError

    from ..init_weights import apply_normalisation

    try:
        return apply_normalisation(datasets, report.normalisation)
    except CxrError as err:
        raise SystemExit(f"cxr-train: --init-weights: {err}") from err


def init_provenance(report) -> dict:
    """``{"init_weights": ...}`` for the provenance of the written bundle, or ``{}``."""
    return {"init_weights": report.provenance()} if report is not None else {}
