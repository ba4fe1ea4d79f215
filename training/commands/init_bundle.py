"""Write an untrained (random-weight) model bundle for any registered architecture.

    cxr-train init-bundle --arch msa --kwargs '{"backbone": "tiny"}' --out resources/models/msa --input-size 256
    cxr-train init-bundle --arch cia --out models/cia --normals ../shared/data/nih/images --bank-size 64

The manifest says ``"trained": false`` and ``"research_demo": true`` and
references the canonical chest (``--canonical``, default
``resources/canonical_chest.png`` when present). For a ``cia`` bundle a normal
bank (images at the input size as uint8, their 16x16 hash codes, their ids) is
stored in ``extras.npz``: from ``--normals`` images when given, else jittered
copies of the canonical chest, else chest-like phantoms (both marked
``synthetic`` in the manifest's ``extras_info``). Hash codes are computed on images in [0, 1]
before normalisation (the pipeline does the same for the query image).
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrviewer.core.bundle import save_bundle
from cxrviewer.core.canonical import canonical_ref, default_canonical_path
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.errors import CxrError

#: what ``cxr-train init-bundle --help`` says
DESCRIPTION = """Write an untrained model bundle (random weights) for any registered architecture, to try the
app's pipeline and panels before a model is trained. The bundle's manifest says it is untrained
and a research demo. A CIA-Net bundle also gets a bank of normal images for pairing: from
--normals when given, otherwise synthetic ones (jittered copies of the canonical chest, or
chest-like phantoms)."""
EXAMPLES = """  cxr-train init-bundle --arch msa --kwargs '{"backbone": "tiny"}' --input-size 256 --out models/msa
  cxr-train init-bundle --arch cia --normals NIH/images --bank-size 64 --out models/cia"""

log = logging.getLogger(__name__)


def _class_names(model: torch.nn.Module) -> tuple[str, ...]:
    fam = getattr(model, "family", "")
    if fam == "alignment":
        return ()
    if fam == "segmentation":
        names = getattr(model, "classes", None)
        if names:
            return tuple(names)
        from cxrviewer.core.models import SEGMENTATION_CLASSES

        return tuple(SEGMENTATION_CLASSES)
    n = getattr(model, "num_classes", None) or (getattr(model, "arch_kwargs", {}) or {}).get("num_classes")
    n = int(n) if n else len(CLASSES)
    return tuple(CLASSES[:n]) if n <= len(CLASSES) else tuple(f"class_{i}" for i in range(n))


def synthetic_normals(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``n`` chest-like phantoms ``[n, size, size]`` uint8 (bright body, dark lungs, noise).

    Stand-ins for a normal bank when no normal images are given; never mistaken
    for real data (the manifest marks them ``synthetic``).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        j = rng.normal(0, 0.02, 8)
        img = 0.15 + 0.55 * ((((xx - 0.5) / (0.42 + j[0])) ** 2 + ((yy - 0.55) / (0.5 + j[1])) ** 2) < 1)
        for side in (-1, 1):
            cx = 0.5 + side * (0.19 + j[2])
            lung = (((xx - cx) / (0.14 + j[3])) ** 2 + ((yy - (0.48 + j[4])) / (0.3 + j[5])) ** 2) < 1
            img = np.where(lung, 0.25 + 0.05 * yy, img)
        heart = (((xx - (0.55 + j[6])) / 0.13) ** 2 + ((yy - (0.66 + j[7])) / 0.12) ** 2) < 1
        img = np.where(heart, 0.65, img)
        img = img + rng.normal(0, 0.03, img.shape)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def _load_normals(folder: Path, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    from cxrviewer.core.io import load_study, open_worklist
    from cxrviewer.core.preprocess import as_image_tensor, resize

    wl = open_worklist([folder])
    imgs, ids = [], []
    for ref in wl.refs:
        if len(imgs) >= n:
            break
        if ref.labels is not None and any(ref.labels.values()):
            continue  # NIH folders: "No Finding" images only
        try:
            st = load_study(ref.path)
        except CxrError as exc:
            log.warning("normal bank: skipped %s", exc)
            continue
        t = resize(as_image_tensor(st.model_input).clamp(0, 1), (size, size))
        imgs.append(np.clip(t[0, 0].numpy() * 255 + 0.5, 0, 255).astype(np.uint8))
        ids.append(Path(ref.path).stem)
    if not imgs:
        raise CxrError(f"no readable normal images in {folder}")
    return np.stack(imgs), ids


def default_canonical() -> Path | None:
    """``resources/canonical_chest.png`` when it exists (written by ``cxr-train canonical``)."""
    p = default_canonical_path()
    return p if p.is_file() else None


def canonical_normals(canonical: str | Path, n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``n`` jittered copies ``[n, size, size]`` uint8 of the canonical chest (small affine + noise)."""
    from PIL import Image

    from cxrviewer.core.models.alignment import affine_matrix, warp

    with Image.open(canonical) as im:
        base = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    rng = np.random.default_rng(seed)
    t = torch.from_numpy(base)[None, None]
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        j = rng.normal(0, 1, 5)
        params = torch.tensor([[1 + 0.04 * j[0], 1 + 0.04 * j[1], 0.03 * j[2], 0.03 * j[3], 0.03 * j[4]]],
                              dtype=torch.float32)
        img = warp(t, affine_matrix(params), padding_mode="border")[0, 0].numpy()
        img = img + rng.normal(0, 0.02, img.shape)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def normal_bank(size: int, *, normals: str | Path | None = None, n: int = 16, seed: int = 0,
                canonical: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Extras arrays of a CIA normal bank and their description for ``extras_info``.

    From ``normals`` images when given; else jittered copies of the ``canonical``
    chest when there is one; else synthetic phantoms. The last two are marked
    ``"synthetic": true``.
    """
    from cxrviewer.core.models.cia import hash_codes

    if normals is not None:
        images, ids = _load_normals(Path(normals), n, size)
        info = {"synthetic": False, "source": str(normals), "count": len(ids)}
    elif canonical is not None:
        images = canonical_normals(canonical, n, size, seed=seed)
        ids = [f"canonical_jitter_{i:03d}" for i in range(n)]
        info = {"synthetic": True, "source": f"canonical chest {Path(canonical).name} + affine jitter + noise",
                "count": n}
    else:
        images = synthetic_normals(n, size, seed=seed)
        ids = [f"synthetic_{i:03d}" for i in range(n)]
        info = {"synthetic": True, "source": "synthetic chest phantoms (init-bundle)", "count": n}
    codes = hash_codes(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]).numpy().astype(np.float32)
    return ({"normal_bank_images": images, "normal_bank_codes": codes,
             "normal_bank_ids": np.asarray(ids, dtype=str)}, {"normal_bank": info})


def init_bundle(arch: str, out: str | Path, *, kwargs: dict[str, Any] | None = None, input_size: int = 256,
                normals: str | Path | None = None, bank_size: int = 16, seed: int = 0,
                name: str | None = None, overwrite: bool = False, command: str | None = None,
                canonical: str | Path | None | bool = None) -> Path:
    """Build ``arch`` with random weights (seeded) and save it as a bundle at ``out``.

    ``canonical``: canonical chest image to reference in the manifest (and to
    synthesise a CIA bank from); ``None`` = ``resources/canonical_chest.png`` if
    present; ``False`` = none.
    """
    from cxrviewer.core.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, **(kwargs or {}))
    canon = default_canonical() if canonical is None else (Path(canonical) if canonical else None)
    extras: dict[str, np.ndarray] = {}
    extras_info: dict[str, Any] = {}
    norm = {"kind": "minus1_1"}
    if model.family == "cia":
        extras, extras_info = normal_bank(input_size, normals=normals, n=bank_size, seed=seed, canonical=canon)
        # the bank's M- precomputed as `cxr-train cia` writes it, so the app pairs without an encoder pass
        from training.trainers.cia import with_bank_attention

        extras = with_bank_attention(model.eval(), extras, input_size, norm)
    prov = {
        "command": command or f"init_bundle({arch!r}, kwargs={kwargs!r}, input_size={input_size})",
        "seed": seed,
        "trained": False,
        "research_demo": True,
        "data": str(normals) if normals else None,
        "epochs": 0,
        "metrics": {},
        "licence_notes": "random weights, no training data; for tests and demos only",
    }
    return save_bundle(model, out, classes=_class_names(model), input_size=input_size,
                       normalisation=norm, name=name,
                       canonical_chest=canonical_ref(canon) if canon is not None else None,
                       description=f"untrained {model.arch} ({model.arch_kwargs.get('backbone', '')})",
                       extras=extras or None, extras_info=extras_info, provenance=prov,
                       overwrite=overwrite)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="registry name or alias (e.g. msa, resnet50, tiny_cia, unet)")
    p.add_argument("--kwargs", default="{}", help="JSON object of architecture kwargs, e.g. '{\"backbone\": \"tiny\"}'")
    p.add_argument("--out", required=True, help="bundle path (.cxrbundle is appended if missing)")
    p.add_argument("--input-size", type=int, default=512, help="network input size in pixels (default 512)")
    p.add_argument("--normals", default=None, help="folder of normal images for a CIA bank (default: synthetic)")
    p.add_argument("--bank-size", type=int, default=16, help="number of normal images in a CIA bank")
    p.add_argument("--canonical", default=None,
                   help="canonical chest image to reference (default resources/canonical_chest.png if present)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and the synthetic bank")
    p.add_argument("--name", default=None, help="bundle name shown in the GUI (default: folder stem)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("must be a JSON object")
    except ValueError as exc:
        print(f"cxr-train init-bundle: --kwargs is not a JSON object: {exc}", file=sys.stderr)
        return 2
    try:
        path = init_bundle(args.arch, args.out, kwargs=kwargs, input_size=args.input_size,
                           normals=args.normals, bank_size=args.bank_size, seed=args.seed,
                           name=args.name, overwrite=args.overwrite, canonical=args.canonical,
                           command="cxr-train " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except CxrError as exc:
        print(f"cxr-train init-bundle: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
