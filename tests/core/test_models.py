"""Tests of cxrviewer.core.models: the registry, every family, the paper equations."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cxrviewer.core.errors import CxrError, ModelError
from cxrviewer.core.models import (
    SEGMENTATION_CLASSES,
    create_model,
    get_spec,
    list_models,
)
from cxrviewer.core.models import alignment as al
from cxrviewer.core.models import cia

EXPECTED = {
    "cam_classifier": "classifier",
    "space_attention": "classifier",
    "attention_gated": "classifier",
    "dm": "classifier",
    "msa": "classifier",
    "lung_heart": "classifier",
    "imported_classifier": "classifier",
    "alignment": "alignment",
    "cia": "cia",
    "unet": "segmentation",
}
SPECS = list_models()
CLASSIFIERS = list_models("classifier")


def _grads_ok(module: torch.nn.Module) -> int:
    """Number of parameters with a gradient; asserts every gradient is finite."""
    n = 0
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            n += 1
    return n


def _check_outputs(spec_name: str, family: str, out: dict, batch: int, size: int, inputs: tuple) -> None:
    assert all(torch.isfinite(v).all() for v in out.values()), spec_name
    if family == "classifier":
        assert out["logits"].shape == (batch, 14)
        f, cam = out["features"], out["cam"]
        assert f.dim() == 4 and f.shape[0] == batch
        assert cam.shape == (batch, 14, *f.shape[-2:])
    elif family == "alignment":
        assert out["params"].shape == (batch, 5)
        assert out["theta"].shape == (batch, 2, 3)
        assert out["aligned"].shape == inputs[0].shape
    elif family == "cia":
        g = size // 32
        assert out["grid_probs"].shape == (batch, 14, g, g)
        assert out["grid_logits"].shape == (batch, 14, g, g)
        assert out["attention"].shape == (batch, 1, g, g)
        assert out["features"].shape[-2:] == (g, g)
        assert ((out["grid_probs"] >= 0) & (out["grid_probs"] <= 1)).all()
    elif family == "segmentation":
        assert out["logits"].shape == (batch, 3, size, size)
    else:  # pragma: no cover
        raise AssertionError(family)


def _backward(out: dict) -> None:
    loss = sum(v.float().square().mean() for v in out.values() if v.requires_grad)
    loss.backward()


# ---------------------------------------------------------------- registry
def test_registry_lists_every_family_member() -> None:
    names = {s.name: s.family for s in SPECS}
    assert names == EXPECTED
    assert [s.name for s in list_models("cia")] == ["cia"]
    for s in SPECS:
        assert s.description
        json.dumps(s.default_kwargs)


def test_unknown_names_and_kwargs_raise_model_error() -> None:
    with pytest.raises(ModelError, match="unknown model architecture"):
        create_model("no_such_net")
    with pytest.raises(ModelError):
        create_model("cam_classifier", backbone="vgg99")
    with pytest.raises(ModelError):
        create_model("cam_classifier", backbone="tiny", bogus=1)
    with pytest.raises(ModelError):
        create_model("cam_classifier", backbone="tiny", pool="median")
    with pytest.raises(CxrError):
        list_models("no_family")


def test_register_rejects_duplicates_and_unknown_families() -> None:
    from cxrviewer.core.models import register_model

    with pytest.raises(ModelError, match="twice"):
        register_model("unet", family="segmentation")(lambda **kw: torch.nn.Identity())
    with pytest.raises(ModelError, match="family"):
        register_model("new_net", family="detector")
    assert get_spec("unet").factory is not None and len(list_models()) == len(EXPECTED)


def test_aliases_resolve_to_registered_names() -> None:
    m = create_model("tiny")
    assert m.arch == "cam_classifier" and m.arch_kwargs["backbone"] == "tiny"
    m = create_model("tiny_msa")
    assert m.arch == "msa" and m.arch_kwargs["backbone"] == "tiny"
    assert get_spec("densenet121_lung_heart").name == "lung_heart"
    assert get_spec("resnet50_dm").name == "dm"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_model_small_forward_backward_and_rebuild(spec) -> None:
    torch.manual_seed(0)
    model = create_model(spec.name, **spec.test_kwargs)
    assert model.arch == spec.name and model.family == spec.family
    assert json.loads(json.dumps(model.arch_kwargs)) == model.arch_kwargs
    inputs = spec.example_inputs(batch=2, size=64)
    out = model(*inputs)
    _check_outputs(spec.name, spec.family, out, 2, 64, inputs)
    _backward(out)
    assert _grads_ok(model) > 0
    # a bundle stores (arch, arch_kwargs, state_dict): rebuild and reload
    clone = create_model(model.arch, **model.arch_kwargs)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    with torch.no_grad():
        a, b = model(*inputs), clone(*inputs)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


_DEFAULT_CASES = [(s.name, {}) for s in SPECS] + [
    ("cam_classifier", {"backbone": b}) for b in ("resnet18", "resnet34", "densenet121")
]


@pytest.mark.parametrize("name,kwargs", _DEFAULT_CASES,
                         ids=[f"{n}-{k.get('backbone', 'default')}" for n, k in _DEFAULT_CASES])
def test_every_default_network_runs_at_256px_on_cpu(name: str, kwargs: dict) -> None:
    """The issue's requirement: every registered network (real backbones) forward+backward at 256 px."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    inputs = spec.example_inputs(batch=1, size=256)
    out = model(*inputs)
    _check_outputs(name, spec.family, out, 1, 256, inputs)
    if spec.family == "classifier":
        assert out["cam"].shape[-2:] in ((8, 8), (16, 16))  # stride 32, MSA stride 16
    _backward(out)
    assert _grads_ok(model) > 0


# ---------------------------------------------------------------- classifiers / CAM
@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_cam_is_weighted_sum_of_features(spec) -> None:
    torch.manual_seed(0)
    model = create_model(spec.name, **spec.test_kwargs).eval()
    if spec.name == "dm":
        model.set_disease_masks(torch.rand(14, 5, 5))
    captured = {}
    handle = model.feature_layer().register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    with torch.no_grad():
        out = model(*spec.example_inputs(2, 64))
    handle.remove()
    torch.testing.assert_close(captured["f"], out["features"])
    w, b = model.cam_weights()
    assert w.shape == (14, out["features"].shape[1]) and b.shape == (14,)
    expected = torch.einsum("ck,bkhw->bchw", w, out["features"])
    if spec.name == "dm":
        expected = expected * (1 + model.masks_at(expected.shape[-2:]))
    torch.testing.assert_close(out["cam"], expected, rtol=1e-4, atol=1e-5)
    if spec.name != "attention_gated":  # its logits add the gated terms
        torch.testing.assert_close(out["logits"], out["cam"].mean((2, 3)) + b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", ["max", "lse"])
def test_baseline_transition_and_pooling_options(pool: str) -> None:
    torch.manual_seed(0)
    m = create_model("cam_classifier", backbone="tiny", transition_channels=24, pool=pool).eval()
    assert m.feature_layer() is m.transition
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = m(x)
    f = out["features"]
    assert f.shape[1] == 24
    w, b = m.cam_weights()
    torch.testing.assert_close(out["cam"], torch.einsum("ck,bkhw->bchw", w, f), rtol=1e-4, atol=1e-5)
    pooled = f.amax((2, 3)) if pool == "max" else torch.logsumexp(10 * f.flatten(2), 2) / 10 - math.log(
        f.shape[2] * f.shape[3]) / 10
    torch.testing.assert_close(out["logits"], pooled @ w.t() + b, rtol=1e-4, atol=1e-5)
    assert (pooled >= f.mean((2, 3)) - 1e-6).all()


def test_dm_with_zero_masks_equals_baseline_and_masks_scale_cam() -> None:
    torch.manual_seed(0)
    base = create_model("cam_classifier", backbone="tiny").eval()
    dm = create_model("dm", backbone="tiny", mask_size=4).eval()
    missing, unexpected = dm.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["disease_masks"] and not unexpected
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        ob, od = base(x), dm(x)
        torch.testing.assert_close(od["logits"], ob["logits"])
        torch.testing.assert_close(od["cam"], ob["cam"])
        psi = torch.zeros(14, 4, 4)
        psi[2, :2, :] = 1.0  # Effusion: top half of the feature grid
        dm.set_disease_masks(psi)
        od = dm(x)
    torch.testing.assert_close(od["features"], ob["features"])  # "features" is f, before psi
    torch.testing.assert_close(od["cam"][:, 2, :2], 2 * ob["cam"][:, 2, :2])  # f' = psi f + f (Eq. 4)
    torch.testing.assert_close(od["cam"][:, 2, 2:], ob["cam"][:, 2, 2:])
    torch.testing.assert_close(od["cam"][:, 3], ob["cam"][:, 3])
    assert not torch.allclose(od["logits"][:, 2], ob["logits"][:, 2])
    # the masks travel in the state dict with a fixed shape
    clone = create_model("dm", **dm.arch_kwargs)
    clone.load_state_dict(dm.state_dict())
    torch.testing.assert_close(clone.disease_masks, psi)
    with pytest.raises(ModelError):
        dm.set_disease_masks(torch.zeros(3, 4, 4))


def test_feature_masks_give_class_specific_branches() -> None:
    """attention-mining Eq. 1-2: logit_c = w_c . GAP(X * M^c) + b_c."""
    torch.manual_seed(0)
    m = create_model("msa", backbone="tiny").eval()
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        full = m(x)
        masks = torch.ones(2, 14, 8, 8)
        masks[:, 5, 2:5, 3:6] = 0  # erase a block for Nodule
        erased = m(x, feature_masks=masks)
    X = full["features"]
    assert X.shape == (2, 32 + 16, 8, 8)  # tiny: 128/4 + 64/4 channels at stride 16
    w, b = m.cam_weights()
    manual = (X * masks[:, 5:6]).mean((2, 3)) @ w[5] + b[5]
    torch.testing.assert_close(erased["logits"][:, 5], manual, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(erased["logits"][:, 4], full["logits"][:, 4])
    assert torch.equal(full["msa"], full["features"])


def test_space_attention_features_carry_context() -> None:
    torch.manual_seed(0)
    m = create_model("space_attention", backbone="tiny").eval()
    with torch.no_grad():
        out = m(torch.randn(1, 1, 128, 128))
    f5, feats = out["stage5"], out["features"]
    k = f5.shape[1]
    assert feats.shape[1] == 2 * k
    torch.testing.assert_close(feats[:, :k], f5)
    ctx = feats[:, k:]
    torch.testing.assert_close(ctx, f5.mean((2, 3), keepdim=True).expand_as(ctx))


def test_attention_gated_maps_are_spatial_softmax() -> None:
    torch.manual_seed(0)
    m = create_model("attention_gated", backbone="tiny").eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 128, 128))
    for lvl, size in (("stage3", 16), ("stage4", 8)):
        a = out[f"attention_{lvl}"]
        assert a.shape == (2, 1, size, size)
        torch.testing.assert_close(a.sum((2, 3)), torch.ones(2, 1))
        torch.testing.assert_close(a, torch.softmax(out[f"compat_{lvl}"].flatten(2), 2).view_as(a))


def test_lung_heart_mask_weights_features() -> None:
    """lung-heart Eq. 3: F_l = F_g * AdaptiveAvgPool(M_g)."""
    torch.manual_seed(0)
    m = create_model("lung_heart", backbone="tiny").eval()
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        none = m(x)
        ones = m(x, torch.ones(2, 1, 128, 128))
        torch.testing.assert_close(none["logits"], ones["logits"])
        zeros = m(x, torch.zeros(2, 1, 128, 128))
        torch.testing.assert_close(zeros["logits"], m.classifier.bias.expand(2, 14))
        half = torch.zeros(2, 1, 128, 128)
        half[..., :64] = 1.0
        out = m(x, half)
        three = torch.zeros(2, 3, 128, 128)
        three[:, 0, :, :32] = 1.0
        three[:, 1, :, 32:64] = 1.0
        merged = m(x, three)
    torch.testing.assert_close(out["features"][..., 2:], torch.zeros_like(out["features"][..., 2:]))
    torch.testing.assert_close(out["features"][..., :2], out["global_features"][..., :2])
    torch.testing.assert_close(merged["logits"], out["logits"])
    a = none["input_attention"]
    assert a.shape == (2, 1, 128, 128) and ((a > 0) & (a < 1)).all()


# ---------------------------------------------------------------- alignment
def _smooth_image(size: int = 128) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / 0.3) + 0.5 * torch.sin(2.5 * xx) * torch.cos(1.7 * yy)
    return img[None, None]


def test_alignment_is_identity_at_init_and_trainable() -> None:
    torch.manual_seed(0)
    m = create_model("alignment", backbone="tiny")
    x = _smooth_image(64).repeat(2, 1, 1, 1)
    out = m(x)
    torch.testing.assert_close(out["params"], torch.tensor([al.IDENTITY_PARAMS] * 2))
    torch.testing.assert_close(out["theta"], torch.eye(2, 3).expand(2, 2, 3))
    torch.testing.assert_close(out["aligned"], x, atol=1e-5, rtol=0)
    (out["aligned"] - x.flip(-1)).square().mean().backward()
    assert m.fc.weight.grad.abs().sum() > 0  # gradients reach the regressor through the warp


def test_affine_matrix_follows_the_paper() -> None:
    p = torch.tensor([[1.2, 0.8, 0.1, -0.2, 0.3]])
    sx, sy, tx, ty, t = p[0].tolist()
    expected = torch.tensor([[[sx * math.cos(t), -sy * math.sin(t), tx],
                              [sx * math.sin(t), sy * math.cos(t), ty]]])
    torch.testing.assert_close(al.affine_matrix(p), expected)
    torch.testing.assert_close(al.params_from_raw(al.raw_from_params(p)), p)
    inv = al.invert_affine(expected)
    full = torch.cat([expected, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    full_inv = torch.cat([inv, torch.tensor([[[0.0, 0.0, 1.0]]])], 1)
    torch.testing.assert_close(full @ full_inv, torch.eye(3)[None], atol=1e-6, rtol=0)


def test_warp_then_inverse_returns_the_image() -> None:
    img = _smooth_image(128)
    params = torch.tensor([[1.1, 0.9, 0.06, -0.04, 0.2]])  # real scale, shift and rotation
    theta = al.affine_matrix(params)
    warped = al.warp(img, theta)
    assert (warped - img).abs().max() > 0.1  # the warp really moved the image
    back = al.warp(warped, al.invert_affine(theta))
    rng = float(img.max() - img.min())
    c = slice(32, 96)  # away from the borders (content there left the frame)
    err = (back[..., c, c] - img[..., c, c]).abs().max().item()
    assert err < 0.01 * rng, err


def test_grid_smooth_is_block_average_then_bilinear() -> None:
    img = _smooth_image(64)
    s = al.grid_smooth(img, cell=16)
    assert s.shape == img.shape
    torch.testing.assert_close(s.mean(), img.mean(), atol=0.02, rtol=0)


# ---------------------------------------------------------------- CIA-Net
def test_cia_attention_sums_to_grid_area_and_grid_follows_input() -> None:
    torch.manual_seed(0)
    m = create_model("cia", backbone="tiny", head_channels=16).eval()
    x_pos, x_neg = get_spec("cia").example_inputs(2, 256)
    with torch.no_grad():
        out = m(x_pos, x_neg)
        same = m(x_pos, x_pos)
        up = m(x_pos, x_neg, upsample_to=32)
    dm = out["attention"]
    assert dm.shape == (2, 1, 8, 8)  # 256 px -> 8 x 8 grid (512 px -> 16 x 16)
    torch.testing.assert_close(dm.sum((2, 3)), torch.full((2, 1), 64.0))
    torch.testing.assert_close(out["weighted_features"], dm * out["features"])  # Eq. 3
    torch.testing.assert_close(same["attention"], torch.ones_like(dm))  # identical pair: uniform
    torch.testing.assert_close(cia.normalise_attention(torch.randn(3, 1, 5, 7)).sum((2, 3)),
                               torch.full((3, 1), 35.0))
    p = out["grid_probs"]
    torch.testing.assert_close(out["image_probs"], 1 - (1 - p).flatten(2).prod(2), atol=1e-5, rtol=1e-4)
    assert up["grid_probs"].shape == (2, 14, 32, 32)


def test_cia_shared_encoder_variant() -> None:
    m = create_model("cia", backbone="tiny", head_channels=8, share_encoder=True)
    assert m.encoder is None
    out = m(*get_spec("cia").example_inputs(1, 128))
    assert out["grid_probs"].shape == (1, 14, 4, 4)
    _backward(out)
    assert m.attention_conv.weight.grad is not None


def test_pairing_picks_the_nearest_code_by_cosine() -> None:
    torch.manual_seed(0)
    imgs = torch.rand(5, 1, 64, 64)
    codes = cia.hash_codes(imgs)
    assert codes.shape == (5, 256)
    torch.testing.assert_close(codes[0].reshape(16, 16), imgs[0, 0].reshape(16, 4, 16, 4).mean((1, 3)))
    for i in range(5):
        assert cia.nearest_normal(codes[i], codes) == i
    v = torch.rand(256) + 0.5
    noise = torch.randn(256) * 0.05
    bank = torch.stack([v + noise, 3 * v, -v])  # Euclid-nearest is 0, cosine-nearest is 1
    assert (bank[0] - v).norm() < (bank[1] - v).norm()
    assert cia.nearest_normal(v, bank) == 1
    assert cia.nearest_normals(torch.stack([v, -v]), bank).tolist() == [1, 2]
    with pytest.raises(ModelError):
        cia.nearest_normal(v, torch.zeros(0, 256))


# ---------------------------------------------------------------- U-Net
def test_unet_three_channels_any_size() -> None:
    assert SEGMENTATION_CLASSES == ("left_lung", "right_lung", "heart")
    m = create_model("unet", width=4, depth=3)
    out = m(torch.randn(1, 1, 50, 70))
    assert out["logits"].shape == (1, 3, 50, 70)
    _backward(out)
    assert _grads_ok(m) > 0
