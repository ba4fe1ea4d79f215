"""``cxr-train ... --init-weights BUNDLE`` (issue 16, item 4): training starts from a model the user has.

- ``cxr-train cia --init-weights cls.cxrbundle`` (a tiny classifier trained a few epochs on the
  phantoms) starts both CIA-Net backbones from it: its first-epoch loss is below a random start's
  with the same seed, its held-out AUROC after that epoch is higher, and the bundle it writes
  loads in the app and names its init source (name and weights SHA-256);
- ``cxr-train classify --init-weights`` reuses the head too (same architecture and classes);
  ``mine --init-weights`` adopts the bundle's normalisation and refuses ``--init`` alongside
  (``--init`` adopts its bundle's normalisation too and refuses a 3-channel or other-class one);
- a bundle whose backbone differs is refused with one typed line naming both backbones, and the
  network is left unchanged; a 3-channel (ImageNet-style) bundle's first convolution is folded to
  grayscale exactly (per-channel mean/std folded into the stem's BatchNorm).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrviewer.core.bundle import load_bundle, read_manifest, save_bundle
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.models import create_model
from training.init_weights import InitWeightsError, apply_normalisation, fold_first_conv, init_from_bundle
from training.phantoms import PhantomConfig, write_phantom_dataset

SIZE = 64
#: one large, contrasted finding per image: a tiny classifier learns them in a few epochs at 64 px
PHANTOMS = PhantomConfig(contrast=2.0, normal_fraction=0.35, max_findings=1, lesion_scale=1.5,
                         class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Pneumothorax", 1.0),
                                        ("Infiltration", 1.0)))
#: Acceptance, measured on these phantoms (seeds 0-3 of the whole recipe, 1 thread):
#: first-epoch CIA loss random - init = 0.067, 0.058, 0.027, 0.065;
#: held-out mean AUROC after that epoch init - random = 0.21, 0.27, 0.28, 0.34.
MIN_LOSS_GAIN = 0.02
MIN_AUROC_GAIN = 0.1


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--size", str(SIZE), "--no-augment", "--device", "cpu", "--seed", "0",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Phantoms and a tiny CAM classifier trained on them for 8 epochs (the init bundle)."""
    from training.cli import main

    root = tmp_path_factory.mktemp("init_weights")
    data = root / "set"
    write_phantom_dataset(data, n=240, size=SIZE, seed=5, config=PHANTOMS)
    cls = root / "cls.cxrbundle"
    assert main(["classify", "--arch-kwargs", '{"backbone": "tiny"}', "--epochs", "8", "--batch-size", "16",
                 "--lr", "3e-3", *_train_args(data, cls)]) == 0
    log = [json.loads(x) for x in (root / "cls.cxrbundle.run" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["kind"] == "epoch" and r["epoch"] == 0)
    return {"root": root, "data": data, "cls": cls, "cls_first_loss": first["loss"]}


def _cia(trained: dict, name: str, *extra: str) -> dict:
    from training.cli import main

    out = trained["root"] / f"{name}.cxrbundle"
    assert main(["cia", "--backbone", "tiny", "--arch-kwargs", '{"head_channels": 16}', "--epochs", "1",
                 "--batch-size", "8", "--optimizer", "adam", "--box-fraction", "0.4", "--bank-size", "4",
                 *_train_args(trained["data"], out), *extra]) == 0
    final = read_manifest(out).provenance["final"]
    return {"path": out, "loss": final["loss"], "auroc": final["metrics"]["mean_auroc"]}


def test_cia_from_init_weights_learns_faster_and_names_its_source(trained):
    init = _cia(trained, "cia_init", "--init-weights", str(trained["cls"]))
    rand = _cia(trained, "cia_random")
    print(f"\nfirst-epoch CIA loss: init {init['loss']:.4f}, random {rand['loss']:.4f}; "
          f"held-out mean AUROC: init {init['auroc']:.3f}, random {rand['auroc']:.3f}")
    assert init["loss"] < rand["loss"] - MIN_LOSS_GAIN, (init, rand)
    assert init["auroc"] > rand["auroc"] + MIN_AUROC_GAIN, (init, rand)
    b = load_bundle(init["path"])  # what the app does
    src = read_manifest(trained["cls"])
    iw = b.manifest.provenance["init_weights"]
    assert iw["bundle"] == "cls" and iw["weights_sha256"] == src.weights_sha256 and len(iw["weights_sha256"]) == 64
    assert iw["backbone"] == "tiny" and iw["loaded"]["backbone"] == iw["loaded"]["encoder"] > 0
    assert "head" in iw["random"] and "classes" not in iw["random"]["head"]  # cam_classifier -> cia: new head
    assert b.manifest.classes == tuple(CLASSES) and b.manifest.normalisation["kind"] == "minus1_1"
    assert "init_weights" not in read_manifest(rand["path"]).provenance


def test_classify_init_weights_reuses_backbone_and_head(trained):
    from training.cli import main

    out = trained["root"] / "cls_ft.cxrbundle"
    assert main(["classify", "--arch-kwargs", '{"backbone": "tiny"}', "--epochs", "1", "--batch-size", "16",
                 "--lr", "3e-3", "--init-weights", str(trained["cls"]), *_train_args(trained["data"], out)]) == 0
    b = load_bundle(out)
    iw = b.manifest.provenance["init_weights"]
    assert iw["loaded"] == {"backbone": 54, "head": 2} and iw["random"] == {}
    first = b.manifest.provenance["final"]["loss"]
    # the random start's first epoch (same seed, data, lr) was far above the fine-tune's
    assert first < 0.8 * trained["cls_first_loss"], (first, trained["cls_first_loss"])
    # dm's head is the baseline's: reused; a classifier with other classes gets a new head
    dm = create_model("dm", backbone="tiny", mask_size=4)
    rep = init_from_bundle(dm, trained["cls"])
    assert rep.head_loaded and rep.random == {"disease_masks": "not in the init bundle"}
    src = load_bundle(trained["cls"]).model
    assert torch.equal(dm.classifier.weight, src.classifier.weight)
    other = create_model("cam_classifier", backbone="tiny", num_classes=3)
    rep = init_from_bundle(other, trained["cls"], classes=CLASSES[:3])
    assert not rep.head_loaded and "classes differ" in rep.random["classifier"]
    assert torch.equal(other.backbone.stem[0].weight, src.backbone.stem[0].weight)


def test_mismatched_backbone_is_a_typed_error_and_changes_nothing(trained, tmp_path):
    from training.cli import main

    model = create_model("cam_classifier", backbone="resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InitWeightsError) as exc:
        init_from_bundle(model, trained["cls"])
    msg = str(exc.value)
    assert "\n" not in msg and "init weights tiny (1 channel)" in msg and "backbone resnet18" in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out = tmp_path / "cia_bad.cxrbundle"
    with pytest.raises(SystemExit) as stop:
        main(["cia", "--backbone", "resnet18", "--init-weights", str(trained["cls"]),
              *_train_args(trained["data"], out)])
    assert "--init-weights" in str(stop.value.code) and "resnet18" in str(stop.value.code)
    assert not out.exists()
    seg = create_model("unet", width=4, depth=2)
    with pytest.raises(InitWeightsError, match="has no backbone"):
        init_from_bundle(seg, trained["cls"])


def test_mine_init_weights_adopts_the_bundle_normalisation(trained, tmp_path):
    from training.cli import main

    src = load_bundle(trained["cls"])
    norm = {"kind": "mean_std", "mean": 0.4, "std": 0.3}
    meanstd = save_bundle(src.model, tmp_path / "meanstd", classes=CLASSES, input_size=SIZE, normalisation=norm)
    out = tmp_path / "am.cxrbundle"
    args = ["--arch", "msa", "--arch-kwargs", '{"backbone": "tiny"}', "--pretrain-epochs", "0", "--epochs", "1",
            "--batch-size", "16", "--limit", "48", "--init-weights", str(meanstd)]
    assert main(["mine", *args, *_train_args(trained["data"], out)]) == 0
    b = load_bundle(out)
    assert b.manifest.normalisation == norm
    iw = b.manifest.provenance["init_weights"]
    assert iw["bundle"] == "meanstd" and iw["loaded"] == {"backbone": 54}
    assert "architecture differs" in iw["random"]["classifier"] and "msa" in iw["random"]
    with pytest.raises(SystemExit, match="--init gives every weight"):
        main(["mine", "--init", str(trained["cls"]), *args, *_train_args(trained["data"], tmp_path / "x")])
    # --init (continue a whole classifier) feeds and writes that bundle's normalisation too
    cont = tmp_path / "am_cont.cxrbundle"
    assert main(["mine", "--init", str(meanstd), "--kp", "vanilla", "--epochs", "1", "--batch-size", "16",
                 "--limit", "32", *_train_args(trained["data"], cont)]) == 0
    assert load_bundle(cont).manifest.normalisation == norm
    rgb = save_bundle(create_model("cam_classifier", backbone="tiny", in_channels=3), tmp_path / "rgb",
                      classes=CLASSES, input_size=SIZE)
    with pytest.raises(SystemExit, match="--init-weights"):
        main(["mine", "--init", str(rgb), *_train_args(trained["data"], tmp_path / "y")])


def test_apply_normalisation_sets_what_the_datasets_feed(trained):
    from training.data import ChestDataset, load_records

    ds = ChestDataset(load_records(trained["data"])[:2], SIZE)
    raw = (ds[0]["image"] + 1) / 2  # minus1_1 -> [0, 1]
    apply_normalisation([ds, None], {"kind": "mean_std", "mean": 0.4, "std": 0.3})
    np.testing.assert_allclose(ds[0]["image"].numpy(), ((raw - 0.4) / 0.3).numpy(), atol=1e-5)
    with pytest.raises(InitWeightsError):
        apply_normalisation([ds], {"kind": "mean_std", "mean": [0.4, 0.5], "std": [0.3, 0.3]})


def test_three_channel_bundle_is_folded_to_grayscale(tmp_path):
    torch.manual_seed(0)
    rgb = create_model("cam_classifier", backbone="tiny", in_channels=3, num_classes=3)
    with torch.no_grad():  # a trained stem: BatchNorm statistics away from (0, 1)
        rgb.backbone.stem[1].running_mean.uniform_(-1, 1)
        rgb.backbone.stem[1].running_var.uniform_(0.5, 2)
    path = save_bundle(rgb, tmp_path / "rgb", classes=CLASSES[:3], input_size=SIZE)
    gray = create_model("cam_classifier", backbone="tiny")
    rep = init_from_bundle(gray, path)
    assert rep.in_channels == 3 and rep.adapted and "3 -> 1" in rep.adapted and not rep.head_loaded
    rgb.eval(), gray.eval()
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():  # scalar normalisation: exact everywhere
        diff = rgb.backbone(x.repeat(1, 3, 1, 1))["stage5"] - gray.backbone(x)["stage5"]
    assert float(diff.abs().max()) < 1e-4
    # ImageNet-style per-channel mean/std: exact away from the zero-padded border
    imagenet = {"kind": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    state = {k[len("backbone."):]: v for k, v in rgb.state_dict().items() if k.startswith("backbone.")}
    folded, norm, how = fold_first_conv(state, imagenet)
    assert norm["kind"] == "mean_std" and norm["mean"] == pytest.approx(0.449) and "BatchNorm" in how
    one = create_model("cam_classifier", backbone="tiny").backbone
    one.load_state_dict(folded)
    one.eval()
    x01 = torch.rand(2, 1, SIZE, SIZE)
    z3 = torch.cat([(x01 - m) / s for m, s in zip(imagenet["mean"], imagenet["std"])], 1)
    with torch.no_grad():
        a, b = rgb.backbone.stem(z3), one.stem((x01 - norm["mean"]) / norm["std"])
    assert float((a - b)[..., 1:, 1:].abs().max()) < 1e-4
    assert float((a - b).abs().max()) > 1e-3  # the border differs: the fold is not a no-op check


def test_head_rows_follow_the_class_names(tmp_path):
    torch.manual_seed(1)
    src = create_model("cam_classifier", backbone="tiny")
    reordered = tuple(reversed([c.replace("_", " ") for c in CLASSES]))  # other order, other spelling
    path = save_bundle(src, tmp_path / "rev", classes=reordered, input_size=SIZE)
    model = create_model("cam_classifier", backbone="tiny")
    rep = init_from_bundle(model, path)
    assert rep.head_loaded
    assert torch.equal(model.classifier.weight, src.classifier.weight.flip(0))
    assert torch.equal(model.classifier.bias, src.classifier.bias.flip(0))


def test_cia_starts_from_an_imported_torchvision_resnet(trained, tmp_path):
    """The path of ``cxrviewer import-model``'s bundles: a torchvision ResNet-18 (3 channels, ImageNet
    mean/std) becomes both CIA-Net backbones, its first conv folded to grayscale (lr 0: as loaded)."""
    importers = pytest.importorskip("cxrviewer.core.importers")
    torchvision = pytest.importorskip("torchvision")
    from training.cli import main

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    bundle = importers.import_checkpoint(tmp_path / "r18.pt", "torchvision", tmp_path / "r18", arch="resnet18",
                                         classes=list(CLASSES))
    src = read_manifest(bundle)
    out = tmp_path / "cia.cxrbundle"
    assert main(["cia", "--backbone", "resnet18", "--arch-kwargs", '{"head_channels": 8}', "--epochs", "1",
                 "--batch-size", "8", "--optimizer", "adam", "--lr", "0", "--limit", "16", "--bank-size", "2",
                 "--init-weights", str(bundle), *_train_args(trained["data"], out)]) == 0
    b = load_bundle(out)
    iw = b.manifest.provenance["init_weights"]
    assert iw["weights_sha256"] == src.weights_sha256 and iw["in_channels"] == 3 and "3 -> 1" in iw["adapted"]
    stds = src.normalisation["std"]
    s = sum(stds) / 3
    want = (net.conv1.weight.detach() * torch.tensor([s / c for c in stds])[None, :, None, None]).sum(1, keepdim=True)
    for bb in (b.model.backbone, b.model.encoder):
        torch.testing.assert_close(bb.stem[0].weight, want)
    assert b.manifest.normalisation == {"kind": "mean_std", "mean": pytest.approx(sum(src.normalisation["mean"]) / 3),
                                        "std": pytest.approx(s)}
