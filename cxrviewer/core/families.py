"""The model families a bundle or a registered network belongs to (no torch import)."""
from __future__ import annotations

FAMILIES: tuple[str, ...] = ("classifier", "alignment", "cia", "segmentation")
