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


#: One colour per class (CLASSES order), distinct on a grey radiograph; labels are drawn on it
#: with :func:`text_colour` (black or white, whichever reads better).
CLASS_COLOURS: tuple[str, ...] = ("#ff595e", "#ffca3a", "#8ac926", "#1982c4", "#6a4c93", "#ff924c", "#52d1dc",
                                  "#f15bb5", "#00f5d4", "#fee440", "#9b5de5", "#c5d86d", "#f4a261", "#e76f51")


def class_colour(name: str) -> str:
    """The class's colour (``#rrggbb``); an unknown name gets a stable one of the palette."""
    idx = CLASSES.index(name) if name in CLASSES else sum(map(ord, name))
    return CLASS_COLOURS[idx % len(CLASS_COLOURS)]


def _rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def relative_luminance(colour: str) -> float:
    """WCAG 2 relative luminance of ``#rrggbb`` (0 black .. 1 white)."""
    def lin(v: int) -> float:
        s = v / 255.0
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(v) for v in _rgb(colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two ``#rrggbb`` colours (1 .. 21; text needs >= 4.5)."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(background: str) -> str:
    """``#000000`` or ``#ffffff``, whichever contrasts more with ``background`` (always >= 4.58:1)."""
    return max(("#000000", "#ffffff"), key=lambda t: contrast_ratio(t, background))


def lighten_to_contrast(colour: str, background: str, ratio: float = 4.5) -> str:
    """``colour`` mixed with white just enough to reach ``ratio`` against a dark ``background``."""
    r, g, b = _rgb(colour)
    for step in range(0, 21):
        f = step / 20.0
        mixed = "#{:02x}{:02x}{:02x}".format(*(round(v + (255 - v) * f) for v in (r, g, b)))
        if contrast_ratio(mixed, background) >= ratio:
            return mixed
    return "#ffffff"
