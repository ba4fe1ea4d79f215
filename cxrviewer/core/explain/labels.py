"""Which of a model's classes the NIH-only parts know (Qt-free).

The anatomy localiser, the shipped location prior and the pseudo disease masks' regions are
built from the NIH ChestX-ray14 boxes, so they exist for NIH classes only. A model with another
label set (torchxrayvision's 18, VinDr-CXR, a user's) names its classes its own way: a class is
an NIH class when :data:`~cxrviewer.core.labelsets.NIH14` knows its name (spelling, case or a
synonym: ``Infiltrate`` is Infiltration); every other class gets no anatomy box, no prior box and
no pseudo mask, and the viewer says why (:data:`NIH_ONLY`).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from cxrviewer.core.labelsets import NIH14

__all__ = ["NIH_ONLY", "names_text", "nih_lookup", "nih_name", "with_article"]

#: why an NIH-only method has nothing for a class outside the NIH set
NIH_ONLY = "NIH classes only"

V = TypeVar("V")


def nih_name(name: str) -> str | None:
    """The NIH ChestX-ray14 class ``name`` stands for (its spelling, case or synonym); None if none."""
    return NIH14.canonical(name)


def nih_lookup(table: Mapping[str, V], name: str) -> V | None:
    """``table[name]``, else the entry of the NIH class ``name`` stands for (None: neither)."""
    if name in table:
        return table[name]
    nih = nih_name(name)
    return table.get(nih) if nih is not None else None


def with_article(words: str) -> str:
    """``a classifier`` / ``an alignment``: ``words`` with its indefinite article."""
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def names_text(names: Collection[Any], limit: int = 6) -> str:
    """``A, B, C`` (at most ``limit`` names, then ``and N more``)."""
    names = [str(n) for n in names]
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")
