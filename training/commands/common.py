"""Arguments and data set-up shared by the training sub-commands."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..trainers.loop import TrainConfig


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data options of the training commands (folder, cache, size, fold)."""
    g = p.add_argument_group("data")
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
                        lr: float = 1e-4, optimizer: str = "adam") -> None:
    """The training-loop options (epochs, optimiser, device, checkpoints, output bundle)."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (per GPU)")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=optimizer,
                   help="adam, or sgd (Nesterov, momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    g.add_argument("--lr-step-epochs", type=int, default=0, help="divide the lr by 10 every N epochs (0 = never)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the split, the augmentation and the weights")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0 = load in the main process)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (auto: the GPU when there is one)")
    g.add_argument("--run-dir", default=None,
                   help="folder for checkpoints and log.jsonl (default: OUT.run next to the bundle)")
    g.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    g.add_argument("--out", required=True, help="bundle to write (*.cxrbundle)")


def train_config(args: argparse.Namespace, **extra) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, lr_step_epochs=args.lr_step_epochs, seed=args.seed,
                       num_workers=args.workers, device=args.device,
                       out_dir=args.run_dir or (str(args.out).rstrip("/") + ".run"), extra=extra)


def command_line() -> str:
    return "cxr-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def datasets(args: argparse.Namespace, *, augment: bool = True):
    """(records, train_ds, val_ds, train_records, val_records) for the requested fold."""
    from pathlib import Path

    from ..data import AugmentConfig, CachedDataset, ChestDataset, build_cache, load_records, split_records

    records = load_records(args.data)
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
    if args.cache:
        cache = Path(args.cache)
        if not cache.is_file():
            build_cache(records, cache, args.size, align=align)
        ds = CachedDataset(cache)
        if ds.size != args.size:
            raise SystemExit(f"--size {args.size} but the cache {cache} holds {ds.size} px images "
                             f"(give --size {ds.size} or another --cache)")
        if align and ds.alignment is None:
            raise SystemExit(f"--align: cache {cache} holds unaligned images (build a new one)")
        index = {k: i for i, k in enumerate(ds.keys)}
        missing = [r.key for r in train_r + val_r if r.key not in index]
        if missing:
            raise SystemExit(f"cache {cache} lacks {len(missing)} records of {args.data} (rebuild it)")
        train_ds = CachedDataset(cache, [index[r.key] for r in train_r], augment_cfg=aug, seed=args.seed)
        val_ds = CachedDataset(cache, [index[r.key] for r in val_r], seed=args.seed)
    else:
        train_ds = ChestDataset(train_r, args.size, augment_cfg=aug, seed=args.seed)
        val_ds = ChestDataset(val_r, args.size, seed=args.seed)
    return records, train_ds, val_ds, train_r, val_r


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


def init_weights(args: argparse.Namespace, model):
    """Apply ``--init-weights`` to ``model`` (in place): its :class:`~training.init_weights.InitReport`,
    or None without the option. A bundle that does not fit exits with its one-line error."""
    if not getattr(args, "init_weights", None):
        return None
    import logging

    from cxrviewer.core.errors import CxrError

    from ..init_weights import init_from_bundle

    try:
        report = init_from_bundle(model, args.init_weights, input_size=getattr(args, "size", None))
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
