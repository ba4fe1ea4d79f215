"""Real NIH classifier: patient-wise 5-fold cross-validation, AUROC per class.

    python benchmarks/nih_classifier_cv.py [--data ../shared/data/nih] [--arch cam_classifier]
        [--arch-kwargs '{"backbone": "tiny"}'] [--size 256] [--epochs 6] [--folds 5]
        [--bundle resources/models/nih-classifier.cxrbundle]

Trains one model per held-out fold (same recipe, seed 0), reports AUROC per class
per fold and mean +- std over folds, plus CAM localisation on fold 0's boxed
images beside the floor (median training box). Writes
benchmarks/results/nih_classifier_cv.json and docs/nih-classifier.md; the fold-0
model is saved (fp16) as the app's bundled demo classifier with this recipe in
its manifest. A GPU run: add --device cuda and a bigger --arch/--size.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih"))
    ap.add_argument("--arch", default="cam_classifier")
    ap.add_argument("--arch-kwargs", default='{"backbone": "tiny"}')
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", default=None, help="HDF5 cache path (built if missing; default: a temp file)")
    ap.add_argument("--bundle", default=str(REPO / "resources" / "models" / "nih-classifier.cxrbundle"))
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "nih_classifier_cv.json"))
    ap.add_argument("--out-md", default=str(REPO / "docs" / "nih-classifier.md"))
    args = ap.parse_args()

    import torch

    from cxrviewer.core.classes import CLASSES
    from cxrviewer.core.models import create_model
    from training.data import AugmentConfig, CachedDataset, build_cache, load_records, patient_folds
    from training.evaluate import evaluate_model, markdown_tables
    from training.trainers.classify import auroc_table, predict, provenance, save_classifier_bundle, train_classifier
    from training.trainers.loop import TrainConfig

    command = "python benchmarks/nih_classifier_cv.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    kwargs = json.loads(args.arch_kwargs)
    t_start = time.perf_counter()
    records = load_records(args.data)
    folds = patient_folds(records, args.folds, seed=0)
    tmp = tempfile.TemporaryDirectory()
    cache = Path(args.cache) if args.cache else Path(tmp.name) / "nih.h5"
    if not cache.is_file():
        build_cache(records, cache, args.size)
    ds_all = CachedDataset(cache)
    row = {k: i for i, k in enumerate(ds_all.keys)}
    per_fold = []
    fold0 = None
    for f in range(args.folds):
        tr = [row[r.key] for r, k in zip(records, folds) if k != f]
        te = [row[r.key] for r, k in zip(records, folds) if k == f]
        train_ds = CachedDataset(cache, tr, augment_cfg=AugmentConfig(), seed=0)
        test_ds = CachedDataset(cache, te, seed=0)
        torch.manual_seed(0)
        model = create_model(args.arch, **kwargs)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0, log_every=0,
                          device=args.device, out_dir=str(Path(tmp.name) / f"fold{f}"))
        t0 = time.perf_counter()
        model, hist = train_classifier(model, train_ds, None, cfg)
        dt = time.perf_counter() - t0
        probs = predict(model, test_ds, batch_size=32)
        tab = auroc_table(test_ds.labels, probs)
        per_fold.append({"fold": f, "n_train": len(tr), "n_test": len(te), "train_s": dt, **tab})
        print(f"fold {f}: mean AUROC {tab['mean_auroc']:.3f} ({dt:.0f} s)", flush=True)
        if f == 0:
            fold0 = (model, hist, train_ds, test_ds, cfg)
    # summary over folds
    summary = {}
    for c in CLASSES:
        vals = [p["auroc"][c] for p in per_fold if p["auroc"][c] == p["auroc"][c]]
        summary[c] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None,
                      "folds": len(vals)}
    means = [p["mean_auroc"] for p in per_fold]
    model, hist, train_ds, test_ds, cfg = fold0
    train_boxes = [b for i in range(len(train_ds)) for b in train_ds.boxes_of(i)]
    loc = evaluate_model(model, test_ds, method="cam", train_boxes=train_boxes)
    result = {"command": command, "data": args.data, "arch": args.arch, "arch_kwargs": kwargs, "size": args.size,
              "epochs": args.epochs, "folds": per_fold, "auroc_summary": summary,
              "mean_auroc": {"mean": float(np.mean(means)), "std": float(np.std(means))},
              "fold0_localisation": loc, "wall_s": time.perf_counter() - t_start,
              "device": str(next(model.parameters()).device)}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    prov = provenance(command, cfg, args.data, hist, fold=0, n_folds=args.folds,
                      cv_mean_auroc=result["mean_auroc"], research_demo=True,
                      note="trained on 1,222 real NIH ChestX-ray14 images on a CPU; a research demo, "
                           "not a diagnostic model")
    if args.bundle:
        from cxrviewer.core.bundle import save_bundle

        save_bundle(model.cpu(), args.bundle, classes=list(CLASSES), input_size=args.size,
                    normalisation={"kind": "minus1_1"}, provenance=prov, overwrite=True,
                    weights_dtype="float16", name="nih-classifier",
                    description=f"{args.arch} ({kwargs}) trained on real NIH images (fold 0 held out)")
    md = [f"# Real NIH classifier: patient-wise {args.folds}-fold cross-validation", "",
          f"Command: `{command}`  ", f"Data: `{args.data}` ({len(records)} images)  ",
          f"Model: `{args.arch}` {kwargs}, {args.size} px, {args.epochs} epochs, Adam lr {args.lr}, "
          f"weighted BCE (disease-masks Eq. 10), augmentation on  ",
          f"Wall time: {result['wall_s'] / 60:.1f} min on {result['device']}", "",
          "## AUROC per class (mean ± std over folds; n = folds where the class had both labels)", "",
          "| class | AUROC | ± | n |", "|---|---|---|---|"]
    for c in CLASSES:
        s = summary[c]
        md.append(f"| {c} | {s['mean']:.3f} | {s['std']:.3f} | {s['folds']} |" if s["mean"] is not None
                  else f"| {c} | – | – | 0 |")
    md += ["", f"Mean AUROC over classes: {result['mean_auroc']['mean']:.3f} ± {result['mean_auroc']['std']:.3f} "
           "(std over folds)", "",
           "The papers train on 112,120 images (ChestX-ray8 reports mean AUROC ~0.74 with ResNet-50); "
           "this is 1% of that data on a CPU-sized network, so the numbers show the pipeline works on real "
           "images, not what the method reaches.", "",
           markdown_tables(loc, title="CAM localisation on fold 0's boxed images (floor beside it)")]
    Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_md).write_text("\n".join(md) + "\n")
    print(json.dumps({"mean_auroc": result["mean_auroc"], "wall_s": result["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
