"""Write a bundle's model card from a ``cxr-train evaluate`` metrics.json.

    cxr-train card --bundle BUNDLE --metrics OUT/metrics.json [--method NAME] [--t-iou 0.3]
                   [--budget top1|top3|all]

The card (cxrviewer/core/model_card.py) records the evaluation's data, protocol, command and
date, AUROC per class and their mean, and per boxed class the localisation accuracy at T(IoU) of
one box method (default: the app's first proposal source among the evaluated methods that use
this bundle) beside the location prior of the same run, with n (test images with a GT box of the
class), under one box budget (default one box per class). ``below_prior`` lists the classes where
the method's accuracy is below the prior's; the viewer marks them. When the AUROC is the bundle's
own, the card also carries the ROC and precision-recall curve of every class and the reliability
diagram (``curves``, thinned to :data:`CARD_POINTS` points, 4 decimals; the model card window draws
them), the average precision per class and the ECE. The bundle must be one of the bundles the
metrics evaluated. It is written into the bundle's manifest.json (atomic; the bundle
stays loadable).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: what ``cxr-train card --help`` says
DESCRIPTION = """Write a bundle's model card from the metrics.json of cxr-train evaluate: the evaluation's
data and protocol, the AUROC per class, and for each boxed class the accuracy of one box method
beside the location prior. The card is stored in the bundle's manifest.json; the app shows it
and marks the classes where the method is below the prior. The bundle must be one that the
metrics evaluated."""
EXAMPLES = """  cxr-train card --bundle models/dm.cxrbundle --metrics eval/dm/metrics.json"""

__all__ = ["CARD_POINTS", "card_curves", "card_from_metrics"]

#: points kept per ROC / PR curve in a model card (the manifest stays small)
CARD_POINTS = 51


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluate import BUDGETS

    p.add_argument("--bundle", required=True, help="the bundle (*.cxrbundle) whose manifest gets the card")
    p.add_argument("--metrics", required=True, help="metrics.json written by cxr-train evaluate")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="the box method of the card (default: the app's first proposal source among the "
                        "evaluated methods that use the bundle)")
    p.add_argument("--t-iou", type=float, default=0.3, help="the T(IoU) of the card (default 0.3; one of the "
                   "evaluated thresholds)")
    p.add_argument("--budget", default="top1", choices=list(BUDGETS),
                   help="box budget: top1 = one box per class (default), top3, all = every proposed box")


def _error(msg: str) -> int:
    print(f"cxr-train card: {msg}", file=sys.stderr)
    return 2


def _role(metrics: Mapping[str, Any], bundle_name: str, weights_sha256: str | None) -> str:
    """The role the bundle was evaluated in: same folder name and, when both say, the same weights."""
    models = metrics.get("models") or {}
    for role, m in models.items():
        if m.get("bundle") == bundle_name:
            if weights_sha256 and m.get("weights_sha256") and m["weights_sha256"] != weights_sha256:
                raise ValueError(f"the weights of {bundle_name} are not the evaluated ones (retrained since?); "
                                 "evaluate it again")
            return role
    raise ValueError(f"the metrics did not evaluate {bundle_name} (they evaluated: "
                     f"{', '.join(m.get('bundle', '?') for m in models.values()) or 'no bundles'})")


def _method(metrics: Mapping[str, Any], role: str, method: str | None) -> str:
    """The card's box method: ``method`` checked, or the default (see the module docstring)."""
    from cxrviewer.core.explain import get_explainer
    from cxrviewer.core.panels import default_box_method

    scored = [m for m in metrics.get("methods") or {} if m != "prior"]
    if method is None:
        usable = [m for m in scored if role in get_explainer(m).requires]
        method = default_box_method(usable)
        if method is None:
            raise ValueError(f"no evaluated box method uses the {role} bundle (evaluated: "
                             f"{', '.join(scored) or 'none'}); give --method")
    if method == "prior":
        raise ValueError("the prior is the reference a card compares with; give a box method")
    if method not in scored:
        raise ValueError(f"method '{method}' is not in the metrics (evaluated: {', '.join(scored) or 'none'})")
    if role not in get_explainer(method).requires:
        raise ValueError(f"method '{method}' does not use the {role} bundle (it needs "
                         f"{', '.join(get_explainer(method).requires)})")
    return method


def _row(metrics: Mapping[str, Any], name: str, budget: str, t_key: str) -> dict[str, Any]:
    entry = (metrics.get("methods") or {}).get(name)
    if entry is None:
        raise ValueError(f"the metrics have no '{name}' rows (re-run cxr-train evaluate)")
    tab = entry.get("iou") if budget == "all" else (entry.get(budget) or {}).get("iou")
    if not tab:
        raise ValueError(f"the metrics have no {budget} tables for '{name}' (written by an older cxr-train "
                         "evaluate: re-run it)")
    if t_key not in tab:
        raise ValueError(f"T(IoU) {t_key} was not evaluated (thresholds: {', '.join(tab)})")
    return tab[t_key]


def _protocol(metrics: Mapping[str, Any], budget: str, t_key: str) -> str:
    from ..evaluate import BUDGETS, EVALUATED_IMAGES

    fold = metrics.get("fold")
    if fold == -1:
        split = "the official test_list.txt"
    elif fold == "all":
        split = (f"every image tested, each image's prior and floor from the other folds ({metrics.get('n_folds')} "
                 f"patient-wise folds, seed {metrics.get('seed')})")
    else:
        split = f"patient-wise fold {fold} of {metrics.get('n_folds')} held out (seed {metrics.get('seed')})"
    return (f"{split}; the app's pipeline with maps at {metrics.get('map_size', '?')} px as cxrviewer analyze; "
            f"T(IoU) {t_key}, {BUDGETS[budget][1]}; {EVALUATED_IMAGES}; prior: {metrics.get('prior_source', '?')}")


def _caveat(metrics: Mapping[str, Any], role: str, provenance: Mapping[str, Any]) -> str | None:
    """A warning when the evaluated images may include the bundle's own training images."""
    fold, trained = metrics.get("fold"), provenance.get("fold")
    if fold == "all":
        return "every image is a test image: a model trained on this data has seen most of them (optimistic)"
    if isinstance(fold, int) and fold >= 0 and isinstance(trained, int) and (
            trained != fold or provenance.get("n_folds") not in (None, metrics.get("n_folds"))):
        return (f"the {role} bundle was trained with fold {trained} of {provenance.get('n_folds')} held out, this "
                f"evaluation holds out fold {fold} of {metrics.get('n_folds')}: it tests on training images "
                "(optimistic)")
    return None


def _auroc(metrics: Mapping[str, Any], role: str) -> dict[str, Any]:
    """AUROC of the card: only when the evaluated probabilities are this bundle's own."""
    source = metrics.get("auroc_role", "classifier")
    if role == source:
        return {"auroc": metrics.get("auroc"), "mean_auroc": metrics.get("mean_auroc")}
    other = (metrics.get("models") or {}).get(source, {}).get("bundle", source)
    return {"auroc": None, "mean_auroc": None,
            "auroc_note": f"the pipeline's probabilities are the {source} bundle's ({other}), not this bundle's"}


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def card_curves(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The curves of the card from metrics.json's ``curves`` (thinned to :data:`CARD_POINTS`
    points, rounded to 4 decimals; the areas as computed on every point, the ROC's the table's
    AUROC); None without."""
    from cxrviewer.core.curves import thin_curves

    curves = metrics.get("curves")
    if not isinstance(curves, Mapping) or not curves.get("roc"):
        return None
    thin = thin_curves(curves, CARD_POINTS)
    keep = {k: v for k, v in thin.items() if k in ("roc", "pr")}
    keep["calibration"] = {"all": thin["calibration"]["all"]} if "all" in thin["calibration"] else {}
    out = _round(keep)
    for kind, area in (("roc", "auc"), ("pr", "ap")):
        for c, r in out[kind].items():
            r[area] = curves[kind][c].get(area)
    if "all" in out["calibration"]:
        out["calibration"]["all"]["ece"] = curves["calibration"]["all"].get("ece")
    for c, v in (metrics.get("auroc") or {}).items():  # the table's AUROC (equal to the ROC area up to rounding)
        if c in out["roc"]:
            out["roc"][c]["auc"] = v
    return out


def card_from_metrics(metrics: Mapping[str, Any], bundle_name: str, *, method: str | None = None,
                      t_iou: float = 0.3, budget: str = "top1", weights_sha256: str | None = None,
                      provenance: Mapping[str, Any] | None = None, command: str = "") -> dict[str, Any]:
    """The model card (cxrviewer/core/model_card.py layout) of bundle ``bundle_name`` (folder name;
    ``weights_sha256`` checked against the evaluated weights when given) from an evaluate
    ``metrics``; ``provenance``: the bundle's, to warn when it was trained on test images.
    Raises ``ValueError`` when the metrics cannot give the card asked for."""
    from ..evaluate import BUDGETS

    role = _role(metrics, bundle_name, weights_sha256)
    method = _method(metrics, role, method)
    t_key = f"{t_iou:g}"
    mine, prior = _row(metrics, method, budget, t_key), _row(metrics, "prior", budget, t_key)
    floor = (metrics.get("floor_iou") or {}).get(t_key) or {}
    per_class = {}
    for c in metrics.get("boxed_classes") or list(mine):
        per_class[c] = {"method": mine[c]["acc"], "prior": prior[c]["acc"], "n": mine[c]["n"],
                        "method_afp": mine[c]["afp"], "prior_afp": prior[c]["afp"]}
        if c in floor:
            per_class[c]["floor"] = floor[c]["acc"]
    below = [c for c, r in per_class.items()
             if isinstance(r["method"], (int, float)) and isinstance(r["prior"], (int, float))
             and r["method"] < r["prior"]]
    card: dict[str, Any] = {
        "data": f"{metrics.get('data', '?')}: {metrics.get('n_images', '?')} test images, "
                f"{metrics.get('n_boxed_images', '?')} with ground-truth boxes",
        "protocol": _protocol(metrics, budget, t_key),
        "command": metrics.get("command", ""), "card_command": command, "date": metrics.get("date", ""),
        **_auroc(metrics, role),
        "localisation": {"t_iou": t_iou, "budget": BUDGETS[budget][1].split(" (")[0], "method": method,
                         "method_title": metrics["methods"][method].get("title", method),
                         "prior_title": metrics["methods"]["prior"].get("title", "prior"), "per_class": per_class},
        "below_prior": below,
    }
    if card.get("auroc") is not None:
        curves = card_curves(metrics)
        if curves is not None:
            card["curves"] = curves
            card["average_precision"] = metrics.get("average_precision") or {c: r.get("ap")
                                                                            for c, r in curves["pr"].items()}
            card["ece"] = metrics.get("ece", (curves["calibration"].get("all") or {}).get("ece"))
    caveat = _caveat(metrics, role, provenance or {})
    if caveat:
        card["caveat"] = caveat
    return card


def run(args: argparse.Namespace) -> int:
    from cxrviewer.core.bundle import read_manifest
    from cxrviewer.core.errors import CxrError
    from cxrviewer.core.model_card import write_model_card

    try:
        manifest = read_manifest(args.bundle)
        metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        command = "cxr-train " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
        card = card_from_metrics(metrics, Path(args.bundle).name, method=args.method, t_iou=args.t_iou,
                                 budget=args.budget, weights_sha256=manifest.weights_sha256,
                                 provenance=manifest.provenance, command=command)
        path = write_model_card(args.bundle, card)
    except (CxrError, OSError, ValueError, KeyError) as exc:
        return _error(f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc))
    print(json.dumps({"manifest": str(path), "method": card["localisation"]["method"],
                      "mean_auroc": card["mean_auroc"], "below_prior": card["below_prior"]}))
    return 0
