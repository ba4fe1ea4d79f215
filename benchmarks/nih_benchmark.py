"""The NIH benchmark: 5-fold patient-wise CV of everything the app shows, beside the prior.

    python benchmarks/nih_benchmark.py [--data ../shared/data/nih] --fold-models '/work/cv/fold{k}'
        [--n-folds 5] [--map-size 512] [--evidence FILE] [--write-localiser resources/priors/anatomy_localiser.json]

``--fold-models``: the models folder of each fold k (a classifier trained without fold k, e.g. by
benchmarks/nih_classifier_cv.py, plus the alignment and segmentation bundles). For every fold k:

1. evidence (pass 1, cached in ``--evidence``): every study of the folder is run through the app's
   pipeline with its own held-out fold's models (``cxr-train localiser`` does the same), giving the
   classifier's probabilities as the app computes them (AUROC over all studies) and the anatomy
   explainer's evidence;
2. the anatomy-guided localiser is fitted on the other folds' studies (training/localiser.py);
3. fold k's boxed studies are evaluated with ``training.evaluate.evaluate_pipeline``: the app's
   pipeline with fold k's models, the fitted localiser and the location prior of the other folds'
   boxes, every box method scored, one box per class and top-3, T(IoU) 0.1-0.7.

Per method, class and threshold the mean and std over folds are written to
benchmarks/results/nih_benchmark.json and the tables to docs/nih-benchmark.md (the prose around
them is kept between the markers). With ``--write-localiser`` the localiser fitted on every fold's
evidence (calibrated for fold 0's classifier, the one shipped) is written for the app.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import write_report  # noqa: E402

THRESHOLDS = ("0.1", "0.3", "0.5", "0.7")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--fold-models", required=True, metavar="PATTERN")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--map-size", type=int, default=512, help="maps of the scored pass (default 512, as analyze)")
    ap.add_argument("--evidence-map-size", type=int, default=256)
    ap.add_argument("--evidence", default=None, help="JSON cache of pass 1 (written when missing)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--write-localiser", default=None, metavar="JSON")
    ap.add_argument("--write-cards", default=None, metavar="DIR",
                    help="model cards from the CV into the bundles of DIR that are fold 0's (same weights): the "
                         "classifier (CAM boxes, AUROC) and the segmentation (anatomy-guided boxes)")
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "nih_benchmark.json"))
    ap.add_argument("--out-md", default=str(REPO / "docs" / "nih-benchmark.md"))
    return ap.parse_args()


def _evidence(args: argparse.Namespace, records: list, refs: list) -> list:
    """Pass 1 (see the module docstring), read from / written to ``--evidence``."""
    from dataclasses import asdict

    from training.commands.localiser import pipelines
    from training.localiser import Sample, collect_evidence

    path = Path(args.evidence) if args.evidence else None
    if path is not None and path.is_file():
        return [Sample(**d) for d in json.loads(path.read_text())]
    ns = argparse.Namespace(models=args.fold_models.replace("{k}", "0"), fold_models=args.fold_models,
                            n_folds=args.n_folds, seed=args.seed, map_size=args.evidence_map_size,
                            device=args.device)
    pipeline_for, _ = pipelines(ns, records)
    samples = collect_evidence(pipeline_for, refs, progress=lambda i, n, k: i % 100 == 0 and print(
        f"evidence {i}/{n}", flush=True))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(s) for s in samples]))
    return samples


def _auroc(samples: list, fold_of: dict[str, int], n_folds: int) -> dict[str, Any]:
    """Per-class AUROC of the app's probabilities per held-out fold, mean and std over folds."""
    from cxrviewer.core.explain.metrics import auroc_per_class

    classes = samples[0].classes
    per_fold = []
    for k in range(n_folds):
        rows = [s for s in samples if fold_of[s.key] == k and s.probabilities is not None]
        probs = np.array([s.probabilities for s in rows])
        labels = np.array([[s.labels.get(c, 0) > 0 for c in classes] for s in rows], float)
        per_fold.append({c: float(v) if np.isfinite(v) else None
                         for c, v in zip(classes, auroc_per_class(probs, labels))})
    out = {}
    for c in classes:
        vals = [f[c] for f in per_fold if f.get(c) is not None and f[c] == f[c]]
        out[c] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None}
    means = [float(np.nanmean([v for v in f.values() if v is not None])) for f in per_fold]
    return {"per_class": out, "mean_auroc": {"mean": float(np.mean(means)), "std": float(np.std(means)),
                                             "folds": means}, "n_studies": sum(s.probabilities is not None
                                                                               for s in samples)}


def _fold_eval(args: argparse.Namespace, k: int, samples: list, fold_of: dict[str, int], refs: list) -> dict:
    """Fit on the other folds, evaluate fold k's boxed studies through the app's pipeline."""
    from cxrviewer.core.bundle import find_bundles, load_bundle
    from cxrviewer.core.device import select_device
    from cxrviewer.core.pipeline import Pipeline
    from cxrviewer.core.roles import assign_roles
    from training.commands.evaluate import fraction_boxes, pixel_boxes
    from training.evaluate import evaluate_pipeline
    from training.localiser import fit_localiser

    dev = select_device(args.device)
    bundles = assign_roles([load_bundle(p, device=dev.device) for p in find_bundles(args.fold_models.replace(
        "{k}", str(k)))])
    train = [s for s in samples if fold_of[s.key] != k]
    clf = bundles.get("classifier")
    model = fit_localiser([s for s in train if s.boxes], calibration=train,
                          classifier_sha256=clf.manifest.weights_sha256 if clf else None,
                          provenance={"fold": k, "name": f"localiser fitted without fold {k}"})
    model["name"] = f"anatomy localiser (folds != {k})"
    train_refs = [r for r in refs if fold_of[r.key] != k]
    pipe = Pipeline(bundles, dev, map_max_side=args.map_size, options={"anatomy_model": model})
    test = [r for r in refs if fold_of[r.key] == k and r.gt_boxes]
    t0 = time.perf_counter()
    res = evaluate_pipeline(pipe, test, train_boxes=[b for r in train_refs for b in pixel_boxes(r)],
                            prior_boxes=[b for r in train_refs for b in fraction_boxes(r)],
                            prior_title="prior (median box of the other folds)",
                            progress=lambda i, n, key: i % 25 == 0 and print(f"fold {k}: {i}/{n}", flush=True))
    res["seconds"] = time.perf_counter() - t0
    res["localiser"] = {c: {"anchor": v["sym"]["anchor"], "side": v["side"] is not None}
                        for c, v in model["classes"].items()}
    return res


def _aggregate(folds: list[dict]) -> dict[str, Any]:
    """Per method, budget, class and threshold: mean and std of the accuracy and AFP over folds."""
    out: dict[str, Any] = {}
    for name in folds[0]["methods"]:
        out[name] = {"title": folds[0]["methods"][name].get("title", name)}
        for budget, tab in folds[0]["methods"][name].items():
            if not isinstance(tab, dict) or "iou" not in tab:
                continue
            out[name][budget] = _agg_table([f["methods"][name][budget]["iou"] for f in folds])
    for extra in ("floor",):
        if extra in folds[0] and isinstance(folds[0][extra], dict) and "iou" in folds[0][extra]:
            out[extra] = {"title": "floor (median training box)", "one": _agg_table([f[extra]["iou"] for f in folds])}
    return out


def _agg_table(tabs: list[dict]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for t in THRESHOLDS:
        row: dict[str, Any] = {}
        for c in tabs[0].get(t, {}):
            accs = [tb[t][c]["acc"] for tb in tabs if tb.get(t, {}).get(c, {}).get("acc") is not None]
            afps = [tb[t][c]["afp"] for tb in tabs if tb.get(t, {}).get(c, {}).get("afp") is not None]
            row[c] = {"acc": float(np.mean(accs)) if accs else None, "acc_std": float(np.std(accs)) if accs else None,
                      "afp": float(np.mean(afps)) if afps else None,
                      "n": int(sum(tb.get(t, {}).get(c, {}).get("n") or 0 for tb in tabs))}
        res[t] = row
    return res


def _md(result: dict[str, Any]) -> str:
    """The tables of docs/nih-benchmark.md (between the markers)."""
    from cxrviewer.core.classes import BOXED_CLASSES

    agg, lines = result["localisation"], _summary(result)
    names = [n for n in agg if n not in ("floor",)] + (["floor"] if "floor" in agg else [])
    for budget, label in (("top1", "one box per class"), ("top3", "top-3 boxes per class")):
        for t in ("0.3", "0.5", "0.1", "0.7"):
            lines += ["", f"### T(IoU) = {t}, {label}: accuracy (mean ± std over folds), AFP", "",
                      "| method | " + " | ".join(BOXED_CLASSES) + " | mean | AFP |",
                      "|---" * (len(BOXED_CLASSES) + 3) + "|"]
            for n in names:
                tab = agg[n].get(budget if n != "floor" else "one")
                if not tab:
                    continue
                row = tab[t]
                cells = [f"{row[c]['acc']:.2f} ± {row[c]['acc_std']:.2f}" if row.get(c, {}).get("acc") is not None
                         else "–" for c in BOXED_CLASSES]
                accs = [row[c]["acc"] for c in BOXED_CLASSES if row.get(c, {}).get("acc") is not None]
                afps = [row[c]["afp"] for c in BOXED_CLASSES if row.get(c, {}).get("afp") is not None]
                lines.append(f"| {agg[n]['title']} | " + " | ".join(cells)
                             + f" | **{np.mean(accs):.3f}** | {np.mean(afps):.2f} |")
            first = agg[names[0]].get(budget, {}).get(t, {})
            lines.append("| n (boxed test images, all folds) | " + " | ".join(
                str(first.get(c, {}).get("n", "–")) for c in BOXED_CLASSES) + " | | |")
            if budget == "top1":
                lines += _paper_rows(t)
    au = result["auroc"]
    lines += ["", f"### Classifier AUROC as the app runs it ({au['n_studies']} studies, each scored by its "
              "held-out fold's classifier)", "", "| class | AUROC (mean ± std over folds) |", "|---|---|"]
    lines += [f"| {c} | {v['mean']:.3f} ± {v['std']:.3f} |" if v["mean"] is not None else f"| {c} | – |"
              for c, v in au["per_class"].items()]
    lines.append(f"| **mean** | **{au['mean_auroc']['mean']:.3f} ± {au['mean_auroc']['std']:.3f}** |")
    from _nih_paper_numbers import PAPERS

    for p in PAPERS:
        if p.get("auroc"):
            lines.append(f"| *{p['name']}: mean* | *{p['auroc']['Mean']:.2f}* |")
    return "\n".join(lines) + "\n"


def _summary(result: dict[str, Any]) -> list[str]:
    """The default box method against the prior and the classifier's mean AUROC, in words."""
    from cxrviewer.core.classes import BOXED_CLASSES
    from cxrviewer.core.panels import default_box_method

    agg = result["localisation"]
    name = default_box_method(agg) or ""
    if name not in agg or "prior" not in agg:
        return []

    def mean(n: str, t: str) -> float:
        return float(np.mean([agg[n]["top1"][t][c]["acc"] for c in BOXED_CLASSES]))

    worst = min(BOXED_CLASSES, key=lambda c: agg[name]["top1"]["0.3"][c]["acc"] - agg["prior"]["top1"]["0.3"][c]["acc"])
    d = agg[name]["top1"]["0.3"][worst]["acc"] - agg["prior"]["top1"]["0.3"][worst]["acc"]
    car = agg[name]["top1"]["0.5"]["Cardiomegaly"]
    au = result["auroc"]["mean_auroc"]
    return [f"- Default box method ({agg[name]['title']}), one box per class, mean over the 8 boxed classes: "
            f"**{mean(name, '0.3'):.3f}** at T(IoU)=0.3 (prior {mean('prior', '0.3'):.3f}), "
            f"**{mean(name, '0.5'):.3f}** at 0.5 (prior {mean('prior', '0.5'):.3f}).",
            f"- Largest shortfall against the prior at 0.3: {worst} {d:+.3f}.",
            f"- Cardiomegaly at T(IoU)=0.5: {car['acc']:.2f} ± {car['acc_std']:.2f}.",
            f"- Classifier as the app runs it: mean AUROC {au['mean']:.3f} ± {au['std']:.3f} over folds "
            f"(per fold {', '.join(f'{v:.3f}' for v in au['folds'])}).", ""]


def _paper_rows(t: str) -> list[str]:
    """The papers' rows at T(IoU) ``t`` (benchmarks/_nih_paper_numbers.py), in italics: their own data and
    protocols (full NIH, ~100x ours), context and not a like-for-like comparison."""
    from _nih_paper_numbers import PAPERS

    rows = []
    for p in PAPERS:
        vals = (p.get("iou") or {}).get(t)
        if vals:
            rows.append(f"| *{p['name']}* | " + " | ".join(f"*{v:.2f}*" for v in vals[:8]) + f" | *{vals[8]:.2f}* | |")
    return rows


def _write_md(path: Path, tables: str, header: str) -> None:
    """Replace the generated part of ``path`` (between the markers), keeping the prose."""
    start, end = "<!-- generated by benchmarks/nih_benchmark.py -->", "<!-- end generated -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else f"# NIH benchmark\n\n{start}\n{end}\n"
    if start not in old:
        old = old.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = old.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + start + "\n" + header + "\n" + tables + end + tail, encoding="utf-8")


def main() -> int:
    args = _args()
    from cxrviewer.core.io import read_nih_folder
    from training.data import load_records, patient_folds

    t0 = time.perf_counter()
    records = load_records(args.data)
    fold_of = {r.key: int(f) for r, f in zip(records, patient_folds(records, args.n_folds, args.seed))}
    refs = read_nih_folder(args.data)
    samples = _evidence(args, records, refs)
    folds = []
    for k in range(args.n_folds):
        folds.append(_fold_eval(args, k, samples, fold_of, refs))
        print(f"fold {k} done ({folds[-1]['seconds']:.0f} s)", flush=True)
    result = {"command": "python benchmarks/nih_benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "data": args.data, "n_folds": args.n_folds, "seed": args.seed, "map_size": args.map_size,
              "auroc": _auroc(samples, fold_of, args.n_folds), "localisation": _aggregate(folds),
              "localiser": [f["localiser"] for f in folds], "folds": folds,
              "wall_s": time.perf_counter() - t0}
    if args.write_localiser:
        _ship_localiser(args, samples)
    if args.write_cards:
        _write_cards(args, result)
    write_report(result, Path(args.out_json))
    header = (f"Generated by `{result['command']}` on {time.strftime('%Y-%m-%d')} "
              f"({result['wall_s'] / 60:.0f} min on the CPU).")
    _write_md(Path(args.out_md), _md(result), header)
    return 0


def _ship_localiser(args: argparse.Namespace, samples: list) -> None:
    """The localiser for the app: every fold's evidence, calibrated for fold 0's (shipped) classifier."""
    from cxrviewer.core.bundle import find_bundles, read_manifest
    from training.commands.localiser import _write_json
    from training.localiser import fit_localiser

    sha = next((read_manifest(p).weights_sha256 for p in find_bundles(args.fold_models.replace("{k}", "0"))
                if read_manifest(p).family == "classifier"), None)
    model = fit_localiser([s for s in samples if s.boxes], calibration=samples, classifier_sha256=sha,
                          provenance={"command": "python benchmarks/nih_benchmark.py --write-localiser",
                                      "data": "NIH ChestX-ray14 (../shared/data/nih): every study, evidence "
                                              "from its held-out fold's classifier",
                                      "fold_models": args.fold_models})
    _write_json(Path(args.write_localiser), model)



#: the box method whose CV numbers go on the card of the bundle serving a role
CARD_METHODS = {"classifier": "cam", "segmentation": "anatomy"}


def _write_cards(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A model card (cxrviewer/core/model_card.py) for each bundle of ``--write-cards`` whose weights are
    fold 0's bundle of a role in :data:`CARD_METHODS`: the 5-fold numbers of that recipe."""
    from cxrviewer.core.bundle import find_bundles, read_manifest
    from cxrviewer.core.classes import BOXED_CLASSES
    from cxrviewer.core.model_card import write_model_card

    fold0 = {read_manifest(p).weights_sha256: read_manifest(p).family
             for p in find_bundles(args.fold_models.replace("{k}", "0"))}
    loc = result["localisation"]
    for path in find_bundles(args.write_cards):
        m = read_manifest(path)
        role = fold0.get(m.weights_sha256)
        method = CARD_METHODS.get(role or "")
        if method is None or method not in loc:
            continue
        row = loc[method]["top1"]["0.3"]
        prior = loc["prior"]["top1"]["0.3"]
        per = {c: {"method": row[c]["acc"], "prior": prior[c]["acc"], "n": row[c]["n"]} for c in BOXED_CLASSES if c in row}
        card: dict[str, Any] = {
            "data": f"NIH ChestX-ray14, {result['auroc']['n_studies']} images ({args.data})",
            "protocol": f"{args.n_folds}-fold patient-wise CV of this recipe (this bundle is fold 0's model), the "
                        f"app's pipeline, maps at {args.map_size} px, one box per class, mean over folds",
            "command": result["command"], "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "localisation": {"t_iou": 0.3, "budget": "one box per class", "method": method, "per_class": per},
            "below_prior": sorted(c for c, v in per.items() if v["method"] is not None and v["prior"] is not None
                                  and v["method"] < v["prior"])}
        if role == "classifier":
            card["auroc"] = {c: v["mean"] for c, v in result["auroc"]["per_class"].items()}
            card["mean_auroc"] = result["auroc"]["mean_auroc"]["mean"]
        write_model_card(path, card)
        print(f"model card: {path.name} ({method}; below the prior: {', '.join(card['below_prior']) or 'none'})")


if __name__ == "__main__":
    raise SystemExit(main())
