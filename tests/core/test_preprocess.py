"""Manifest-driven preprocessing: :class:`Preprocess` against the pipeline's reference steps."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from cxrviewer.core.bundle import default_models_dir, find_bundles, read_manifest
from cxrviewer.core.preprocess import (NORMALISATIONS, CropBox, Preprocess, apply_stretch, as_image_tensor,
                                       crop_box_pixels, denormalise, normalise, prepare_input, resize)


def _input01_reference(frame: torch.Tensor, manifest: Any) -> tuple[torch.Tensor, CropBox | None]:
    """``_input01`` of cxrviewer/core/pipeline.py as it was: crop + resize + stretch, no normalisation."""
    box = crop_box_pixels(manifest.crop, (frame.shape[-2], frame.shape[-1]))
    t = frame
    if box is not None:
        y0, y1, x0, x1 = box
        t = t[..., y0:y1, x0:x1]
    return apply_stretch(resize(t, tuple(manifest.input_size)), manifest), box


def _manifest(size=(32, 32), crop=None, norm=None, provenance=None) -> SimpleNamespace:
    return SimpleNamespace(input_size=size, crop=crop or {"kind": "none"},
                           normalisation=norm or {"kind": "minus1_1"}, provenance=provenance or {})


STRETCH = {"kind": "percentile_stretch", "low": 2.0, "high": 97.0}
MANIFESTS = [
    _manifest(),
    _manifest((64, 48)),  # up-sampling
    _manifest((80, 80)),  # the frame's own size: no resize
    _manifest((24, 40), crop={"kind": "box", "box": [0.25, 0.0, 1.0, 0.5]}),
    _manifest((16, 16), crop={"kind": "box", "box": [0.0, 0.0, 1.0, 1.0]}),  # whole frame -> no box
    _manifest((32, 32), norm={"kind": "minus1_1", "stretch": STRETCH}),
    _manifest((32, 32), provenance={"preprocess": {"kind": "percentile_stretch", "low": 1, "high": 99}}),
    _manifest((40, 20), crop={"kind": "box", "box": [0.1, 0.2, 0.9, 0.8]},
              norm={"kind": "mean_std", "mean": 0.4, "std": 0.2, "stretch": STRETCH}),
]


@pytest.mark.parametrize("manifest", MANIFESTS)
@pytest.mark.parametrize("channels, batch", [(1, 1), (3, 1), (1, 2)])
def test_crop_resize_bit_identical_to_pipeline_input01(manifest, channels, batch):
    g = torch.Generator().manual_seed(channels * 10 + batch)
    frame = torch.rand(batch, channels, 80, 80, generator=g)
    want, want_box = _input01_reference(frame, manifest)
    got, box = Preprocess.from_manifest(manifest).crop_resize(frame)
    assert box == want_box
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    x, box2 = Preprocess.from_manifest(manifest)(frame)
    assert box2 == want_box and torch.equal(x, normalise(want, manifest.normalisation))


def test_crop_resize_bit_identical_for_shipped_bundles():
    bundles = find_bundles(default_models_dir())
    assert bundles, "resources/models holds the shipped bundles"
    frame = torch.rand(1, 1, 300, 260, generator=torch.Generator().manual_seed(3))
    for p in bundles:
        m = read_manifest(p)
        want, want_box = _input01_reference(frame, m)
        got, box = Preprocess.from_manifest(m).crop_resize(frame)
        assert box == want_box and torch.equal(got, want), p.name


def test_prepare_input_matches_the_steps():
    img = np.random.default_rng(0).random((70, 50)).astype(np.float32)
    man = _manifest((32, 24), crop={"kind": "box", "box": [0.25, 0.0, 1.0, 0.5]})
    x, box = prepare_input(img, man)
    want, want_box = _input01_reference(as_image_tensor(img), man)
    assert box == want_box and torch.equal(x, want * 2.0 - 1.0)


@pytest.mark.parametrize("norm", [{"kind": "minus1_1"}, {"kind": "zero_one"},
                                  {"kind": "mean_std", "mean": 0.4, "std": 0.2}, {"kind": "mean_std"}, None])
def test_normalise_one_table(norm):
    t = torch.rand(2, 1, 8, 8)
    pre = Preprocess.from_normalisation(norm)
    assert torch.equal(pre.normalise(t), normalise(t, norm))
    assert torch.equal(pre.denormalise(pre.normalise(t)), denormalise(normalise(t, norm), norm))
    torch.testing.assert_close(pre.denormalise(pre.normalise(t)), t)
    a = t.numpy()[0, 0]
    out = pre.normalise_array(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(out, pre.normalise(t[0, 0]).numpy())
    assert set(NORMALISATIONS) == {"minus1_1", "zero_one", "mean_std", "channel_mean_std"}


def test_normalisation_values():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert Preprocess().normalise(t).tolist() == [-1.0, 0.0, 1.0]
    assert Preprocess(normalisation="zero_one").normalise(t).tolist() == [0.0, 0.5, 1.0]
    assert Preprocess(normalisation="mean_std", mean=0.5, std=0.25).normalise(t).tolist() == [-2.0, 0.0, 2.0]


def test_only_one_spelling():
    with pytest.raises(ValueError, match="zero_1"):
        Preprocess(normalisation="zero_1")
    with pytest.raises(ValueError, match="weird"):
        normalise(torch.zeros(1), {"kind": "weird"})
    with pytest.raises(ValueError, match="crop box"):
        Preprocess.from_manifest(_manifest(crop={"kind": "box", "box": [0.1, 0.2]}))


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_to_manifest_round_trip(manifest):
    pre = Preprocess.from_manifest(manifest)
    fields = pre.to_manifest()
    again = Preprocess.from_manifest(SimpleNamespace(**fields))
    assert again == pre
    frame = torch.rand(1, 1, 80, 80, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again(frame)[0], pre(frame)[0])


def test_training_datasets_carry_a_preprocess():
    from training.data import ChestDataset, dataset_preprocess
    from training.trainers.disease_masks import AlignedDataset

    ds = ChestDataset([], 64, normalisation="zero_one")
    assert ds.preprocess == Preprocess.from_normalisation("zero_one", 64) and ds.normalisation == "zero_one"
    pre = Preprocess(input_size=(64, 64), normalisation="mean_std", mean=0.3, std=0.2)
    ds = ChestDataset([], 64, preprocess=pre)
    assert dataset_preprocess(ds) is pre
    assert dataset_preprocess(AlignedDataset(ds, torch.zeros(0, 2, 3))) is pre
    assert dataset_preprocess(SimpleNamespace(normalisation="zero_one")).normalisation == "zero_one"
    assert dataset_preprocess(SimpleNamespace()) == Preprocess()


# ---- the canonical chest -------------------------------------------------------------------
def _canonical01() -> torch.Tensor:
    from PIL import Image

    from cxrviewer.core.canonical import default_canonical_path

    with Image.open(default_canonical_path()) as im:
        return torch.from_numpy(np.asarray(im.convert("L"), np.float32) / 255.0)[None, None]


@pytest.mark.parametrize("antialias", [True, False])
def test_load_canonical(antialias):
    import torch.nn.functional as F

    from cxrviewer.core.canonical import canonical_crop_box, default_canonical_path, load_canonical

    if not default_canonical_path().is_file():
        pytest.skip("resources/canonical_chest.png is not in this checkout")
    full = _canonical01()
    assert torch.equal(load_canonical(), full.clamp(0, 1))
    assert torch.equal(load_canonical(size=full.shape[-1], antialias=antialias), full.clamp(0, 1))
    want = F.interpolate(full, size=(64, 64), mode="bilinear", align_corners=False, antialias=antialias)
    assert torch.equal(load_canonical(default_canonical_path(), 64, antialias=antialias), want.clamp(0, 1))
    box = canonical_crop_box(default_canonical_path())
    assert box is not None and len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
