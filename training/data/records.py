"""Training records from an NIH ChestX-ray14-layout folder (the real data set or phantoms).

A :class:`Record` is what a trainer needs of one image: where it is, its image-level
labels, its ground-truth boxes (original pixels) and its patient. :func:`load_records` gives
the NIH 14; :mod:`training.data.labels` maps records onto another label set (an annotation
project's, ``--label-set``).
Splits are patient-wise so no patient is in two folds (Wang et al. 2017 split
by patient too); the official ``train_val_list.txt`` / ``test_list.txt`` are
used when the folder has them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrviewer.core.classes import CLASSES
from cxrviewer.core.geometry import Box

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One training image."""

    path: Path
    key: str
    labels: np.ndarray  # float32 [C] in the training classes' order (NIH CLASSES from load_records), 1 = present
    boxes: list[Box] = field(default_factory=list)
    patient_id: str = ""

    @property
    def is_normal(self) -> bool:
        return not bool(np.any(self.labels > 0))


def load_records(folder: str | Path, *, require_images: bool = True) -> list[Record]:
    """Read an NIH-layout folder (``images/`` + ``Data_Entry_2017*.csv`` + ``BBox_List_2017.csv``); labels
    in NIH :data:`~cxrviewer.core.classes.CLASSES` order."""
    from cxrviewer.core.io import read_nih_folder

    wl = read_nih_folder(folder)
    out: list[Record] = []
    for ref in wl:
        labels = np.zeros(len(CLASSES), np.float32)
        for name, v in (ref.labels or {}).items():
            if name in CLASSES and v:
                labels[CLASSES.index(name)] = 1.0
        out.append(Record(Path(ref.path), ref.key, labels, list(ref.gt_boxes), ref.patient_id or ref.key))
    if require_images and not out:
        raise FileNotFoundError(f"{folder}: no images matched the label file")
    log.info("%s: %d records, %d with boxes, %d normal", folder, len(out),
             sum(bool(r.boxes) for r in out), sum(r.is_normal for r in out))
    return out


def _patient_hash(pid: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "little")


def patient_folds(records: list[Record], n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per record; every image of a patient lands in the same fold.

    Patients are ordered by a seeded hash and dealt round-robin, so folds have
    near-equal patient counts and the assignment is stable across runs.
    """
    pids = sorted({r.patient_id for r in records}, key=lambda p: _patient_hash(p, seed))
    fold_of = {p: i % n_folds for i, p in enumerate(pids)}
    return np.array([fold_of[r.patient_id] for r in records], dtype=np.int64)


def official_split(folder: str | Path, records: list[Record]) -> tuple[list[Record], list[Record]] | None:
    """(train_val, test) from the release's ``train_val_list.txt``/``test_list.txt``, if present."""
    folder = Path(folder)
    tv, te = folder / "train_val_list.txt", folder / "test_list.txt"
    if not (tv.is_file() and te.is_file()):
        return None
    test_keys = {Path(line.strip()).stem for line in te.read_text().splitlines() if line.strip()}
    train = [r for r in records if r.key not in test_keys]
    test = [r for r in records if r.key in test_keys]
    return train, test


def split_records(records: list[Record], *, fold: int = 0, n_folds: int = 5, seed: int = 0,
                  folder: str | Path | None = None) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records: the official split when ``fold < 0`` (the folder must have it),
    else patient-wise fold ``fold`` of ``n_folds`` held out. A request that cannot be met raises
    ``ValueError`` (never a silent other split)."""
    if fold < 0:
        off = official_split(folder, records) if folder is not None else None
        if off is None:
            raise ValueError(f"--fold {fold} needs the official train_val_list.txt / test_list.txt"
                             + (f" in {folder}" if folder is not None else "") + "; use --fold N")
        return off
    if n_folds < 2 or not 0 <= fold < n_folds:
        raise ValueError(f"--fold {fold} is not one of 0..{n_folds - 1} (--n-folds {n_folds}; at least 2)")
    folds = patient_folds(records, n_folds, seed)
    train = [r for r, f in zip(records, folds) if f != fold]
    held = [r for r, f in zip(records, folds) if f == fold]
    return train, held
