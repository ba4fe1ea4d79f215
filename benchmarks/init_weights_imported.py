"""Benchmark (issue 16 acceptance): fine-tuning starts from an imported model.

    OMP_NUM_THREADS=1 python benchmarks/init_weights_imported.py [WORKDIR]

A torchvision ResNet-18 is trained in torchvision's own layout (3 channels, ImageNet mean/std,
8 epochs) on 240 generated phantoms, saved as a plain state dict, imported with
``cxrviewer import-model --format torchvision``, and ``cxr-train cia --backbone resnet18
--init-weights`` trains one epoch from it; the same command without ``--init-weights`` (same
seed) is the random start. Writes the first-epoch losses and held-out mean AUROCs to
``benchmarks/results/init_weights_imported.json``.
"""
import json, os, platform, subprocess, sys, tempfile
from pathlib import Path
import numpy as np, torch, torchvision
from PIL import Image
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from training.phantoms import PhantomConfig, write_phantom_dataset
from cxrviewer.core.io import read_nih_folder
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.bundle import read_manifest
root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cxr-init-")); data = root / "set"
root.mkdir(parents=True, exist_ok=True)
SIZE = 64
PH = PhantomConfig(contrast=2.0, normal_fraction=0.35, max_findings=1, lesion_scale=1.5,
                   class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Pneumothorax", 1.0), ("Infiltration", 1.0)))
if not data.exists():
    write_phantom_dataset(data, n=240, size=SIZE, seed=5, config=PH)
refs = read_nih_folder(data)
x = np.stack([np.asarray(Image.open(r.path).convert("L").resize((SIZE, SIZE)), np.float32) / 255.0 for r in refs])
y = np.stack([[r.labels[c] for c in CLASSES] for r in refs]).astype(np.float32)
mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
X = (torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1) - mean) / std
Y = torch.from_numpy(y)
torch.manual_seed(0)
net = torchvision.models.resnet18(weights=None, num_classes=14)
opt = torch.optim.Adam(net.parameters(), 3e-3)
for ep in range(8):
    perm = torch.randperm(len(X)); tot = 0
    net.train()
    for i in range(0, len(X), 16):
        idx = perm[i:i + 16]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(X[idx]), Y[idx])
        opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item() * len(idx)
    print("torchvision epoch", ep, round(tot / len(X), 4), flush=True)
torch.save(net.state_dict(), root / "tv_resnet18.pth")
imp = root / "imported.cxrbundle"
subprocess.run([sys.executable, "-m", "cxrviewer", "import-model", str(root / "tv_resnet18.pth"), "--format", "torchvision",
                "--arch", "resnet18", "--label-set", "nih14", "--input-size", str(SIZE), "--overwrite", "--out", str(imp)], check=True)
from training.cli import main
res = {}
for name, extra in (("init", ["--init-weights", str(imp)]), ("random", [])):
    out = root / f"cia_{name}.cxrbundle"
    rc = main(["cia", "--backbone", "resnet18", "--arch-kwargs", '{"head_channels": 16}', "--epochs", "1", "--batch-size", "8",
               "--optimizer", "adam", "--box-fraction", "0.4", "--bank-size", "4", "--data", str(data), "--size", str(SIZE),
               "--no-augment", "--device", "cpu", "--seed", "0", "--out", str(out), *extra])
    fin = read_manifest(out).provenance["final"]
    res[name] = {"rc": rc, "loss": fin["loss"], "mean_auroc": fin["metrics"].get("mean_auroc")}
    print(name, res[name], flush=True)
res.update(benchmark="init_weights_imported", platform=platform.platform(), threads=torch.get_num_threads(),
           loadavg_1min=round(os.getloadavg()[0], 2), phantoms=240, size=SIZE, seed=0,
           note="first-epoch CIA-Net loss and held-out mean AUROC, ResNet-18 backbone, 1 epoch")
out = REPO / "benchmarks" / "results" / "init_weights_imported.json"
out.write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res))
