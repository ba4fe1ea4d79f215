"""`cxrviewer import-model`: checkpoints of torchvision, CheXNet-style, torchxrayvision and timm
models (random weights, saved the way each library/project saves them) become bundles whose
logits match the library's on the same image after the manifest's preprocessing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cxrviewer.core.bundle import load_bundle, read_manifest
from cxrviewer.core.importers import ImportModelError, PickleRequiredError, import_checkpoint
from cxrviewer.core.preprocess import Preprocess, prepare_input

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLASSES3 = ["Mass", "Nodule", "Effusion"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h: int = 90, w: int = 76) -> np.ndarray:
    """A smooth non-square gray image in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + 0.1 * np.random.default_rng(0).random((h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def _x01(img: np.ndarray, size: int) -> torch.Tensor:
    """The image resized to ``size`` in [0, 1], ``[1, 1, size, size]`` (what the manifest's crop/resize gives)."""
    return Preprocess(input_size=(size, size)).crop_resize(torch.from_numpy(img)[None, None])[0]


def _calibrate(m: nn.Module, x: torch.Tensor) -> nn.Module:
    """Make a random network behave like a trained one on the test input ``x``: BatchNorm running
    statistics from ``x`` and two variants (a fresh EfficientNet's logits are ~1e-13 in eval mode),
    then the last linear layer scaled so the logits on ``x`` are at most 4 in size."""
    torch.manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
    batch = torch.cat([x, x.flip(-1), x + 0.1 * x.std() * torch.randn_like(x)])
    with torch.no_grad():
        m.train()
        m(batch)
        m.eval()
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        scale = 4.0 / float(m(x).abs().max())
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return m


def _xrv_input(xrv, x01: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's own scaling of an 8-bit image, [0, 255] -> [-1024, 1024]."""
    return torch.from_numpy(xrv.utils.normalize(x01[0, 0].numpy() * 255.0, 255))[None, None]


def _ours(bundle: Path, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The imported bundle's logits on ``img`` through cxrviewer's own preprocessing (prepare_input), that
    network input, and the image cropped/resized to the input size in [0, 1]."""
    b = load_bundle(bundle)
    x, _ = prepare_input(img, b.manifest)
    x01, _ = Preprocess.from_manifest(b.manifest).crop_resize(torch.from_numpy(img)[None, None])
    with torch.no_grad():
        return b.model(x)["logits"], x, x01


def _compare(logits: torch.Tensor, x: torch.Tensor, library_input: torch.Tensor, library_logits) -> None:
    """Our preprocessing equals the library's own (float rounding) and, on that same tensor, our
    logits equal the library network's within 1e-4."""
    torch.testing.assert_close(x, library_input, rtol=1e-6, atol=1e-6 * max(1.0, float(library_input.abs().max())))
    with torch.no_grad():
        _assert_close(logits, library_logits(x))


def _imagenet_input(x01: torch.Tensor) -> torch.Tensor:
    return torchvision.transforms.Normalize(*IMAGENET)(x01.repeat(1, 3, 1, 1))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Logits within 1e-4 of the library's (and not ~0, which would prove nothing)."""
    assert ours.shape == theirs.shape
    assert float(theirs.abs().max()) > 0.1, "reference logits are ~0: the comparison would prove nothing"
    assert float((ours - theirs).abs().max()) < 1e-4


@pytest.mark.parametrize("arch,ours", [("resnet18", "cam_classifier"), ("resnet50", "cam_classifier"),
                                       ("densenet121", "cam_classifier"), ("efficientnet_b0", "imported_classifier"),
                                       ("convnext_tiny", "imported_classifier")])
def test_torchvision_state_dict(tmp_path, arch, ours):
    torch.manual_seed(0)
    net = _calibrate(torchvision.models.get_model(arch, weights=None, num_classes=3),
                     _imagenet_input(_x01(_image(), 64)))
    ckpt = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), ckpt)
    out = import_checkpoint(ckpt, "torchvision", tmp_path / "m", arch=arch, classes=CLASSES3, input_size=64)
    man = read_manifest(out)
    assert man.architecture == ours and man.classes == tuple(CLASSES3) and man.input_size == (64, 64)
    assert man.normalisation == {"kind": "channel_mean_std", "mean": IMAGENET[0], "std": IMAGENET[1]}
    prov = man.provenance
    assert prov["imported"] is True and prov["format"] == "torchvision" and prov["checkpoint"] == ckpt.name
    from cxrviewer.core.checksum import sha256_file

    assert prov["checkpoint_sha256"] == sha256_file(ckpt) and prov["pickled_checkpoint"] is False
    assert prov["cam_exact"] is (arch != "convnext_tiny")
    if ours == "cam_classifier":
        assert man.arch_kwargs["backbone"] == arch and man.arch_kwargs["in_channels"] == 3
    else:
        assert ("not exact" in man.description or "approximate" in man.description) == (arch == "convnext_tiny")
    logits, x, x01 = _ours(out, _image())
    _compare(logits, x, _imagenet_input(x01), net)
    # the CAM explains the logit: its spatial mean plus the head's bias (ConvNeXt: per-image linearised LayerNorm)
    model = load_bundle(out).model
    with torch.no_grad():
        o = model(_imagenet_input(x01))
    torch.testing.assert_close(o["cam"].mean((2, 3)) + model.cam_weights()[1], o["logits"], rtol=1e-4, atol=1e-4)


class _CheXNet(nn.Module):
    """arnoweng/CheXNet's model: torchvision DenseNet-121 with a Linear + Sigmoid head."""

    def __init__(self, out_size: int = 14) -> None:
        super().__init__()
        self.densenet121 = torchvision.models.densenet121(weights=None)
        n = self.densenet121.classifier.in_features
        self.densenet121.classifier = nn.Sequential(nn.Linear(n, out_size), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.densenet121(x)


def test_chexnet_checkpoint_with_module_prefix_and_old_keys(tmp_path):
    torch.manual_seed(0)
    model = nn.DataParallel(_CheXNet())
    _calibrate(model.module, _imagenet_input(_x01(_image(240, 230), 224)))
    opt = torch.optim.Adam(model.parameters())
    state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v  # pre-0.4 torchvision names
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(k.startswith("module.densenet121.features.denseblock1.denselayer1.norm.1.") for k in state)
    ckpt = tmp_path / "m-25012018-123527.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "best_loss": 0.1, "optimizer": opt.state_dict()}, ckpt)
    out = import_checkpoint(ckpt, "chexnet", tmp_path / "chexnet")
    man = read_manifest(out)
    assert man.input_size == (224, 224) and man.label_set == "nih14" and len(man.classes) == 14
    assert man.classes[:3] == ("Atelectasis", "Cardiomegaly", "Effusion")
    logits, x, x01 = _ours(out, _image(240, 230))
    torch.testing.assert_close(x, _imagenet_input(x01), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        probs = model.module(x)
    assert float(probs.std()) > 1e-3
    assert float((torch.sigmoid(logits) - probs).abs().max()) < 1e-5
    head = model.module.densenet121.classifier[0]
    with torch.no_grad():  # its logits: the Linear before the Sigmoid
        _assert_close(logits, head(torch.relu(model.module.densenet121.features(x)).mean((2, 3))))


def _xrv_model():
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    return xrv, _calibrate(xrv.models.DenseNet(weights=None), _xrv_input(xrv, _x01(_image(250, 240), 224)))


def test_torchxrayvision_whole_module_needs_allow_pickle(tmp_path):
    xrv, model = _xrv_model()
    model.op_threshs = torch.rand(18) * 0.5 + 0.25  # as its released weights carry: must not change our logits
    ckpt = tmp_path / "nih-densenet121-xrv.pt"
    torch.save(model, ckpt)  # how torchxrayvision's weight files are made
    with pytest.raises(PickleRequiredError, match="--allow-pickle"):
        import_checkpoint(ckpt, "torchxrayvision", tmp_path / "refused")
    assert not (tmp_path / "refused.cxrbundle").exists()
    warnings: list[str] = []
    out = import_checkpoint(ckpt, "torchxrayvision", tmp_path / "xrv", allow_pickle=True, warn=warnings.append)
    assert warnings and "pickle" in warnings[0]
    man = read_manifest(out)
    assert man.label_set == "torchxrayvision18" and len(man.classes) == 18 and man.classes[-1] == "Enlarged Cardiomediastinum"
    assert man.arch_kwargs["backbone"] == "densenet121" and man.arch_kwargs["in_channels"] == 1
    assert man.input_size == (224, 224) and man.normalisation == {"kind": "mean_std", "mean": 0.5, "std": 1 / 2048}
    assert man.provenance["pickled_checkpoint"] is True and man.provenance["dropped_tensors"] == ["op_threshs"]
    assert man.provenance["source_labels"] == list(model.targets)
    logits, x, x01 = _ours(out, _image(250, 240))
    _compare(logits, x, _xrv_input(xrv, x01), lambda t: model.classifier(model.features2(t)))


def test_torchxrayvision_resnet50_state_dict(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=18, weights=None)  # as xrv.models.ResNet builds it
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _calibrate(net, _xrv_input(xrv, _x01(_image(), 64)))
    ckpt = tmp_path / "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt"
    torch.save(net.state_dict(), ckpt)  # xrv loads these with model.load_state_dict(torch.load(...))
    out = import_checkpoint(ckpt, "torchxrayvision", tmp_path / "xrv50", arch="resnet50", input_size=64)
    man = read_manifest(out)
    assert man.arch_kwargs["backbone"] == "resnet50" and man.arch_kwargs["in_channels"] == 1
    assert man.label_set == "torchxrayvision18" and man.provenance["pickled_checkpoint"] is False
    logits, x, x01 = _ours(out, _image())
    _compare(logits, x, _xrv_input(xrv, x01), net)


class _Payload:
    """A pickle that writes the unpickling process's pid to a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write(str(__import__('os').getpid()))",))


def test_pickle_payload_never_runs_without_allow_pickle_and_only_in_the_child_with_it(tmp_path):
    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, ckpt)
    with pytest.raises(PickleRequiredError):
        import_checkpoint(ckpt, "torchvision", tmp_path / "evil", arch="resnet18", classes=CLASSES3)
    assert not marker.exists()
    from cxrviewer.__main__ import main

    assert main(["import-model", str(ckpt), "--format", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "evil2")]) == 2
    assert not marker.exists()
    with pytest.raises(ImportModelError, match="child process"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "evil", arch="resnet18", classes=CLASSES3,
                          allow_pickle=True, warn=lambda m: None)
    assert marker.read_text() and int(marker.read_text()) != os.getpid()  # it ran, in the child only
    assert not (tmp_path / "evil.cxrbundle").exists()


@pytest.mark.parametrize("name,save", [("resnet18", "safetensors"), ("efficientnet_b0", "torch")])
def test_timm_checkpoints(tmp_path, name, save):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=3)
    cfg = net.pretrained_cfg
    _calibrate(net, torchvision.transforms.Normalize(cfg["mean"], cfg["std"])(_x01(_image(), 64).repeat(1, 3, 1, 1)))
    if save == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        ckpt = tmp_path / "model.safetensors"
        st.save_file(net.state_dict(), str(ckpt))
    else:
        ckpt = tmp_path / "pytorch_model.bin"
        torch.save(net.state_dict(), ckpt)
    out = import_checkpoint(ckpt, "timm", tmp_path / name, arch=name, label_set="vindr-cxr",
                            classes=["Aortic enlargement", "ILD", "Nodule/Mass"], input_size=64)
    man = read_manifest(out)
    assert man.arch_kwargs == {"library": "timm", "model": name, "num_classes": 3, "in_channels": 3}
    assert man.label_set == "vindr-cxr"
    assert man.normalisation["mean"] == pytest.approx(list(cfg["mean"]))
    logits, x, x01 = _ours(out, _image())
    _compare(logits, x, torchvision.transforms.Normalize(cfg["mean"], cfg["std"])(x01.repeat(1, 3, 1, 1)), net)


def test_bad_inputs_are_one_typed_line(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), ckpt)
    with pytest.raises(ImportModelError, match=r"does not fit cam_classifier\(resnet50\): missing 'backbone\.stages"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", arch="resnet50", classes=CLASSES3)
    bad = torch.load(ckpt, weights_only=True)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ImportModelError, match=r"wrong shapes backbone\.stages\.stage2\.0\.conv1\.weight"):
        import_checkpoint(tmp_path / "bad.pth", "torchvision", tmp_path / "a", arch="resnet18", classes=CLASSES3)
    with pytest.raises(ImportModelError, match="3 outputs"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", arch="resnet18")
    with pytest.raises(ImportModelError, match="needs --arch"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", classes=CLASSES3)
    with pytest.raises(ImportModelError, match="not in the label set"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", arch="resnet18", classes=CLASSES3,
                          label_set="rsna-pneumonia")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ImportModelError, match="cannot be read"):
        import_checkpoint(tmp_path / "junk.pt", "torchvision", tmp_path / "a", arch="resnet18", classes=CLASSES3)
    assert not (tmp_path / "a.cxrbundle").exists()
    # unknown class names without a label set: a set made of the classes, recorded in the manifest
    out = import_checkpoint(ckpt, "torchvision", tmp_path / "own", arch="resnet18", classes=["a", "b", "c"],
                            input_size=32)
    assert read_manifest(out).labels.labels == ("a", "b", "c")


def test_cli_import_then_analyze(tmp_path, capsys):
    from PIL import Image

    from cxrviewer.__main__ import main

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    net = _calibrate(torchvision.models.resnet18(weights=None, num_classes=3), _imagenet_input(_x01(_image(96, 80), 64)))
    torch.save(net.state_dict(), ckpt)
    models = tmp_path / "models"
    models.mkdir()
    rc = main(["import-model", str(ckpt), "--format", "torchvision", "--arch", "resnet18",
               "--out", str(models / "r18"), "--input-size", "64"])
    assert rc == 2 and "3 outputs" in capsys.readouterr().err  # no class names
    rc = main(["import-model", str(ckpt), "--format", "torchvision", "--arch", "resnet18", "--classes", *CLASSES3,
               "--out", str(models / "r18"), "--input-size", "64"])
    assert rc == 0 and (models / "r18.cxrbundle" / "manifest.json").is_file()
    png = tmp_path / "chest.png"
    Image.fromarray((_image(96, 80) * 255).astype(np.uint8)).save(png)
    rc = main(["analyze", str(png), "--models", str(models), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--no-panels", "--map-size", "48"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "chest" / "summary.json").read_text())
    assert summary["classes"] == CLASSES3 and set(summary["probabilities"]) == set(CLASSES3)
    assert "cam" in summary["methods"] and summary["boxes"].get("cam")


def test_unsupported_networks_and_missing_timm_are_typed_errors(tmp_path, monkeypatch):
    from cxrviewer.core.bundle import BundleError
    from cxrviewer.core.errors import ModelError

    torch.manual_seed(0)
    ckpt = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None, num_classes=2).state_dict(), ckpt)
    with pytest.raises(ModelError, match="not supported for import"):  # two linear layers after pooling
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", arch="mobilenet_v3_small", classes=["Mass", "Nodule"])
    timm = pytest.importorskip("timm")
    ckpt = tmp_path / "t.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=2).state_dict(), ckpt)
    out = import_checkpoint(ckpt, "timm", tmp_path / "t", arch="resnet18", classes=["Mass", "Nodule"], input_size=32)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(BundleError, match="needs timm, which is not installed"):
        load_bundle(out)
    with pytest.raises(ModelError, match="pip install timm"):
        import_checkpoint(ckpt, "timm", tmp_path / "t2", arch="resnet18", classes=["Mass", "Nodule"])


def test_channel_mean_std_manifest_roundtrip_and_refusals():
    pre = Preprocess.from_normalisation({"kind": "channel_mean_std", "mean": IMAGENET[0], "std": IMAGENET[1]}, 16)
    assert pre.to_manifest()["normalisation"] == {"kind": "channel_mean_std", "mean": IMAGENET[0], "std": IMAGENET[1]}
    x01 = torch.rand(2, 1, 16, 16)
    x = pre.normalise(x01)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x[:, 1:2], (x01 - 0.456) / 0.224)
    torch.testing.assert_close(pre.denormalise(x), x01)
    assert pre.normalise_array(x01[0, 0].numpy()).shape == (3, 16, 16)
    for bad in ({"mean": [0.5, 0.5], "std": [0.2]}, {"mean": [0.5], "std": [0.0]}, {"mean": 0.5, "std": 0.2},
                {"mean": [float("nan")], "std": [0.2]}):
        with pytest.raises(ValueError):
            Preprocess.from_normalisation({"kind": "channel_mean_std", **bad})


def test_budgets_are_checked_before_reading(tmp_path, monkeypatch):
    import struct

    from cxrviewer.core.importers import checkpoint as ck

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), ckpt)
    loads: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append("x") or real_load(*a, **k))
    monkeypatch.setattr(ck, "MAX_CHECKPOINT_BYTES", ckpt.stat().st_size - 1)
    with pytest.raises(ImportModelError, match="over the .* checkpoint limit; refused unread"):
        import_checkpoint(ckpt, "torchvision", tmp_path / "a", arch="resnet18", classes=CLASSES3)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ImportModelError, match="header is over the limit"):
        import_checkpoint(huge, "torchvision", tmp_path / "a", arch="resnet18", classes=CLASSES3)
    assert loads == [] and not (tmp_path / "a.cxrbundle").exists()
