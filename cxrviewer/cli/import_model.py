"""Turn a checkpoint into a model bundle the app and ``cxrviewer analyze`` load.

    cxrviewer import-model CHECKPOINT --format {torchxrayvision,chexnet,torchvision,timm}
        [--arch NAME] [--classes NAME ...] [--label-set NAME|FILE] [--input-size N]
        [--allow-pickle] [--overwrite] --out BUNDLE

The conversion lives in :mod:`cxrviewer.core.importers`. Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import sys

#: what ``cxrviewer import-model --help`` says
DESCRIPTION = """Convert a checkpoint into a cxrviewer model bundle (BUNDLE.cxrbundle): torchxrayvision
DenseNet-121s, CheXNet-style DenseNet-121 checkpoints, torchvision classifiers (ResNet, DenseNet,
EfficientNet, ConvNeXt, ...) and timm classifiers. The manifest records the format, the
checkpoint's file name and SHA-256, its source labels and how to preprocess images. Checkpoints
are read as tensors only (torch weights_only or .safetensors); a pickled checkpoint (a whole
model saved with torch.save(model)) can run code when loaded and is refused unless you pass
--allow-pickle, which unpickles it in a separate process."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cxrviewer import-model``."""
    from cxrviewer.core.importers import FORMATS

    p.add_argument("checkpoint", help="checkpoint file (.pt/.pth/.pth.tar/.bin or .safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="where the checkpoint comes from")
    p.add_argument("--arch", default=None,
                   help="network name: torchvision (resnet50, densenet121, efficientnet_b0, convnext_tiny, ...) or "
                        "timm (resnet18, efficientnet_b0, ...); torchxrayvision/chexnet: densenet121 (default)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="output class names in order (default: the format's labels; required for torchvision/timm "
                        "unless --label-set has as many labels as the head has outputs)")
    p.add_argument("--label-set", default=None, metavar="NAME|FILE",
                   help="label set of the classes: nih14, torchxrayvision18, vindr-cxr, rsna-pneumonia or a .json/.txt "
                        "file (default: the format's, else guessed from the classes)")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="network input side in pixels (default: 224, or timm's for the model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickled checkpoint (it can run code; unpickled in a separate process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--out", required=True, help="bundle folder to write (.cxrbundle is appended if absent)")


def run(args: argparse.Namespace) -> int:
    """Import one checkpoint; 0 on success, 2 with a one-line error otherwise."""
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.importers import import_checkpoint

    if args.input_size is not None and not 8 <= args.input_size <= 4096:
        print(f"error: --input-size must be 8..4096, got {args.input_size}", file=sys.stderr)
        return 2
    try:
        path = import_checkpoint(args.checkpoint, args.fmt, args.out, arch=args.arch, classes=args.classes,
                                 label_set=args.label_set, allow_pickle=args.allow_pickle,
                                 input_size=args.input_size, overwrite=args.overwrite,
                                 warn=lambda msg: print(msg, file=sys.stderr))
    except CxrError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(path)
    return 0
