"""The 14 NIH ChestX-ray14 classes, in the order of every tensor axis and file."""
from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASSES)

#: The eight classes with official boxes in BBox_List_2017.csv.
BOXED_CLASSES: tuple[str, ...] = CLASSES[:8]

#: Classes whose disease masks are flip-symmetrised (disease-masks Eq. 3): the
#: seven boxed classes that can occur in either lung. Cardiomegaly is not.
SYMMETRIC_CLASSES: tuple[str, ...] = tuple(c for c in BOXED_CLASSES if c != "Cardiomegaly")

#: Spellings seen in the NIH release mapped to the canonical class name.
ALIASES: dict[str, str] = {
    "Infiltrate": "Infiltration",
    "Pleural Thickening": "Pleural_Thickening",
    "Pleural_thickening": "Pleural_Thickening",
}

NO_FINDING = "No Finding"


def canonical(name: str) -> str:
    """Return the canonical class name for ``name`` (raises ``KeyError`` if unknown)."""
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in CLASSES:
        raise KeyError(name)
    return name


def index(name: str) -> int:
    """Axis index of a class name (aliases accepted)."""
    return CLASSES.index(canonical(name))
