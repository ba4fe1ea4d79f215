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
     "curves": {"roc": {class: {"fpr": [...], "tpr": [...], "auc", "n_pos", "n_neg"}},   # only when the
                "pr": {class: {"recall": [...], "precision": [...], "ap", "prevalence"}},  # AUROC is the
                "calibration": {"all": {"bin_edges", "mean_predicted", "fraction_positive",  # bundle's own
                                        "count", "ece"}}},
     "average_precision": {class: float | None}, "ece": float,
     "caveat": "..."}   # only when the test images may include the bundle's training images

``curves`` (written by ``cxr-train card`` from ``cxr-train evaluate``'s curves, thinned) are what
the model card window draws; :func:`card_curves` returns them checked (a malformed curve is
dropped, never an error). ``below_prior`` is derived from ``localisation.per_class`` when absent (:func:`below_prior`);
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

__all__ = ["BELOW_PRIOR", "below_prior", "card_curves", "card_lines", "model_card", "write_model_card"]

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


def _points(xs: Any, ys: Any) -> tuple[list[float | None], list[float | None]] | None:
    """Two equally long lists of numbers (None allowed: a gap), else None."""
    if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) or not xs:
        return None
    ok = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in xs + ys)
    return (list(xs), list(ys)) if ok else None


def card_curves(manifest: "Manifest | Mapping[str, Any] | None") -> dict[str, dict[str, dict[str, Any]]]:
    """The card's curves, checked: ``{"roc": {class: {"x", "y", "area"}}, "pr": {...},
    "calibration": {"all": {"x", "y", "area" (the ECE), "count"}}}`` (x/y: FPR/TPR, recall/precision,
    mean predicted/fraction positive); a kind or class whose points are malformed is left out,
    and a card without curves gives empty kinds."""
    out: dict[str, dict[str, dict[str, Any]]] = {"roc": {}, "pr": {}, "calibration": {}}
    curves = (model_card(manifest) or {}).get("curves")
    if not isinstance(curves, Mapping):
        return out
    spec = {"roc": ("fpr", "tpr", "auc"), "pr": ("recall", "precision", "ap"),
            "calibration": ("mean_predicted", "fraction_positive", "ece")}
    for kind, (xk, yk, area) in spec.items():
        per = curves.get(kind)
        for c, r in (per.items() if isinstance(per, Mapping) else ()):
            pts = _points(r.get(xk), r.get(yk)) if isinstance(r, Mapping) else None
            if pts is None:
                continue
            a = r.get(area)
            out[kind][str(c)] = {"x": pts[0], "y": pts[1], "area": a if isinstance(a, (int, float)) else None}
            if kind == "calibration":
                out[kind][str(c)]["count"] = r.get("count")
            if kind == "pr":
                out[kind][str(c)]["prevalence"] = r.get("prevalence")
    return out


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
    aps = card.get("average_precision") or {}
    for c, v in (card.get("auroc") or {}).items():
        lines.append(f"  AUROC {c}: {_fmt(v)}" + (f"   average precision {_fmt(aps[c])}" if c in aps else ""))
    if card.get("ece") is not None:
        lines.append(f"Calibration: expected calibration error {_fmt(card['ece'])} (reliability diagram, 10 bins)")
    have = [k for k, v in card_curves({"model_card": card}).items() if v]
    if have:
        lines.append("Curves: " + ", ".join({"roc": "ROC", "pr": "precision-recall", "calibration": "reliability"}[k]
                                             for k in have) + " (the tabs of the model card window)")
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
