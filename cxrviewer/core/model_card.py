"""A bundle's model card: its evaluation, carried in ``manifest.json`` under ``model_card``.

Written by ``cxr-train card`` (training/commands/card.py) from the ``metrics.json`` of
``cxr-train evaluate``, an evaluation of the app's own pipeline; read by the GUI's Models panel
and by the panel titles / panels.png, which mark every class whose maps did not beat the
location prior ("below the location prior"). The layout (every key optional except
``localisation.per_class`` for :func:`below_prior`)::

    {"data": "../shared/data/nih: 235 test images, 85 with ground-truth boxes",
     "protocol": "patient-wise fold 0 of 5 held out (seed 0); ... maps at 256 px; T(IoU) 0.3, one box ...",
     "command": "cxr-train evaluate ...", "card_command": "cxr-train card ...", "date": "2026-12-03T...",
     "auroc": {class: float | None}, "mean_auroc": float,   # None, with "auroc_note", when the
                                                            # probabilities were another bundle's
     "localisation": {"t_iou": 0.3, "budget": "one box per class", "method": "cam",
                      "method_title": str, "prior_title": str,
                      "per_class": {class: {"method": float | None, "prior": float | None, "n": int,
                                            "method_afp": float | None, "prior_afp": float | None,
                                            "floor": float | None}}},
     "below_prior": [class, ...],
     "caveat": "..."}   # only when the test images may include the bundle's training images

``below_prior`` is derived from ``localisation.per_class`` when absent (:func:`below_prior`);
``n`` is the number of test images with a ground-truth box of the class (accuracy and AFP are
over those images), ``prior`` the location prior learned from the evaluated fold's training boxes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from .atomic import mkstemp_beside

if TYPE_CHECKING:
    from cxrviewer.core.bundle import Manifest

__all__ = ["BELOW_PRIOR", "below_prior", "card_lines", "model_card", "write_model_card"]

#: the words shown beside a class whose maps did not beat the prior
BELOW_PRIOR = "below the location prior"


def model_card(manifest: "Manifest | Mapping[str, Any] | None") -> dict[str, Any] | None:
    """The card of a manifest (or of a manifest dict); None when it has none."""
    if manifest is None:
        return None
    card = manifest.get("model_card") if isinstance(manifest, Mapping) else manifest.model_card
    return dict(card) if isinstance(card, Mapping) else None


def below_prior(manifest: "Manifest | Mapping[str, Any] | None") -> frozenset[str]:
    """The classes whose map boxes scored below the prior in the card (empty without a card)."""
    card = model_card(manifest)
    if not card:
        return frozenset()
    if isinstance(card.get("below_prior"), list):
        return frozenset(str(c) for c in card["below_prior"])
    per = (card.get("localisation") or {}).get("per_class") or {}
    out = set()
    for c, row in per.items():
        m, p = (row or {}).get("method"), (row or {}).get("prior")
        if isinstance(m, (int, float)) and isinstance(p, (int, float)) and m < p:
            out.add(str(c))
    return frozenset(out)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def card_lines(manifest: "Manifest | Mapping[str, Any] | None") -> list[str]:
    """The card as plain-text lines for a viewer (``["No model card."]`` without one)."""
    card = model_card(manifest)
    if not card:
        return ["No model card: this bundle carries no evaluation."]
    lines = [f"{k.capitalize()}: {card[k]}" for k in ("data", "protocol", "command", "date", "caveat") if card.get(k)]
    if card.get("auroc_note"):
        lines.append(f"AUROC: none on this card ({card['auroc_note']})")
    if card.get("mean_auroc") is not None:
        lines.append(f"Mean AUROC: {_fmt(card['mean_auroc'])}")
    for c, v in (card.get("auroc") or {}).items():
        lines.append(f"  AUROC {c}: {_fmt(v)}")
    loc = card.get("localisation") or {}
    if loc.get("per_class"):
        lines.append(f"Localisation ({loc.get('method', '?')}, T(IoU) {loc.get('t_iou', '?')}, "
                     f"{loc.get('budget', 'one box per class')}): method / prior")
        low = below_prior(manifest)
        for c, row in loc["per_class"].items():
            mark = f"  ({BELOW_PRIOR})" if c in low else ""
            lines.append(f"  {c}: {_fmt(row.get('method'))} / {_fmt(row.get('prior'))}"
                         f" (n={row.get('n', '?')}){mark}")
    return lines


def write_model_card(bundle: str | os.PathLike, card: Mapping[str, Any]) -> Path:
    """Put ``card`` into the bundle's ``manifest.json`` (atomic replace; other files untouched).

    The manifest is validated before and after (``read_manifest``), so a card never makes a
    bundle unreadable. Returns the manifest path.
    """
    from cxrviewer.core.bundle import MANIFEST, read_manifest

    folder = Path(bundle)
    read_manifest(folder)
    path = folder / MANIFEST
    d = json.loads(path.read_text(encoding="utf-8"))
    d["model_card"] = json.loads(json.dumps(dict(card)))  # JSON-able, a plain copy
    fd, tmp = mkstemp_beside(folder / "manifest.json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(d, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    read_manifest(folder)
    return path
