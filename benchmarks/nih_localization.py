"""Real NIH weakly supervised localisation: patient-wise k-fold CV, ours beside the papers and the floor.

    python benchmarks/nih_localization.py --config cpu [--folds 0,1,2,3,4] [--cache /tmp/nih_160.h5]
    python benchmarks/nih_localization.py --config gpu --device cuda --cache /data/nih_512.h5
    python benchmarks/nih_localization.py --config cpu --report-only      (rebuild the doc from fold files)

For every held-out fold (patients never shared between folds, ``training.data.patient_folds``,
seed 0) each method is trained on the other folds and scored on the held-out images:

- ``cam``: the baseline CAM classifier (ChestX-ray8 / baseline-cam-space-attention-gated.txt,
  weighted BCE on image labels), boxes from the CAM at the ChestX-ray8 threshold;
- ``cia0`` / ``cia40`` / ``cia80``: CIA-Net (cia-net-alignment-contrast-attention.txt Eq. 4-6)
  trained on image labels plus the boxes of 0 / 40 / 80 % of the *training folds'* boxed images
  (the held-out fold's boxes are never seen), boxes from the grid of positive cells;
- ``am`` (gpu config): attention mining boxes from the CAM classifier's features.

Localisation accuracy at T(IoU) 0.1..0.7 per boxed class (and T(IoBB)) is pooled over the
folds (hits / boxed images), AUROC is mean +- std over folds, and the model-free floor (the
median training box per class, scored the same way) sits beside every table. One JSON per
fold goes to ``--out-dir`` as soon as the fold ends, then ``docs/nih-training-benchmark.md`` is
rewritten from all fold files present, so a partial run always leaves a (labelled) partial doc.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IOU_SHOWN = ("0.1", "0.3", "0.5", "0.7")

#: The two configurations. cpu: <= 90 min for 5 folds on a laptop-class CPU; gpu: the papers' scale
#: of network and input (ResNet-50, 512 px) on our 1,222 images.
CONFIGS: dict[str, dict] = {
    "cpu": {"size": 224, "batch_size": 16, "methods": ["cam", "cia0", "cia40", "cia80"],
            "cam": {"arch_kwargs": {"backbone": "tiny"}, "epochs": 10, "lr": 1e-3, "lr_step_epochs": 8},
            "cia": {"arch_kwargs": {"backbone": "tiny", "head_channels": 32, "share_encoder": True},
                    "epochs": 6, "lr": 3e-3, "lr_step_epochs": 5, "optimizer": "adam", "weight_decay": 0.0}},
    "gpu": {"size": 512, "batch_size": 16, "methods": ["cam", "am", "cia0", "cia40", "cia80"],
            "cam": {"arch_kwargs": {"backbone": "resnet50"}, "epochs": 20, "lr": 1e-4, "lr_step_epochs": 10},
            "cia": {"arch_kwargs": {"backbone": "resnet50"}, "epochs": 15, "lr": 1e-3, "lr_step_epochs": 5,
                    "optimizer": "sgd", "weight_decay": 1e-4}},
}

METHOD_NAMES = {"cam": "ours: baseline CAM", "am": "ours: attention-mining boxes (CAM model)",
                "cia0": "ours: CIA-Net 0% boxes", "cia40": "ours: CIA-Net 40% boxes",
                "cia80": "ours: CIA-Net 80% boxes", "floor": "floor: median training box"}

#: The registered explainer whose box rule gives each method's boxes (cxrviewer/core/explain/).
EXPLAINER = {"cam": "cam", "am": "attention_mining", "cia": "contrast"}

# ---- the papers' own numbers (T(IoU) -> 8 boxed classes in BOXED_CLASSES order + mean) ----------
# Order: Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule, Pneumonia, Pneumothorax, Mean.
# None = not reported. Filled from /work/shared/papers/*.txt; "source" says which table/row.
PAPERS: list[dict] = []


def _paper_rows():
    try:
        from benchmarks import _nih_paper_numbers as p  # type: ignore
    except Exception:  # noqa: BLE001 - the numbers are optional for the run itself
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import _nih_paper_numbers as p  # type: ignore
        except Exception:  # noqa: BLE001
            return PAPERS
    return list(getattr(p, "PAPERS", PAPERS))


# ---- running one fold -------------------------------------------------------------------------
def run_fold(f: int, args, conf: dict, records, folds, cache: Path, tmp: Path) -> dict:
    import torch

    from cxrviewer.core.models import create_model
    from training.data import AugmentConfig, CachedDataset
    from training.evaluate import evaluate_model
    from training.trainers.classify import train_classifier
    from training.trainers.loop import TrainConfig

    ds_all = CachedDataset(cache)
    row = {k: i for i, k in enumerate(ds_all.keys)}
    tr = [row[r.key] for r, k in zip(records, folds) if k != f]
    te = [row[r.key] for r, k in zip(records, folds) if k == f]
    if args.limit:  # smoke test: a few training images, boxed test images first
        te = sorted(te, key=lambda i: not ds_all.boxes_of(i))
        tr, te = tr[:args.limit], te[:max(args.limit // 3, 20)]
    train_ds = CachedDataset(cache, tr, augment_cfg=AugmentConfig(), seed=0)
    test_ds = CachedDataset(cache, te, seed=0)
    train_boxes = [b for i in range(len(train_ds)) for b in train_ds.boxes_of(i)]
    out = {"fold": f, "n_train": len(tr), "n_test": len(te),
           "n_test_boxed": sum(bool(test_ds.boxes_of(i)) for i in range(len(test_ds))),
           "n_train_boxed": sum(bool(train_ds.boxes_of(i)) for i in range(len(train_ds))), "methods": {}}
    cam_model = None
    for m in conf["methods"]:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        if m in ("cam", "am"):
            c = conf["cam"]
            if cam_model is None:
                model = create_model("cam_classifier", **c["arch_kwargs"])
                cfg = TrainConfig(epochs=args.epochs or c["epochs"], batch_size=conf["batch_size"], lr=c["lr"],
                                  lr_step_epochs=c.get("lr_step_epochs", 0), seed=0, log_every=0,
                                  device=args.device, out_dir=str(tmp / f"f{f}_cam"))
                cam_model, _ = train_classifier(model, train_ds, None, cfg)
            train_s = time.perf_counter() - t0
            res = evaluate_model(cam_model, test_ds, method=EXPLAINER[m], train_boxes=train_boxes)
        elif m.startswith("cia"):
            from types import SimpleNamespace

            from training.trainers.cia import bank_negatives, train_cia

            c = conf["cia"]
            frac = int(m[3:]) / 100.0
            model = create_model("cia", **c["arch_kwargs"])
            cfg = TrainConfig(epochs=args.epochs or c["epochs"], batch_size=conf["batch_size"], lr=c["lr"],
                              lr_step_epochs=c["lr_step_epochs"], optimizer=c["optimizer"],
                              weight_decay=c["weight_decay"], seed=0, log_every=0, device=args.device,
                              out_dir=str(tmp / f"f{f}_{m}"))
            model, _, extras, info = train_cia(model, train_ds, None, cfg, box_fraction=frac)
            train_s = time.perf_counter() - t0
            bank = SimpleNamespace(extras=extras, manifest=SimpleNamespace(normalisation={"kind": "minus1_1"}),
                                   path="")
            res = evaluate_model(model, test_ds, method=EXPLAINER["cia"], train_boxes=train_boxes,
                                 negatives=bank_negatives(bank, test_ds))
            res["cia_info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
        else:
            raise SystemExit(f"unknown method {m!r}")
        res["train_s"] = train_s
        res["total_s"] = time.perf_counter() - t0
        out["methods"][m] = res
        mean03 = _mean_row(res["iou"]["0.3"])
        print(f"fold {f} {m}: AUROC {_f(res['mean_auroc'])}, loc acc T(IoU)=0.3 mean {mean03:.3f} "
              f"({res['total_s']:.0f} s)", flush=True)
    return out


def _mean_row(row: dict) -> float:
    vals = [v["acc"] for v in row.values() if v.get("n") and v.get("acc") is not None]
    return float(np.mean(vals)) if vals else float("nan")


# ---- pooling over folds -----------------------------------------------------------------------
def pool(fold_results: list[dict], method: str, key: str = "iou") -> dict:
    """``{threshold: {class: {"acc", "n"}}}`` pooled over folds (hits / boxed images)."""
    from cxrviewer.core.classes import BOXED_CLASSES

    out: dict = {}
    for fr in fold_results:
        res = fr["methods"].get(method if method != "floor" else next(iter(fr["methods"])))
        if res is None:
            continue
        tab = res["floor_" + key] if method == "floor" else res[key]
        for t, row in tab.items():
            for c in BOXED_CLASSES:
                v = row[c]
                cell = out.setdefault(t, {}).setdefault(c, {"hits": 0.0, "fps": 0.0, "n": 0})
                if v["n"]:
                    cell["hits"] += v["acc"] * v["n"]
                    cell["fps"] += (v.get("afp") or 0.0) * v["n"]
                    cell["n"] += v["n"]
    for row in out.values():
        for cell in row.values():
            cell["acc"] = cell["hits"] / cell["n"] if cell["n"] else None
            cell["afp"] = cell["fps"] / cell["n"] if cell["n"] else None
    return out


def auroc_summary(fold_results: list[dict], method: str) -> dict:
    from cxrviewer.core.classes import CLASSES

    per = [fr["methods"][method] for fr in fold_results if method in fr["methods"]]
    summ = {}
    for c in CLASSES:
        vals = [p["auroc"][c] for p in per if p["auroc"][c] is not None]
        summ[c] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None}
    means = [p["mean_auroc"] for p in per if p["mean_auroc"] is not None]
    summ["Mean"] = {"mean": float(np.mean(means)) if means else None, "std": float(np.std(means)) if means else None}
    return summ


# ---- report -----------------------------------------------------------------------------------
def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _row_vals(tab: dict, t: str) -> list:
    from cxrviewer.core.classes import BOXED_CLASSES

    accs = [tab[t][c]["acc"] for c in BOXED_CLASSES]
    vals = [a for a in accs if a is not None]
    return accs + [float(np.mean(vals)) if vals else None]


def write_doc(summary: dict, out_md: Path, papers: list[dict]) -> None:
    from cxrviewer.core.classes import BOXED_CLASSES, CLASSES

    conf_name, n_done, n_folds = summary["config"], len(summary["folds_done"]), summary["n_folds"]
    methods = summary["methods"]
    for m in methods:  # a method missing from some folds is labelled with the folds it ran on
        if len(summary.get("method_folds", {}).get(m, summary["folds_done"])) < n_done:
            METHOD_NAMES[m] = f"{METHOD_NAMES.get(m, m)} (folds {summary['method_folds'][m]} only)"
    short = ["Atel.", "Card.", "Eff.", "Infil.", "Mass", "Nod.", "Pneumonia", "Pneumothx", "Mean"]
    partial = n_done < n_folds
    md = ["# Training-path NIH benchmark: networks trained and scored in their input space "
          "(benchmarks/nih_localization.py)", "",
          "What the app shows is measured by benchmarks/nih_benchmark.py (docs/nih-benchmark.md); this "
          "benchmark trains the papers' networks per fold and scores them without the app's pipeline.", ""]
    if partial:
        rest = ",".join(str(f) for f in range(n_folds) if f not in summary["folds_done"])
        md += [f"> **PARTIAL RUN: {n_done} of {n_folds} folds ran** (folds {summary['folds_done']}); this is "
               f"*not* the full `{conf_name}` config. The numbers below are pooled over the folds that ran only. "
               f"Run the rest with `{summary['resume_command'].replace('FOLDS', rest)}` (fold files are kept in "
               f"`{summary['out_dir_rel']}`, the doc is rebuilt from all of them).", ""]
    md += [f"Command: `{summary['command']}`  ",
           f"Config `{conf_name}`: {json.dumps(summary['conf'])}  ",
           f"Data: `{summary['data']}` — {summary['n_images']} images, {summary['n_boxed']} with official boxes, "
           f"{summary['n_patients']} patients, {n_folds} patient-wise folds (seed 0)  ",
           f"Folds completed: {n_done} of {n_folds}; wall time of the folds that ran: "
           f"{summary['wall_s'] / 60:.1f} min on {summary['device']} (`OMP_NUM_THREADS`="
           f"{summary['omp_threads']}, a 2-core machine shared with other jobs)", "",
           "Each held-out fold is scored with models trained on the other folds only; CIA-Net's box "
           "supervision (0/40/80 %) is drawn from the training folds' boxed images, never the test fold's. "
           "Accuracy = boxed test images whose class box is hit by a predicted box at IoU > T, pooled over "
           "the folds (the papers' definition, ChestX-ray8 Sec. 5; CIA-Net Sec. 4.2). The floor is the "
           "median training box of each class placed on every test image: a localiser that does not "
           "look at the image. **Our data is ~1 % of the papers' (1,222 vs 112,120 images; 421 vs "
           "880 boxed images) and the CPU config uses a tiny network at 224 px, so this is the honest gap and "
           "its trend, not a reproduction.**", "",
           "Paper rows are quoted from the papers as published (their own splits, data sizes and "
           "evaluation protocols, which differ — see the notes under each source); they are context, not "
           "a like-for-like comparison.", ""]
    for t in IOU_SHOWN:
        md += [f"## Localisation accuracy at T(IoU) = {t}", "",
               "| model | " + " | ".join(short) + " |", "|---|" + "---|" * len(short)]
        for m in methods:
            tab = summary["pooled"][m]["iou"]
            md.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(_f(v) for v in _row_vals(tab, t)) + " |")
        md.append(f"| {METHOD_NAMES['floor']} | "
                  + " | ".join(_f(v) for v in _row_vals(summary["pooled"]["floor"]["iou"], t)) + " |")
        for p in papers:
            vals = p["iou"].get(t)
            if vals:
                md.append(f"| *{p['name']}* | " + " | ".join(_f(v) for v in vals) + " |")
        n_row = summary["pooled"]["floor"]["iou"][t]
        md += ["| n (our boxed test images) | " + " | ".join(str(n_row[c]["n"]) for c in BOXED_CLASSES) + " | |", ""]
    # trend over all thresholds: mean accuracy
    ths = list(summary["pooled"]["floor"]["iou"].keys())
    md += ["## Mean accuracy over the eight classes at every T(IoU) (the trend)", "",
           "| model | " + " | ".join(ths) + " |", "|---|" + "---|" * len(ths)]
    for m in list(methods) + ["floor"]:
        tab = summary["pooled"][m]["iou"]
        md.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(_f(_row_vals(tab, t)[-1]) for t in ths) + " |")
    for p in papers:
        md.append(f"| *{p['name']}* | " + " | ".join(_f(p["iou"][t][-1]) if p["iou"].get(t) else "–"
                                                     for t in ths) + " |")
    md += ["", "## Average false positives per boxed image at T(IoU) = 0.3 (AFP, ChestX-ray8 / AM Table 2)", "",
           "AFP 0 together with accuracy 0 means the method proposed no box at all for that class.", "",
           "| model | " + " | ".join(short) + " |", "|---|" + "---|" * len(short)]
    for m in list(methods) + ["floor"]:
        row = summary["pooled"][m]["iou"]["0.3"]
        afps = [row[c]["afp"] for c in BOXED_CLASSES]
        vals = [a for a in afps if a is not None]
        md.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(_f(a) for a in afps + [float(np.mean(vals))
                                                                                     if vals else None]) + " |")
    md += ["", "## Localisation accuracy at T(IoBB) (ChestX-ray8's second metric), mean over classes", "",
           "| model | " + " | ".join(summary["pooled"]["floor"]["iobb"].keys()) + " |",
           "|---|" + "---|" * len(summary["pooled"]["floor"]["iobb"])]
    for m in list(methods) + ["floor"]:
        tab = summary["pooled"][m]["iobb"]
        md.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(_f(_row_vals(tab, t)[-1]) for t in tab) + " |")
    md += ["", "## AUROC per class (mean ± std over folds)", "",
           "| model | " + " | ".join(c.replace("_", " ") for c in CLASSES) + " | Mean |",
           "|---|" + "---|" * (len(CLASSES) + 1)]
    for m in methods:
        s = summary["auroc"][m]
        md.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(
            "–" if s[c]["mean"] is None else f"{s[c]['mean']:.2f}±{s[c]['std']:.2f}"
            for c in list(CLASSES) + ["Mean"])
            + " |")
    for p in papers:
        if p.get("auroc"):
            md.append(f"| *{p['name']}* | " + " | ".join(_f(p["auroc"].get(c)) for c in list(CLASSES) + ["Mean"])
                      + " |")
    md += ["", "## Per fold", "", "| fold | train / test images | test boxed | method | mean AUROC | "
           "mean acc T(IoU)=0.3 | train s |", "|---|---|---|---|---|---|---|"]
    for fr in summary["fold_rows"]:
        md.append(f"| {fr['fold']} | {fr['n_train']} / {fr['n_test']} | {fr['n_test_boxed']} | {fr['method']} | "
                  f"{_f(fr['mean_auroc'])} | {_f(fr['acc03'])} | {fr['train_s']:.0f} |")
    md += ["", "## Sources of the paper rows", ""]
    for p in papers:
        md.append(f"- *{p['name']}*: {p['source']}")
    if summary.get("notes"):
        md += ["", "## Reading the numbers", "", *summary["notes"]]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(md) + "\n")


def summarise(out_dir: Path, meta: dict) -> dict:
    fold_results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("fold*.json"))]
    if not fold_results:
        raise SystemExit(f"no fold results in {out_dir}")
    methods = [m for m in meta["conf"]["methods"] if any(m in fr["methods"] for fr in fold_results)]
    summary = dict(meta)
    summary["folds_done"] = [fr["fold"] for fr in fold_results]
    summary["methods"] = methods
    summary["wall_s"] = sum(fr.get("wall_s", 0.0) for fr in fold_results)
    summary["pooled"] = {m: {"iou": pool(fold_results, m, "iou"), "iobb": pool(fold_results, m, "iobb")}
                         for m in methods + ["floor"]}
    summary["auroc"] = {m: auroc_summary(fold_results, m) for m in methods}
    summary["method_folds"] = {m: [fr["fold"] for fr in fold_results if m in fr["methods"]] for m in methods}
    summary["fold_rows"] = [{"fold": fr["fold"], "n_train": fr["n_train"], "n_test": fr["n_test"],
                             "n_test_boxed": fr["n_test_boxed"], "method": m,
                             "mean_auroc": fr["methods"][m]["mean_auroc"],
                             "acc03": _mean_row(fr["methods"][m]["iou"]["0.3"]),
                             "train_s": fr["methods"][m]["train_s"]}
                            for fr in fold_results for m in methods if m in fr["methods"]]
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--folds", default="all", help="held-out folds to run, e.g. 0,1 (default all)")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--methods", default=None, help="override the config's methods, e.g. cam,cia0,cia40")
    ap.add_argument("--epochs", type=int, default=0, help="override the config's epochs (0 = config)")
    ap.add_argument("--size", type=int, default=0, help="override the config's input size (0 = config)")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: first N training images per fold")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", default=None, help="HDF5 cache path (built if missing; default: a temp file)")
    ap.add_argument("--out-dir", default=None, help="fold files (default benchmarks/results/nih_localization/<config>)")
    ap.add_argument("--out-md", default=str(REPO / "docs" / "nih-training-benchmark.md"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the summary and doc from the fold files")
    args = ap.parse_args()

    import torch

    from training.data import build_cache, load_records, patient_folds

    conf = json.loads(json.dumps(CONFIGS[args.config]))
    if args.methods:
        conf["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.size:
        conf["size"] = args.size
    out_dir = Path(args.out_dir) if args.out_dir else REPO / "benchmarks" / "results" / "nih_localization" / args.config
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    records = load_records(args.data)
    folds = patient_folds(records, args.n_folds, seed=0)
    if args.report_only:
        meta = json.loads(meta_path.read_text())
    else:
        argv = [a for a in sys.argv[1:]]
        command = "python benchmarks/nih_localization.py " + " ".join(shlex.quote(a) for a in argv)
        base = [a for i, a in enumerate(argv) if a != "--folds" and (i == 0 or argv[i - 1] != "--folds")]
        meta = {"command": command, "config": args.config, "conf": conf, "data": args.data,
                "n_images": len(records), "n_boxed": sum(bool(r.boxes) for r in records),
                "n_patients": len({r.patient_id for r in records}), "n_folds": args.n_folds,
                "resume_command": "python benchmarks/nih_localization.py "
                                  + " ".join(shlex.quote(a) for a in base) + " --folds FOLDS",
                "out_dir_rel": os.path.relpath(out_dir, REPO),
                "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                "device": "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                else "cpu", "limit": args.limit}
        if meta_path.is_file():  # keep the first command of a resumed run, record the later ones
            old = json.loads(meta_path.read_text())
            meta["command"] = old["command"] if old.get("command") == command else \
                f"{old['command']}` then `{command}"
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        wanted = list(range(args.n_folds)) if args.folds == "all" else [int(x) for x in args.folds.split(",")]
        tmp = tempfile.TemporaryDirectory()
        cache = Path(args.cache) if args.cache else Path(tmp.name) / "nih.h5"
        if not cache.is_file():
            t0 = time.perf_counter()
            build_cache(records, cache, conf["size"])
            print(f"cache {cache} built in {time.perf_counter() - t0:.0f} s", flush=True)
        for f in wanted:
            t0 = time.perf_counter()
            res = run_fold(f, args, conf, records, folds, cache, Path(tmp.name))
            res["wall_s"] = time.perf_counter() - t0
            (out_dir / f"fold{f}.json").write_text(json.dumps(res, indent=2) + "\n")
            summary = summarise(out_dir, meta)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_doc(summary, Path(args.out_md), _paper_rows())
            print(f"fold {f} done in {res['wall_s'] / 60:.1f} min; doc rewritten ({len(summary['folds_done'])} "
                  f"of {args.n_folds} folds)", flush=True)
    summary = summarise(out_dir, meta)
    notes_path = out_dir / "notes.md"
    if notes_path.is_file():
        summary["notes"] = notes_path.read_text().strip().splitlines()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_doc(summary, Path(args.out_md), _paper_rows())
    print(json.dumps({"folds_done": summary["folds_done"], "wall_s": summary["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
