"""The pipeline: one classifier forward, every map in original coordinates, stages and cancel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.errors import BundleError
from cxrviewer.core.explain.context import Mapper as _Mapper
from cxrviewer.core.pipeline import Pipeline, PipelineCancelled, assign_roles


@pytest.fixture(scope="module")
def bundle_paths(tmp_path_factory):
    return make_tiny_bundles(tmp_path_factory.mktemp("bundles"))


def _load(paths, roles):
    return {r: load_bundle(paths[r]) for r in roles}


@pytest.fixture(scope="module")
def full_run(bundle_paths):
    pl = Pipeline(_load(bundle_paths, ("alignment", "segmentation", "classifier", "dm", "cia")), "cpu",
                  map_max_side=128, am_top_k=2)
    calls = []
    hook = pl.bundles["classifier"].model.backbone.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    study = synthetic_study()
    res = pl.run(study, on_stage=lambda name, r: seen.append((name, r)))
    hook.remove()
    return pl, study, res, seen, calls


def test_all_stages_run_in_order_and_timed(full_run):
    _, _, res, seen, _ = full_run
    pl = full_run[0]
    names = [n for n, _ in seen]
    STAGES = ["preprocess", "alignment", "segmentation", "cam", "gradcam", "attention_mining", "disease_mask",
              "contrast", "anatomy", "prior", "boxes"]
    assert names == STAGES == pl.stages
    assert all(r is res for _, r in seen)  # partial results object filled progressively
    assert set(res.timings) == set(STAGES) and all(t >= 0 for t in res.timings.values())
    assert res.device.startswith("cpu")
    assert set(res.models) == {"alignment", "segmentation", "classifier", "dm", "cia"}
    assert res.models["classifier"]["architecture"] == "msa" and res.models["classifier"]["trained"] is False


def test_one_backbone_pass_shared_by_cam_gradcam_and_am(full_run):
    _, _, res, _, calls = full_run
    assert len(calls) == 1
    assert res.get("cam", "cam") is not None and res.get("gradcam", "gradcam") is not None and res.get("attention_mining", "final") is not None


def test_maps_are_in_original_coordinates(full_run):
    _, study, res, _, _ = full_run
    h, w = study.shape  # 300 x 260 -> longest side 128
    assert res.image_shape == (h, w) and res.map_shape == (128, 111)
    C = len(res.classes)
    mh, mw = res.map_shape
    for arr, shape in [(res.get("cam", "cam"), (C, mh, mw)), (res.get("gradcam", "gradcam"), (C, mh, mw)), (res.get("attention_mining", "final"), (C, mh, mw)),
                       (res.get("disease_mask", "psi"), (C, mh, mw)), (res.get("contrast", "grid"), (C, mh, mw)), (res.get("contrast", "contrast"), (mh, mw)),
                       (res.get("segmentation", "masks"), (3, mh, mw)), (res.get("disease_mask", "dm_cam"), (C, mh, mw))]:
        assert arr is not None and arr.shape == shape
        assert np.isfinite(arr).all()
    assert res.probabilities.shape == (C,) and ((res.probabilities > 0) & (res.probabilities < 1)).all()
    assert res.get("alignment", "aligned_image").shape == (h, w) and res.get("alignment", "affine").shape == (2, 3)
    np.testing.assert_allclose(res.get("alignment", "params"), [1, 1, 0, 0, 0], atol=1e-6)  # identity at init
    # the tiny bundle names no canonical chest: nothing to refine against, no check, no rejection
    np.testing.assert_allclose(res.get("alignment", "affine"), res.get("alignment", "network_affine"), atol=1e-6)
    assert res.attr("alignment", "checked") is False and res.attr("alignment", "rejected") is False
    assert res.get("segmentation", "masks").dtype == np.uint8 and set(np.unique(res.get("segmentation", "masks"))) <= {0, 1}
    assert res.attr("disease_mask", "source") == "dm"
    assert res.get("contrast", "paired_normal").dtype == np.uint8 and res.attr("contrast", "paired_normal_id").startswith("synthetic_")
    assert res.map_scale == pytest.approx((h / mh, w / mw))


def test_boxes_in_original_pixels(full_run):
    _, study, res, _, _ = full_run
    h, w = study.shape
    # anatomy proposes only with a localiser model (resources/priors/anatomy_localiser.json) and lungs found
    assert set(res.boxes) - {"anatomy"} == {"cam", "gradcam", "attention_mining", "contrast", "prior"}
    assert res.boxes["cam"] and res.boxes["attention_mining"]
    for b in (b for bs in res.boxes.values() for b in bs):
        assert b.label in res.classes
        assert -1e-6 <= b.x and b.x2 <= w + 1e-6 and -1e-6 <= b.y and b.y2 <= h + 1e-6
    # AM gives at most three boxes per class (iterative-attention-mining Sec. 3.2)
    for c in res.classes:
        assert len(res.boxes_for(c, "attention_mining")) <= 3


def test_attention_mining_top_k_and_on_demand(full_run):
    pl, _, res, _, _ = full_run
    top = [res.classes[i] for i in res.top_classes(2)]
    assert sorted(res.get("attention_mining", "steps")) == sorted(top) == sorted(res.get("attention_mining", "erased"))
    for name in top:
        assert res.get("attention_mining", "steps")[name].shape == (3, *res.map_shape)
        er = res.get("attention_mining", "erased")[name]
        assert er.dtype == np.uint8 and (np.diff(er.astype(int), axis=0) >= 0).all()  # erasure is cumulative
    other = next(i for i, n in enumerate(res.classes) if n not in top)
    pl.compute_class(res, other)
    assert res.get("attention_mining", "steps")[res.classes[other]].shape == (3, *res.map_shape)


def test_gradcam_matches_relu_cam_for_gap_linear_head(bundle_paths):
    # With GAP -> linear, dy_c/dA_k = W[c,k]/hw, so Grad-CAM = ReLU(CAM)/hw (up to resampling).
    pl = Pipeline(_load(bundle_paths, ("classifier",)), "cpu", map_max_side=64)
    res = pl.run(synthetic_study())
    c = res.top_classes(1)[0]
    g, cam = res.get("gradcam", "gradcam")[c], np.maximum(res.get("cam", "cam")[c], 0)
    assert np.corrcoef(g.ravel(), cam.ravel())[0, 1] > 0.95
    assert "alignment" not in res.timings and res.get("alignment", "aligned_image") is None


def test_cancel_between_stages(bundle_paths):
    pl = Pipeline(_load(bundle_paths, ("segmentation", "classifier")), "cpu", map_max_side=64)
    seen = []
    with pytest.raises(PipelineCancelled, match="cancelled after cam"):
        pl.run(synthetic_study(), on_stage=lambda n, r: seen.append(n), cancel=lambda: "cam" in seen)
    assert seen == ["preprocess", "segmentation", "cam"]


def test_pdm_from_segmentation_without_dm(bundle_paths):
    pl = Pipeline(_load(bundle_paths, ("segmentation", "classifier")), "cpu", map_max_side=64)
    res = pl.run(synthetic_study())
    assert res.attr("disease_mask", "source") == "pdm"
    seg = res.get("segmentation", "masks")
    cardio = res.classes.index("Cardiomegaly")
    assert np.array_equal(res.get("disease_mask", "psi")[cardio] > 0.5, seg[2] > 0)  # heart region
    assert np.array_equal(res.get("disease_mask", "psi")[res.classes.index("Mass")] > 0.5, (seg[0] | seg[1]) > 0)


def test_cia_pairs_the_nearest_normal(bundle_paths):
    b = load_bundle(bundle_paths["cia"])
    bank = b.extras["normal_bank_images"]
    study = synthetic_study()
    img = bank[5].astype(np.float32) / 255.0
    study.model_input = img
    study.stored = bank[5].astype(np.uint16)
    study.modality = img.copy()
    res = Pipeline({"cia": b}, "cpu").run(study)
    assert res.attr("contrast", "paired_normal_id") == str(b.extras["normal_bank_ids"][5])
    assert np.array_equal(res.get("contrast", "paired_normal"), bank[5])
    assert res.classes == b.manifest.classes and res.get("contrast", "grid_raw").shape[0] == len(res.classes)
    assert res.get("contrast", "grid_raw").shape[1:] == (4, 4)  # 128 px input, stride 32
    b.manifest.inference = {"upsample_to": 16}  # cia-net Sec. 3.3 test-time upsampling
    res = Pipeline({"cia": b}, "cpu").run(study)
    assert res.get("contrast", "grid_raw").shape[1:] == (16, 16) and res.get("contrast", "contrast").shape == res.map_shape


def test_inverse_warp_maps_back_to_original():
    from cxrviewer.core.models.alignment import affine_matrix, invert_affine, warp

    h, w = 120, 100
    img = torch.zeros(1, 1, h, w)
    img[..., 30:50, 20:36] = 1.0  # a blob
    theta = affine_matrix(torch.tensor([[0.8, 0.9, 0.2, -0.1, 0.15]]))
    aligned = warp(img, theta)
    assert not torch.allclose(aligned, img, atol=0.1)
    back = _Mapper((h, w), (h, w), None, invert_affine(theta))(aligned[0])[0]

    def centroid(a):
        ys, xs = np.nonzero(a > 0.5)
        return ys.mean(), xs.mean()

    assert np.allclose(centroid(back), centroid(img[0, 0].numpy()), atol=1.5)


def test_roles_and_validation(bundle_paths):
    loaded = [load_bundle(p) for p in bundle_paths.values()]
    roles = assign_roles(loaded)
    assert set(roles) == {"alignment", "segmentation", "classifier", "dm", "cia"}
    assert roles["dm"].manifest.architecture == "dm" and roles["classifier"].manifest.architecture == "msa"
    only_dm = assign_roles([load_bundle(bundle_paths["dm"])])
    assert set(only_dm) == {"classifier"}
    with pytest.raises(BundleError, match="cannot serve as the classifier"):
        Pipeline({"classifier": load_bundle(bundle_paths["segmentation"])}, "cpu")
    res = Pipeline(only_dm, "cpu", map_max_side=64).run(synthetic_study())
    assert res.attr("disease_mask", "source") == "classifier" and res.get("disease_mask", "psi").shape[0] == 14


def test_preprocess_from_manifest_and_back():
    from types import SimpleNamespace

    from cxrviewer.core.preprocess import denormalise, maps_to_frame, normalise, prepare_input

    img = np.linspace(0, 1, 100 * 80, dtype=np.float32).reshape(100, 80)
    man = SimpleNamespace(crop={"kind": "box", "box": [0.25, 0.0, 1.0, 0.5]}, input_size=(32, 24),
                          normalisation={"kind": "minus1_1"})
    x, box = prepare_input(img, man)
    assert x.shape == (1, 1, 32, 24) and box == (0, 50, 20, 80)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 0.0  # top half only: values <= 0.5 -> <= 0
    for norm in ({"kind": "zero_one"}, {"kind": "mean_std", "mean": 0.4, "std": 0.2}, {"kind": "minus1_1"}):
        t = torch.rand(5)
        assert torch.allclose(denormalise(normalise(t, norm), norm), t, atol=1e-6)
    back = maps_to_frame(torch.ones(2, 8, 6), (100, 80), box, fill=-5.0)
    assert back.shape == (2, 100, 80)
    assert torch.allclose(back[:, :50, 20:], torch.ones(1)) and (back[:, 50:] == -5).all()
    assert (back[:, :, :20] == -5).all()
    # the map-back of a frame half the size scales the crop box
    half = maps_to_frame(torch.ones(1, 8, 6), (50, 40), box, (100, 80))
    assert torch.allclose(half[0, :25, 10:], torch.ones(1)) and float(half[0, 25:].abs().sum()) == 0.0


@pytest.mark.parametrize("spec", [s.name for s in __import__("cxrviewer.core.models", fromlist=["x"]).list_models(
    family="classifier")])
def test_every_registered_classifier_runs(spec, tmp_path):
    """Registry-parametrised: each classifier family member gives probabilities, CAM, Grad-CAM and AM."""
    from cxrviewer.core.models import get_spec
    from training.commands.init_bundle import init_bundle

    kw = dict(get_spec(spec).test_kwargs)
    b = load_bundle(init_bundle(spec, tmp_path / spec, kwargs=kw, input_size=64, canonical=False))
    res = Pipeline({"classifier": b}, "cpu", map_max_side=48, am_top_k=1).run(synthetic_study())
    C = len(res.classes)
    assert res.probabilities.shape == (C,) and np.isfinite(res.probabilities).all()
    assert res.get("cam", "cam").shape == (C, *res.map_shape) and np.isfinite(res.get("cam", "cam")).all()
    assert res.get("gradcam", "gradcam") is not None and res.get("gradcam", "gradcam").shape == res.get("cam", "cam").shape
    assert res.get("attention_mining", "final") is not None and len(res.get("attention_mining", "steps")) == 1
    assert res.boxes["cam"] and res.boxes["attention_mining"]


def test_oom_on_gpu_reruns_on_cpu_with_notice(bundle_paths, monkeypatch):
    from cxrviewer.core.device import DeviceInfo

    pl = Pipeline(_load(bundle_paths, ("classifier",)), "cpu", map_max_side=48)
    pl.device = DeviceInfo(torch.device("cuda", 0), torch.bfloat16, "Fake GPU")
    real_run = pl._run
    moved = []
    monkeypatch.setattr(pl, "_move", lambda d: moved.append(d.device.type))

    def run(study, on_stage, cancel, *, device):
        if device.is_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_run(study, on_stage, cancel, device=device)

    monkeypatch.setattr(pl, "_run", run)
    res = pl.run(synthetic_study())
    assert res.probabilities is not None and res.device.startswith("cpu")
    assert any("out of memory" in n and "Fake GPU" in n for n in res.notices)
    assert moved[-1] == "cpu"


def test_segmentation_bundle_contrast_stretch_is_applied(tmp_path):
    """A bundle whose manifest asks for a percentile stretch gets it before normalisation."""
    import torch as _torch

    from cxrviewer.core.bundle import read_manifest
    from cxrviewer.core.preprocess import apply_stretch, percentile_stretch, stretch_spec

    class _M:
        normalisation = {"kind": "minus1_1"}
        provenance = {"preprocess": {"kind": "percentile_stretch", "low": 1.0, "high": 99.0}}

    x = _torch.linspace(0.4, 0.6, 100 * 100).reshape(1, 1, 100, 100)  # low contrast, like JSRT
    y = apply_stretch(x, _M())
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    _torch.testing.assert_close(y, percentile_stretch(x, 1.0, 99.0))

    class _Plain:
        normalisation = {"kind": "minus1_1"}
        provenance = {}

    assert stretch_spec(_Plain()) is None and apply_stretch(x, _Plain()) is x
    from pathlib import Path

    bundled = Path(__file__).resolve().parents[2] / "resources" / "models" / "segmentation.cxrbundle"
    if bundled.is_dir():
        assert stretch_spec(read_manifest(bundled)) is not None


def _box_keys(boxes, labels=None):
    return sorted((b.label, round(b.x, 4), round(b.y, 4), round(b.w, 4), round(b.h, 4)) for b in boxes
                  if labels is None or b.label in labels)


def test_boxes_of_the_eager_classes_only_and_the_rest_on_demand(bundle_paths):
    """``all_classes=False``: boxes of the top-k and the asked classes, the others when a class is
    chosen (compute_class / class_boxes), each equal to what an every-class run proposes."""
    bundles = _load(bundle_paths, ("classifier",))
    study = synthetic_study()
    full = Pipeline(bundles, "cpu", map_max_side=128, am_top_k=2).run(study)
    asked = next(n for i, n in enumerate(full.classes) if i not in full.top_classes(2))
    pl = Pipeline(bundles, "cpu", map_max_side=128, am_top_k=2, am_classes=(asked,), all_classes=False)
    res = pl.run(study)
    eager = {full.classes[i] for i in full.top_classes(2)} | {asked}
    assert set(res.boxes) == set(full.boxes)
    for source in full.boxes:
        assert {b.label for b in res.boxes[source]} <= eager
        assert _box_keys(res.boxes[source]) == _box_keys(full.boxes[source], eager)
    assert any("the other classes' boxes" in n and asked in n for n in res.notices)
    np.testing.assert_array_equal(res.get("attention_mining", "final"), full.get("attention_mining", "final"))
    other = next(i for i, n in enumerate(res.classes) if n not in eager)
    name = res.classes[other]
    before = {s: list(v) for s, v in res.boxes.items()}
    got = pl.class_boxes(res, other)
    assert res.boxes == before  # class_boxes leaves the results alone
    assert pl.class_maps(res, other)["attention_mining"]["steps"].shape == (3, *res.map_shape)
    assert res.boxes == before  # nor class_maps
    for source in full.boxes:
        assert _box_keys(got.get(source, [])) == _box_keys(full.boxes[source], {name})
    pl.compute_class(res, other)
    pl.compute_class(res, other)  # a second time adds nothing
    for source in full.boxes:
        assert _box_keys(res.boxes[source], {name}) == _box_keys(full.boxes[source], {name})
    assert name in res.get("attention_mining", "steps")
