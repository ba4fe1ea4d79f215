"""Study + model bundles -> :class:`Results`: every explanation from one backbone pass.

Roles (any subset; see :data:`ROLES`):

``alignment``     affine alignment to the canonical chest (cia-net Eq. 1, disease-masks Eq. 6)
``segmentation``  left lung / right lung / heart U-Net (lung-heart Sec. 3.2)
``classifier``    any classifier-family bundle: probabilities, CAM (disease-masks Eq. 1),
                  Grad-CAM, attention mining (iterative-attention-mining Eq. 7-8)
``dm``            a disease-mask classifier (disease-masks Eq. 4-5) whose psi is shown
``cia``           CIA-Net with its normal bank (cia-net Eq. 3, Sec. 4.4 pairing)

Order of stages: ``preprocess``, ``alignment``, ``segmentation``, ``classifier``,
``gradcam``, ``attention_mining``, ``disease_mask``, ``cia``, ``boxes``.

* Alignment runs first; the classifier, DM and CIA networks see the aligned
  image, and every map they produce is drawn back onto the original through the
  inverse warp (``warp(map, invert_affine(theta))``). The lung/heart U-Net is
  trained on unaligned radiographs, so it segments the original frame and its
  masks are warped forward for the lung/heart-weighted classifier (M3).
* The classifier runs ONCE. Its output gives the probabilities and CAM; a
  forward hook on ``model.feature_layer()`` turns the feature map into a leaf
  that requires grad, so Grad-CAM for every class is a backward through the
  head only, and attention mining re-uses the same features with
  ``cam_weights()`` (it never re-runs the backbone).
* Attention mining: the final map ``H_f`` is computed for every class; the
  per-step maps ``H_t`` and erased regions for the top-``am_top_k`` classes
  (plus any asked for). :meth:`Pipeline.compute_class` adds another class in
  milliseconds from the features kept in ``Results`` (not stored in HDF5).
* All maps are in ORIGINAL image coordinates, stored at ``map_shape`` (the
  original scaled so its longest side is at most ``map_max_side``); boxes are
  in original pixels. ``Results.map_scale`` converts map cells to pixels.
* Disease masks: from the ``dm`` bundle, else from the classifier when it is a
  DM model, else pseudo disease masks (PDM) from the segmentation
  (disease-masks Sec. 4.4).
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bundle import LoadedBundle, find_bundles, load_bundle
from .device import DeviceInfo, run_with_oom_fallback, select_device
from .errors import BundleError, CxrError
from .geometry import Box
from .preprocess import (CropBox, apply_stretch, as_image_tensor, crop_box_pixels, maps_to_frame, normalise,
                         resize)
from .study import Study

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("alignment", "segmentation", "classifier", "dm", "cia")
STAGES: tuple[str, ...] = ("preprocess", "alignment", "segmentation", "classifier", "gradcam",
                           "attention_mining", "disease_mask", "cia", "boxes")
RESULTS_FORMAT_VERSION = 1


class PipelineCancelled(CxrError):
    """The caller's ``cancel()`` returned true between two stages."""


# ---------------------------------------------------------------------------
@dataclass
class _Mapper:
    """Maps from a network input back to original-image map coordinates (CPU)."""

    map_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    box: CropBox | None
    theta_inv: torch.Tensor | None  # [1, 2, 3]

    def __call__(self, maps: torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """``[N, h, w]`` raw maps -> ``[N, *map_shape]`` float32; outside = the map's minimum."""
        m = maps.detach().float().cpu()
        if m.dim() == 2:
            m = m[None]
        lo = m.amin(dim=(-2, -1), keepdim=True)
        shifted = m - lo  # so zero fill outside crop / warp means "the map's minimum"
        mode = "nearest" if nearest else "bilinear"
        out = maps_to_frame(shifted, self.map_shape, self.box, self.frame_shape, mode=mode)
        if self.theta_inv is not None:
            from .models.alignment import warp

            out = warp(out[None], self.theta_inv, mode=mode)[0]
        return (out + lo).numpy().astype(np.float32)


@dataclass
class _AMState:
    """What :meth:`Pipeline.compute_class` needs: features, weights and the map-back."""

    features: torch.Tensor  # [K, h, w] CPU float32
    weight: torch.Tensor  # [C, K]
    mapper: _Mapper
    steps: int


@dataclass
class Results:
    """Everything the pipeline computed for one study (see module docstring for frames).

    Arrays: ``probabilities [C]``; ``cam``, ``gradcam``, ``am_final``,
    ``disease_mask``, ``cia_grid`` ``[C, h, w]`` at ``map_shape``; ``am_steps`` /
    ``am_erased`` ``{class name: [T, h, w]}`` (float32 H_t / uint8 1 = erased);
    ``contrast [h, w]``; ``segmentation`` uint8 ``[3, h, w]``; ``aligned_image``
    float32 [0, 1] at the alignment frame; ``affine [2, 3]`` (``affine_grid``
    convention, normalised coordinates, original -> aligned sampling).
    """

    study_id: str
    source_path: str
    pixel_sha256: str
    image_shape: tuple[int, int]
    map_shape: tuple[int, int]
    classes: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    cam: np.ndarray | None = None
    gradcam: np.ndarray | None = None
    am_final: np.ndarray | None = None
    am_steps: dict[str, np.ndarray] = field(default_factory=dict)
    am_erased: dict[str, np.ndarray] = field(default_factory=dict)
    contrast: np.ndarray | None = None
    cia_classes: tuple[str, ...] = ()
    cia_grid: np.ndarray | None = None  # [C, h, w] grid probabilities in original coords
    cia_grid_raw: np.ndarray | None = None  # [C, gh, gw] as the network gave them
    paired_normal: np.ndarray | None = None  # uint8 [S, S], the bank image (its own frame)
    paired_normal_id: str | None = None
    disease_mask: np.ndarray | None = None
    disease_mask_source: str | None = None  # "dm", "classifier" or "pdm"
    dm_probabilities: np.ndarray | None = None
    dm_cam: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    segmentation_classes: tuple[str, ...] = ()
    aligned_image: np.ndarray | None = None
    affine: np.ndarray | None = None
    alignment_params: np.ndarray | None = None
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # source -> boxes (original px)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> manifest summary
    notices: list[str] = field(default_factory=list)
    format_version: int = RESULTS_FORMAT_VERSION
    _am_state: _AMState | None = field(default=None, repr=False, compare=False)

    @property
    def map_scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per map cell."""
        return (self.image_shape[0] / self.map_shape[0], self.image_shape[1] / self.map_shape[1])

    def class_index(self, name: str) -> int:
        return self.classes.index(name)

    def top_classes(self, k: int = 1) -> list[int]:
        """Indices of the ``k`` most probable classes (empty without a classifier)."""
        if self.probabilities is None:
            return []
        return [int(i) for i in np.argsort(-self.probabilities, kind="stable")[:k]]

    def boxes_for(self, label: str, source: str | None = None) -> list[Box]:
        srcs = [source] if source else list(self.boxes)
        return [b for s in srcs for b in self.boxes.get(s, []) if b.label == label]


# ---------------------------------------------------------------------------
def _scaled_shape(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = shape
    s = min(1.0, float(max_side) / max(h, w))
    return (max(1, int(round(h * s))), max(1, int(round(w * s))))


def _input01(frame: torch.Tensor, manifest: Any) -> tuple[torch.Tensor, CropBox | None]:
    """Crop + resize a frame ``[1, C, H, W]`` as the manifest says (no normalisation)."""
    box = crop_box_pixels(manifest.crop, (frame.shape[-2], frame.shape[-1]))
    t = frame
    if box is not None:
        y0, y1, x0, x1 = box
        t = t[..., y0:y1, x0:x1]
    return apply_stretch(resize(t, tuple(manifest.input_size)), manifest), box


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def assign_roles(bundles: Sequence[LoadedBundle]) -> dict[str, LoadedBundle]:
    """Give each loaded bundle a pipeline role (manifest ``role`` hint, else by family).

    A DM classifier becomes ``dm`` when another classifier is present, else the
    ``classifier``. The first bundle (sorted by path) wins a role; later ones are
    skipped with a warning.
    """
    roles: dict[str, LoadedBundle] = {}
    classifiers = [b for b in bundles if b.manifest.family == "classifier"]
    for b in sorted(bundles, key=lambda b: str(b.path)):
        role = b.manifest.role
        if role not in ROLES:
            fam = b.manifest.family
            if fam == "classifier":
                is_dm = hasattr(b.model, "disease_masks")
                role = "dm" if is_dm and len(classifiers) > 1 else "classifier"
            else:
                role = fam
        if role == "dm" and "classifier" not in roles and not any(
                c.manifest.role != "dm" and not hasattr(c.model, "disease_masks") for c in classifiers):
            role = "classifier"
        if role in roles:
            log.warning("two bundles for role %s: using %s, skipping %s", role, roles[role].path.name, b.path.name)
            continue
        roles[role] = b
    return roles


class Pipeline:
    """Runs the bundles of each role on a study (see module docstring).

    ``device``: a :class:`DeviceInfo`, ``"auto"``/``"cpu"``/``"cuda"`` or None (auto).
    """

    def __init__(self, bundles: Mapping[str, LoadedBundle], device: DeviceInfo | str | None = None, *,
                 map_max_side: int = 512, frame_max_side: int = 1024, am_steps: int = 3,
                 am_top_k: int = 3, am_classes: Sequence[str] = (),
                 box_sources: Sequence[str] = ("cam", "am", "cia")) -> None:
        unknown = set(bundles) - set(ROLES)
        if unknown:
            raise CxrError(f"unknown pipeline role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
        self.bundles = dict(bundles)
        if "dm" in self.bundles and "classifier" not in self.bundles:
            self.bundles["classifier"] = self.bundles.pop("dm")
        for role, b in self.bundles.items():
            fam = b.manifest.family
            want = "classifier" if role in ("classifier", "dm") else role
            if fam != want:
                raise BundleError(f"a {fam} bundle cannot serve as the {role}", path=str(b.path))
        al = self.bundles.get("alignment")
        if al is not None and crop_box_pixels(al.manifest.crop, (100, 100)) is not None:
            raise BundleError("an alignment bundle must see the whole image (crop 'none')", path=str(al.path))
        cia = self.bundles.get("cia")
        if cia is not None and "normal_bank_images" not in cia.extras:
            raise BundleError("the CIA bundle has no normal bank (extras 'normal_bank_images')", path=str(cia.path))
        if isinstance(device, DeviceInfo):
            self.device = device
        else:
            self.device = select_device(device or "auto")
        self.map_max_side = int(map_max_side)
        self.frame_max_side = int(frame_max_side)
        self.am_steps = int(am_steps)
        self.am_top_k = int(am_top_k)
        self.am_classes = tuple(am_classes)
        self.box_sources = tuple(box_sources)
        self._on = None
        self._move(self.device)

    # -- construction helpers ------------------------------------------------------
    @classmethod
    def from_dirs(cls, dirs: Any, device: DeviceInfo | str | None = None, **kw: Any) -> "Pipeline":
        """Load every bundle in ``dirs`` and assign roles (:func:`assign_roles`)."""
        paths = find_bundles(dirs)
        if not paths:
            raise BundleError(f"no model bundles (*.cxrbundle) in {dirs}")
        loaded = [load_bundle(p) for p in paths]
        return cls(assign_roles(loaded), device, **kw)

    def _move(self, device: DeviceInfo) -> None:
        if self._on == device.device:
            return
        for b in self.bundles.values():
            b.model.to(device.device)
        self._on = device.device
        self.device = device

    @property
    def classes(self) -> tuple[str, ...]:
        for role in ("classifier", "cia"):
            if role in self.bundles:
                return self.bundles[role].manifest.classes
        return ()

    # -- public API -----------------------------------------------------------------
    def run(self, study: Study, *, on_stage: Callable[[str, Results], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Results:
        """Run every stage the bundles allow; on CUDA out-of-memory the run restarts on the CPU."""
        fr = run_with_oom_fallback(self._run, study, on_stage, cancel, device=self.device)
        res: Results = fr.value
        if fr.notice:
            res.notices.append(fr.notice)
        return res

    def compute_class(self, results: Results, class_index: int) -> None:
        """Add attention-mining steps for one more class (cheap: re-uses the kept features)."""
        name = results.classes[class_index]
        if name in results.am_steps:
            return
        st = results._am_state
        if st is None:
            raise CxrError("these results keep no features (loaded from a file or no AM-capable "
                           "classifier); run the pipeline again to mine another class")
        self._am_class(results, st, class_index)

    # -- internals ------------------------------------------------------------------
    def _am_class(self, res: Results, st: _AMState, c: int) -> np.ndarray:
        from .explain.attention_mining import attention_mining

        am = attention_mining(st.features[None], st.weight, c, steps=st.steps)
        name = res.classes[c]
        res.am_steps[name] = st.mapper(torch.cat(am.heatmaps, 0))
        erased = torch.cat([1.0 - m for m in am.masks], 0)
        res.am_erased[name] = (st.mapper(erased, nearest=True) > 0.5).astype(np.uint8)
        return st.mapper(am.final)[0]

    def _run(self, study: Study, on_stage: Callable[[str, Results], None] | None,
             cancel: Callable[[], bool] | None, *, device: DeviceInfo) -> Results:
        self._move(device)
        dev = device.device
        shape = study.shape
        map_shape = _scaled_shape(shape, self.map_max_side)
        res = Results(study_id=study.study_id, source_path=study.meta.source_path,
                      pixel_sha256=study.pixel_sha256(), image_shape=shape, map_shape=map_shape,
                      classes=self.classes, device=str(device))
        res.models = {role: {**b.manifest.summary(), "bundle": b.path.name} for role, b in self.bundles.items()}
        clock = [time.perf_counter()]

        def stage(name: str) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            res.timings[name] = now - clock[0]
            if on_stage is not None:
                on_stage(name, res)
            if cancel is not None and cancel():
                raise PipelineCancelled(f"analysis of {study.study_id} cancelled after {name}")
            clock[0] = time.perf_counter()

        if cancel is not None and cancel():
            raise PipelineCancelled(f"analysis of {study.study_id} cancelled")

        # -- preprocess: the working frame (longest side <= frame_max_side) --------
        frame_shape = _scaled_shape(shape, self.frame_max_side)
        frame = resize(as_image_tensor(study.model_input).clamp(0, 1), frame_shape).to(dev)
        stage("preprocess")

        # -- alignment ------------------------------------------------------------------
        theta_inv_cpu = None
        theta = None
        work = frame
        if "alignment" in self.bundles:
            from .models.alignment import invert_affine, warp

            b = self.bundles["alignment"]
            x01, _ = _input01(frame, b.manifest)
            with torch.no_grad(), device.autocast():
                out = b.model(normalise(x01, b.manifest.normalisation))
            theta = out["theta"][:1].float()
            work = warp(frame, theta).clamp(0, 1)
            theta_inv_cpu = invert_affine(theta.double()).float().cpu()
            res.aligned_image = work[0, 0].cpu().numpy().astype(np.float32)
            res.affine = theta[0].cpu().double().numpy()
            res.alignment_params = out["params"][0].float().cpu().numpy().astype(np.float32)
            stage("alignment")

        def mapper(box: CropBox | None) -> _Mapper:
            return _Mapper(map_shape, frame_shape, box, theta_inv_cpu)

        # -- segmentation ---------------------------------------------------------------
        seg_work = None  # [1, 3, fh, fw] probabilities in the working frame (for M3)
        if "segmentation" in self.bundles:
            b = self.bundles["segmentation"]
            # The U-Net is trained on unaligned radiographs (JSRT), so it segments the
            # original frame; the masks are warped into the aligned frame for M3.
            x01, box = _input01(frame, b.manifest)
            with torch.no_grad(), device.autocast():
                logits = b.model(normalise(x01, b.manifest.normalisation))["logits"]
            probs = torch.sigmoid(logits.float())[0]
            seg_frame = maps_to_frame(probs, frame_shape, box)[None]
            if theta is not None:
                from .models.alignment import warp

                seg_work = warp(seg_frame, theta)
            else:
                seg_work = seg_frame
            unaligned = _Mapper(map_shape, frame_shape, box, None)
            res.segmentation = (unaligned(probs) > 0.5).astype(np.uint8)
            names = getattr(b.model, "classes", None) or b.manifest.classes
            res.segmentation_classes = tuple(names)
            stage("segmentation")

        # -- classifier: ONE forward, shared by CAM, Grad-CAM and AM -------------------
        cls_box: CropBox | None = None
        if "classifier" in self.bundles:
            cls_box = self._classify(res, work, seg_work, device, mapper, stage)

        # -- disease masks --------------------------------------------------------------
        self._disease_masks(res, work, device, mapper, cls_box)
        if res.disease_mask is not None:
            stage("disease_mask")

        # -- CIA --------------------------------------------------------------------------
        if "cia" in self.bundles:
            self._cia(res, work, device, mapper)
            stage("cia")

        # -- boxes (original pixels) -----------------------------------------------------
        self._boxes(res)
        stage("boxes")
        return res

    def _classify(self, res: Results, work: torch.Tensor, seg_work: torch.Tensor | None,
                  device: DeviceInfo, mapper: Callable[[CropBox | None], _Mapper],
                  stage: Callable[[str], None]) -> CropBox | None:
        b = self.bundles["classifier"]
        model = b.model
        x01, box = _input01(work, b.manifest)
        x = normalise(x01, b.manifest.normalisation)
        extra: dict[str, torch.Tensor] = {}
        if seg_work is not None and _accepts(model, "lung_heart_mask"):
            m = seg_work[:, :3].amax(1, keepdim=True)  # merged binary mask M_g (lung-heart Eq. 3)
            m_in, _ = _input01(m, b.manifest)
            extra["lung_heart_mask"] = (m_in > 0.5).float()
        store: dict[str, torch.Tensor] = {}

        def hook(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
            act = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(act, torch.Tensor) and not act.requires_grad:
                act = act.detach().requires_grad_(True)
                store["act"] = act
                return (act, *out[1:]) if isinstance(out, tuple) else act
            if isinstance(act, torch.Tensor):
                store["act"] = act
            return None

        layer = model.feature_layer() if callable(getattr(model, "feature_layer", None)) else None
        handle = layer.register_forward_hook(hook) if layer is not None else None
        try:
            with torch.enable_grad(), device.autocast():
                out = model(x, **extra)
        finally:
            if handle is not None:
                handle.remove()
        logits = out["logits"][:1]
        C = logits.shape[1]
        mp = mapper(box)
        res.probabilities = torch.sigmoid(logits.detach().float())[0].cpu().numpy().astype(np.float32)
        if "cam" in out:
            res.cam = mp(out["cam"][0].detach())
        stage("classifier")

        # Grad-CAM: alpha_k = mean_ij d y_c / d A_k^ij, ReLU(sum_k alpha_k A_k) (Selvaraju et al.;
        # disease-masks Sec. 2.1), for every class; the backward runs through the head only.
        act = store.get("act")
        if act is not None and logits.requires_grad and act.dim() == 4:
            maps = []
            for c in range(C):
                (g,) = torch.autograd.grad(logits[0, c], act, retain_graph=c < C - 1)
                alpha = g[0].float().mean(dim=(-2, -1), keepdim=True)
                maps.append(torch.relu((alpha * act[0].detach().float()).sum(0)))
            res.gradcam = mp(torch.stack(maps))
            stage("gradcam")
        elif act is None:
            res.notices.append("Grad-CAM skipped: the classifier has no feature_layer() output")
        store.clear()  # drop the graph of the head
        del act

        # Attention mining on the same features (iterative-attention-mining Eq. 7-8).
        cw = getattr(model, "cam_weights", None)
        if callable(cw) and "features" in out:
            from .explain.attention_mining import attention_mining

            weight = cw()[0].detach().float().cpu()
            feats = out["features"][0].detach().float().cpu()
            st = _AMState(feats, weight, mp, self.am_steps)
            res._am_state = st
            want = set(res.top_classes(self.am_top_k))
            want.update(res.classes.index(n) for n in self.am_classes if n in res.classes)
            finals = []
            for c in range(C):
                if c in want:
                    finals.append(self._am_class(res, st, c))
                else:
                    finals.append(None)
            idle = [c for c in range(C) if finals[c] is None]
            if idle:
                fin = torch.cat([attention_mining(feats[None], weight, c, steps=self.am_steps).final
                                 for c in idle], 0)
                for c, m in zip(idle, mp(fin)):
                    finals[c] = m
            res.am_final = np.stack(finals).astype(np.float32)
            stage("attention_mining")
        return box

    def _disease_masks(self, res: Results, work: torch.Tensor, device: DeviceInfo,
                       mapper: Callable[[CropBox | None], _Mapper], cls_box: CropBox | None) -> None:
        if "dm" in self.bundles:
            b = self.bundles["dm"]
            x01, box = _input01(work, b.manifest)
            with torch.no_grad(), device.autocast():
                out = b.model(normalise(x01, b.manifest.normalisation))
            res.dm_probabilities = torch.sigmoid(out["logits"][0].float()).cpu().numpy().astype(np.float32)
            res.dm_cam = mapper(box)(out["cam"][0])
            res.disease_mask = mapper(box)(b.model.disease_masks)
            res.disease_mask_source = "dm"
            return
        clf = self.bundles.get("classifier")
        if clf is not None:
            psi = getattr(clf.model, "disease_masks", None)
            if psi is None and "disease_masks" in clf.extras:
                psi = torch.from_numpy(np.asarray(clf.extras["disease_masks"], np.float32))
            if psi is not None:
                res.disease_mask = mapper(cls_box)(psi)
                res.disease_mask_source = "classifier"
                return
        if res.segmentation is not None and res.segmentation.shape[0] >= 3 and res.classes:
            from .explain.disease_masks import pseudo_disease_masks

            names = list(res.segmentation_classes)
            try:
                ll, rl, ht = (res.segmentation[names.index(n)] for n in ("left_lung", "right_lung", "heart"))
            except ValueError:
                ll, rl, ht = res.segmentation[0], res.segmentation[1], res.segmentation[2]
            res.disease_mask = pseudo_disease_masks(ll, rl, ht, classes=res.classes).astype(np.float32)
            res.disease_mask_source = "pdm"

    def _cia(self, res: Results, work: torch.Tensor, device: DeviceInfo,
             mapper: Callable[[CropBox | None], _Mapper]) -> None:
        from .models.cia import hash_codes, nearest_normal

        b = self.bundles["cia"]
        dev = device.device
        bank = np.asarray(b.extras["normal_bank_images"])
        x01, box = _input01(work, b.manifest)
        code = hash_codes(x01.float().cpu())[0]
        codes = b.extras.get("normal_bank_codes")
        codes_t = (torch.from_numpy(np.asarray(codes, np.float32)) if codes is not None
                   else hash_codes(torch.from_numpy(bank.astype(np.float32) / 255.0)[:, None]))
        idx = nearest_normal(code, codes_t)
        neg01 = resize(torch.from_numpy(bank[idx].astype(np.float32) / 255.0)[None, None].to(dev),
                       tuple(b.manifest.input_size))
        norm = b.manifest.normalisation
        kw = {}
        up = b.manifest.inference.get("upsample_to")
        if up and _accepts(b.model, "upsample_to"):
            kw["upsample_to"] = int(up)  # cia-net Sec. 3.3 test-time upsampling of F before the head
        with torch.no_grad(), device.autocast():
            out = b.model(normalise(x01, norm), normalise(neg01, norm), **kw)
        att = out["attention"][0].float()
        if att.dim() == 3:
            att = att[0]
        grid = out["grid_probs"][0].float()
        mp = mapper(box)
        res.contrast = mp(att)[0]
        res.cia_grid = mp(grid, nearest=True)
        res.cia_grid_raw = grid.cpu().numpy().astype(np.float32)
        res.cia_classes = tuple(b.manifest.classes)
        res.paired_normal = bank[idx].astype(np.uint8)
        ids = b.extras.get("normal_bank_ids")
        res.paired_normal_id = str(ids[idx]) if ids is not None and len(ids) > idx else f"bank[{idx}]"
        if not res.classes:
            res.classes = res.cia_classes

    def _boxes(self, res: Results) -> None:
        from .explain.boxes import grid_to_boxes, heatmap_to_boxes, ranked_boxes

        size = res.image_shape
        if "cam" in self.box_sources and res.cam is not None:
            res.boxes["cam"] = [bx for c, n in enumerate(res.classes)
                                for bx in heatmap_to_boxes(res.cam[c], label=n, image_size=size)]
        if "am" in self.box_sources and res.am_final is not None:
            res.boxes["am"] = [bx for c, n in enumerate(res.classes)
                               for bx in ranked_boxes(res.am_final[c], label=n, image_size=size)]
        if "cia" in self.box_sources and res.cia_grid is not None:
            res.boxes["cia"] = [bx for c, n in enumerate(res.cia_classes)
                                for bx in grid_to_boxes(res.cia_grid[c], 0.5, label=n, image_size=size)]
