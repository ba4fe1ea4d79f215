"""Model bundles: round trip, manifest validation, safe loading of weights."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrviewer.core.bundle import (
    EXTRAS,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    find_bundles,
    load_bundle,
    read_manifest,
    save_bundle,
)
from cxrviewer.core.classes import CLASSES
from cxrviewer.core.errors import BundleError
from cxrviewer.core.models import create_model


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("cam_classifier", backbone="tiny", **kw)


def _save(tmp_path: Path, model=None, **kw) -> Path:
    model = model if model is not None else _tiny()
    kw.setdefault("classes", CLASSES)
    kw.setdefault("input_size", 64)
    return save_bundle(model, tmp_path / "clf", **kw)


def _manifest(p: Path) -> dict:
    return json.loads((p / MANIFEST).read_text())


def _write_manifest(p: Path, d: dict) -> None:
    (p / MANIFEST).write_text(json.dumps(d))


def _rehash(p: Path, name: str = WEIGHTS) -> None:
    """Make the manifest agree with a replaced file (an attacker can edit both)."""
    d = _manifest(p)
    data = (p / name).read_bytes()
    d["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_manifest(p, d)


def test_round_trip_identical_outputs(tmp_path):
    model = _tiny().eval()
    psi_like = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    p = _save(tmp_path, model, extras={"prior": psi_like, "ids": np.asarray(["a", "b"])},
              provenance={"seed": 3, "research_demo": True}, crop={"kind": "box", "box": [0.1, 0.1, 0.9, 0.9]})
    assert p.name == "clf.cxrbundle" and (p / WEIGHTS).is_file() and (p / EXTRAS).is_file()
    b = load_bundle(p)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        a, c = model(x), b.model(x)
    for k in ("logits", "cam", "features"):
        assert torch.equal(a[k], c[k]), k
    m = b.manifest
    assert m.architecture == "cam_classifier" and m.family == "classifier"
    assert m.classes == CLASSES and m.input_size == (64, 64)
    assert m.arch_kwargs["backbone"] == "tiny" and m.crop["box"] == [0.1, 0.1, 0.9, 0.9]
    assert m.provenance["seed"] == 3 and m.research_demo and m.format_version == FORMAT_VERSION
    assert m.weights_sha256 == hashlib.sha256((p / WEIGHTS).read_bytes()).hexdigest()
    assert np.array_equal(b.extras["prior"], psi_like) and list(b.extras["ids"]) == ["a", "b"]
    assert not b.model.training and not any(q.requires_grad for q in b.model.parameters())
    assert read_manifest(p).to_dict() == m.to_dict()
    assert find_bundles([tmp_path, tmp_path / "missing"]) == [p]


def test_existing_bundle_not_overwritten_by_default(tmp_path):
    p = _save(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        _save(tmp_path)
    assert _save(tmp_path, overwrite=True) == p
    assert [q.name for q in tmp_path.iterdir()] == ["clf.cxrbundle"]  # no temp folders left


def test_object_extras_refused(tmp_path):
    with pytest.raises(BundleError, match="dtype object"):
        _save(tmp_path, extras={"bad": np.asarray([{"a": 1}], dtype=object)})


def test_weights_sha_mismatch_refused(tmp_path):
    p = _save(tmp_path)
    data = bytearray((p / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (p / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(p)


def test_truncated_weights_refused(tmp_path):
    p = _save(tmp_path)
    data = (p / WEIGHTS).read_bytes()
    (p / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(p)
    _rehash(p)  # even with matching checksums the torch reader refuses it
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(p)


class _Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_payload_refused_and_never_runs(tmp_path):
    # The payload is real: an unsafe loader runs it.
    proof = tmp_path / "proof_marker"
    torch.save({"w": torch.zeros(1), "evil": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()

    marker = tmp_path / "marker"
    p = _save(tmp_path)
    state = torch.load(p / WEIGHTS, weights_only=True)
    state["evil"] = _Payload(marker)
    torch.save(state, p / WEIGHTS)
    _rehash(p)
    with pytest.raises(BundleError, match="refused"):
        load_bundle(p)
    assert not marker.exists()
    # a raw pickle (not a torch zip) with a payload is refused too
    (p / WEIGHTS).write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    _rehash(p)
    with pytest.raises(BundleError):
        load_bundle(p)
    assert not marker.exists()


def test_wrong_class_list_refused(tmp_path):
    p = _save(tmp_path)
    d = _manifest(p)
    d["classes"] = d["classes"][:13]
    _write_manifest(p, d)
    with pytest.raises(BundleError, match="lists 13 classes but the network .* produces 14"):
        load_bundle(p)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    p = _save(tmp_path)
    d = _manifest(p)
    d["arch_kwargs"]["num_classes"] = 3
    d["classes"] = list(CLASSES[:3])
    _write_manifest(p, d)
    with pytest.raises(BundleError, match=r"'classifier.weight' has shape \(14, 128\).*expects \(3, 128\)"):
        load_bundle(p)


@pytest.mark.parametrize("change, message", [
    ("drop", "lack tensor 'classifier.bias'"),
    ("add", "unexpected tensor 'extra.weight'"),
])
def test_missing_or_unexpected_tensor(tmp_path, change, message):
    p = _save(tmp_path)
    state = torch.load(p / WEIGHTS, weights_only=True)
    if change == "drop":
        del state["classifier.bias"]
    else:
        state["extra.weight"] = torch.zeros(2)
    torch.save(state, p / WEIGHTS)
    _rehash(p)
    with pytest.raises(BundleError, match=message):
        load_bundle(p)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(architecture="no_such_net"), "unknown architecture 'no_such_net'"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "newer than this cxrviewer reads"),
    (lambda d: d.update(family="alignment"), "disagrees with the registry"),
    (lambda d: d.update(family="segmentation"), "not in the lung/heart segmentation label set"),
    (lambda d: d.update(normalisation={"kind": "weird"}), "normalisation"),
    (lambda d: d.pop("classes"), "lacks 'classes'"),
])
def test_manifest_errors(tmp_path, edit, message):
    p = _save(tmp_path)
    d = _manifest(p)
    edit(d)
    _write_manifest(p, d)
    with pytest.raises(BundleError, match=message):
        load_bundle(p)


def test_bad_json_and_missing_parts(tmp_path):
    p = _save(tmp_path)
    (p / MANIFEST).write_text('{"format_version": 1, "architecture": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(p)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nothing.cxrbundle")
    q = save_bundle(_tiny(), tmp_path / "other", classes=CLASSES, input_size=64)
    (q / WEIGHTS).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(q)


def test_disease_masks_extras_applied(tmp_path):
    torch.manual_seed(0)
    model = create_model("dm", backbone="tiny", mask_size=4)
    psi = np.zeros((14, 4, 4), np.float32)
    psi[:, 1:3, 1:3] = 1
    p = save_bundle(model, tmp_path / "dm", classes=CLASSES, input_size=64, extras={"disease_masks": psi})
    b = load_bundle(p)
    assert torch.equal(b.model.disease_masks, torch.from_numpy(psi))


def test_fp16_storage_round_trips_within_half_precision(tmp_path):
    """Bundles shipped in resources/ store weights as float16: half the bytes, same network."""
    import torch as _torch

    from cxrviewer.core.bundle import load_bundle as _load, save_bundle as _save
    from cxrviewer.core.classes import CLASSES as _CLASSES
    from cxrviewer.core.models import create_model as _create

    _torch.manual_seed(0)
    m = _create("cam_classifier", backbone="tiny").eval()
    p32 = _save(m, tmp_path / "a", classes=_CLASSES, input_size=64)
    p16 = _save(m, tmp_path / "b", classes=_CLASSES, input_size=64, weights_dtype="float16")
    size32 = (p32 / "weights.pt").stat().st_size
    size16 = (p16 / "weights.pt").stat().st_size
    assert size16 < 0.6 * size32
    b = _load(p16)
    assert all(t.dtype == _torch.float32 for t in b.model.state_dict().values() if t.is_floating_point())
    x = _torch.rand(1, 1, 64, 64) * 2 - 1
    with _torch.no_grad():
        ref = m(x)["logits"]
        got = b.model(x)["logits"]
    _torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


def test_legacy_zero_1_spelling_loads_as_zero_one(tmp_path):
    """A manifest written with the old ``zero_1`` spelling reads as ``zero_one`` (and is never written)."""
    from cxrviewer.core.preprocess import Preprocess

    p = _save(tmp_path, normalisation={"kind": "zero_1"})
    assert _manifest(p)["normalisation"] == {"kind": "zero_one"}
    d = _manifest(p)
    d["normalisation"] = {"kind": "zero_1"}
    _write_manifest(p, d)
    b = load_bundle(p)
    assert b.manifest.normalisation == {"kind": "zero_one"}
    assert Preprocess.from_manifest(b.manifest).normalisation == "zero_one"
    assert read_manifest(p).to_dict()["normalisation"] == {"kind": "zero_one"}


def test_families_defined_once():
    from cxrviewer.core import bundle
    from cxrviewer.core.models import registry

    assert bundle.FAMILIES is registry.FAMILIES


def test_sha256_file_is_the_manifest_checksum(tmp_path):
    from cxrviewer.core.canonical import canonical_ref
    from cxrviewer.core.checksum import sha256_file

    p = _save(tmp_path)
    assert sha256_file(p / WEIGHTS) == hashlib.sha256((p / WEIGHTS).read_bytes()).hexdigest()
    assert sha256_file(p / WEIGHTS) == _manifest(p)["files"][WEIGHTS]["sha256"]
    assert canonical_ref(p / WEIGHTS) == {"file": WEIGHTS, "sha256": sha256_file(p / WEIGHTS)}
