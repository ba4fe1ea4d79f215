"""CIA-Net's normal bank computed once: the cached ``M-`` gives the uncached outputs, a bundle's
precomputed array is used only when it fits, and a wrong one is ignored with a notice."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle, save_bundle
from cxrviewer.core.device import DeviceInfo
from cxrviewer.core.explain.contrast import BANK_ATTENTION, BANK_ATTENTION_KEY, precompute_bank_attention
from cxrviewer.core.models.cia import CIANet, negative_fingerprint
from cxrviewer.core.pipeline import Pipeline

SIZE = 64
MAPS = ("contrast", "grid", "grid_raw")


@pytest.mark.parametrize("share", [False, True])
def test_forward_with_precomputed_negative_equals_the_pair(share: bool) -> None:
    torch.manual_seed(0)
    m = CIANet(backbone="tiny", num_classes=3, head_channels=8, share_encoder=share).eval()
    x_pos, x_neg = torch.rand(2, 1, SIZE, SIZE) * 2 - 1, torch.rand(1, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        ref = m(x_pos, x_neg.expand(2, -1, -1, -1))
        got = m(x_pos, neg_attention=m.negative_attention(x_neg))  # one map serves the whole batch
    for k in ("grid_probs", "attention", "image_probs", "attention_neg"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="does not fit"):
        m(x_pos, neg_attention=torch.zeros(1, 1, 3, 3))


@pytest.fixture(scope="module")
def cia_path(tmp_path_factory):
    """A CIA bundle without precomputed bank maps (as older and imported bundles): init_bundle
    writes them, as `cxr-train cia` does, so they are dropped here."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cia")
    made = make_tiny_bundles(folder, ("cia",), input_size=SIZE)["cia"]
    assert BANK_ATTENTION in load_bundle(made).extras
    return _resave(made, folder / "bare.cxrbundle", lambda b: {}, drop=(BANK_ATTENTION, BANK_ATTENTION_KEY))


def _run(b, **options):
    return Pipeline({"cia": b}, "cpu", map_max_side=64, options=options).run(synthetic_study())


def _same(a, b) -> None:
    for k in MAPS:
        np.testing.assert_allclose(a.get("contrast", k), b.get("contrast", k), rtol=1e-4, atol=1e-5)
    assert a.attr("contrast", "paired_normal_id") == b.attr("contrast", "paired_normal_id")


def _encoder_batches(b) -> list[int]:
    seen: list[int] = []
    b.model.attention_encoder().register_forward_hook(lambda mod, inp, out: seen.append(int(inp[0].shape[0])))
    return seen


def test_computed_once_then_from_memory_equal_to_uncached(cia_path) -> None:
    b = load_bundle(cia_path)
    batches = _encoder_batches(b)
    ref = _run(b, cia_bank_cache=False)
    assert ref.attr("contrast", "normal_bank_cache") == "off" and batches == [2]  # positive + negative
    first, second = _run(b), _run(b)
    assert first.attr("contrast", "normal_bank_cache") == "computed"
    assert second.attr("contrast", "normal_bank_cache") == "memory"
    assert batches == [2, 1, 1, 1]  # bank image once, then the positive alone per study
    _same(first, ref)
    _same(second, ref)


def test_memory_cache_is_keyed_by_dtype_and_weights(cia_path) -> None:
    b = load_bundle(cia_path)
    assert _run(b).attr("contrast", "normal_bank_cache") == "computed"
    bf16 = DeviceInfo(torch.device("cpu"), torch.bfloat16, "cpu bf16")
    res = Pipeline({"cia": b}, bf16, map_max_side=64).run(synthetic_study())
    assert res.attr("contrast", "normal_bank_cache") == "computed"  # not the float32 maps
    with torch.no_grad():
        b.model.attention_conv.weight.mul_(-2.0)  # changed weights: a stale M- must not be reused
    changed = _run(b)
    assert changed.attr("contrast", "normal_bank_cache") == "computed"
    _same(changed, _run(b, cia_bank_cache=False))


def _resave(src, dst, extras_update, drop=()):
    b = load_bundle(src)
    extras = {**{k: v for k, v in b.extras.items() if k not in drop}, **extras_update(b)}
    m = b.manifest
    return save_bundle(b.model, dst, classes=list(m.classes), input_size=tuple(m.input_size),
                       normalisation=m.normalisation, role="cia", extras=extras, overwrite=True)


def _precomputed(b):
    return precompute_bank_attention(b.model, b.extras["normal_bank_images"], b.manifest.input_size,
                                     b.manifest.normalisation)


def test_precomputed_in_the_bundle_is_used_and_equal(cia_path, tmp_path) -> None:
    path = _resave(cia_path, tmp_path / "pre.cxrbundle", _precomputed)
    b = load_bundle(path)
    batches = _encoder_batches(b)
    key = json.loads(str(b.extras[BANK_ATTENTION_KEY][0]))
    assert key["model"] == negative_fingerprint(b.model) and key["input_size"] == [SIZE, SIZE]
    res = _run(b)
    assert res.attr("contrast", "normal_bank_cache") == "bundle" and batches == [1]
    assert res.attr("contrast", "normal_bank_cache_notice") is None
    _same(res, _run(load_bundle(cia_path), cia_bank_cache=False))


def test_a_folded_model_keeps_the_bundle_maps_until_its_weights_change(cia_path, tmp_path) -> None:
    """The pipeline folds BN into the convolutions (models/fold.py): the bundle's maps, keyed by
    the unfolded weights, still serve the equal-valued folded model, and no longer once the folded
    weights change."""
    from cxrviewer.core.models.fold import is_folded

    path = _resave(cia_path, tmp_path / "pre.cxrbundle", _precomputed)
    b = load_bundle(path)
    unfolded = negative_fingerprint(b.model)
    assert _run(b).attr("contrast", "normal_bank_cache") == "bundle" and is_folded(b.model)
    assert negative_fingerprint(b.model) == unfolded
    with torch.no_grad():
        b.model.attention_conv.weight.mul_(-2.0)
    assert negative_fingerprint(b.model) != unfolded
    res = _run(b)
    assert res.attr("contrast", "normal_bank_cache") == "computed"
    assert "different model" in res.attr("contrast", "normal_bank_cache_notice")


def _wrong_shape(b):
    d = _precomputed(b)
    return {**d, BANK_ATTENTION: np.zeros((d[BANK_ATTENTION].shape[0], 1, 3, 3), np.float32)}


def _wrong_dtype(b):
    d = _precomputed(b)
    return {**d, BANK_ATTENTION: d[BANK_ATTENTION].astype(np.float64)}


def _other_model(b):
    d = _precomputed(b)
    key = json.loads(str(d[BANK_ATTENTION_KEY][0]))
    key["model"] = "0" * 64
    return {**d, BANK_ATTENTION: d[BANK_ATTENTION] + 1.0, BANK_ATTENTION_KEY: np.asarray([json.dumps(key)])}


def _garbage_key(b):
    return {**_precomputed(b), BANK_ATTENTION_KEY: np.asarray(["{not json"])}


def _missing_key(b):
    return {BANK_ATTENTION: _precomputed(b)[BANK_ATTENTION]}


@pytest.mark.parametrize("bad, why", [(_wrong_shape, "does not fit"), (_wrong_dtype, "not float32"),
                                      (_other_model, "different model"), (_garbage_key, "not a JSON"),
                                      (_missing_key, "only one of")])
def test_a_wrong_precomputed_array_is_ignored_with_a_notice(cia_path, tmp_path, caplog, bad, why) -> None:
    b = load_bundle(_resave(cia_path, tmp_path / "bad.cxrbundle", bad))
    with caplog.at_level("WARNING"):
        res = _run(b)
    assert res.attr("contrast", "normal_bank_cache") == "computed"
    assert why in res.attr("contrast", "normal_bank_cache_notice")
    assert "ignored" in caplog.text
    _same(res, _run(load_bundle(cia_path), cia_bank_cache=False))


def test_trainer_helper_adds_the_bank_maps(cia_path) -> None:
    from training.trainers.cia import with_bank_attention

    b = load_bundle(cia_path)
    norm = b.manifest.normalisation
    extras = with_bank_attention(b.model, dict(b.extras), SIZE, norm)
    assert extras[BANK_ATTENTION].shape[:2] == (len(b.extras["normal_bank_images"]), 1)
    assert extras[BANK_ATTENTION].dtype == np.float32
    assert with_bank_attention(b.model, {}, SIZE, norm) == {}  # no bank: nothing to add


def test_cxr_train_cia_writes_the_bank_maps_the_pipeline_uses(tmp_path) -> None:
    from training.cli import main
    from training.phantoms import PhantomConfig, write_phantom_dataset

    data = tmp_path / "set"
    write_phantom_dataset(data, n=24, size=SIZE, seed=5, config=PhantomConfig(normal_fraction=0.4, max_findings=1))
    out = tmp_path / "cia"
    assert main(["cia", "--data", str(data), "--out", str(out), "--backbone", "tiny", "--arch-kwargs",
                 '{"head_channels": 8}', "--size", str(SIZE), "--epochs", "1", "--batch-size", "8",
                 "--bank-size", "4", "--no-augment"]) == 0
    b = load_bundle(str(out) + ".cxrbundle")
    assert b.extras[BANK_ATTENTION].shape[0] == len(b.extras["normal_bank_images"])
    res = _run(b)
    assert res.attr("contrast", "normal_bank_cache") == "bundle"
    _same(res, _run(b, cia_bank_cache=False))
