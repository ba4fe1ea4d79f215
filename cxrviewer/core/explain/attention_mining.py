"""Attention mining (AM): iterative-attention-mining.txt Eq. 1-3 (training erasure), Eq. 7-8 (maps).

At step ``t`` (``M_0 = 1``)::

    H_t = (X * M_{t-1}) . w^c                                   (Eq. 7)

``H_t`` is rescaled to [0, 1] and binarised at 0.5; ``M_t`` is ``M_{t-1}`` with the connected
component that contains the global maximum set to 0. The final map is::

    H_f = 1/T sum_{t=1..T} [ N(H_t) + sum_{t'<t} N(H_{t'}) * (1 - M_{t'}) ]   (Eq. 8)

where ``N`` is the [0, 1] rescaling over the cells still kept at step ``t`` (erased cells 0).
The paper normalises "these CAMs" right after Eq. 7 and Eq. 8 sums them; with the RAW maps
Eq. 8 would collapse to ``H_1``: erasing feature cells makes ``H_t = H_1 * M_{t-1}`` exactly
(the classifier is linear in X), and the fill term puts back what was erased. Rescaling each
step lifts the weaker regions found after erasure, which is the point of mining, so the
normalised reading is the one implemented. ``heatmaps`` keep the raw ``H_t``; ``final`` is in
the units of the normalised maps (0..1).

``M_t`` is cumulative (the paper: "M_t is updated from M_{t-1}"), 1 = kept, 0 = erased.
Eq. 7 has no bias term, so none is used. Two details the paper leaves open, decided here:
the global maximum is searched among the not-yet-erased cells (an erased cell can only hold
the value 0, which is the maximum only when every kept cell is negative), and a constant map
(nothing left to rank) erases nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain._components import label_components, normalize01
from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

log = logging.getLogger(__name__)

__all__ = [
    "AttentionMiningExplainer",
    "AttentionMiningResult",
    "attention_mining",
    "erase_features",
    "erasure_masks",
    "erasure_step",
    "masked_class_logits",
    "mine_cam",
]


def erasure_step(heat: np.ndarray, keep: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """One AM erasure (iterative-attention-mining.txt Sec. 3.2): new keep-mask ``M_t`` from ``H_t``.

    ``heat`` ``[h, w]`` raw map, ``keep`` ``[h, w]`` current mask ``M_{t-1}`` (1 kept, 0 erased).
    The map is min-max normalised, binarised at ``threshold`` and the 8-connected component
    holding the maximum over kept cells is zeroed in the returned copy of ``keep``.
    """
    keep = np.asarray(keep, dtype=bool)
    out = keep.copy()
    if not keep.any():
        return out
    norm = normalize01(heat)
    if float(norm.max()) <= 0.0:  # constant map: nothing to mine
        return out
    masked = np.where(keep, norm, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), masked.shape)
    binary = (norm >= threshold) & keep
    if not binary[peak]:  # kept maximum below threshold (rare: all kept cells are low)
        return out
    lab, _ = label_components(binary)
    out[lab == lab[peak]] = False
    return out


def _normalise_kept(heat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Min-max rescale ``heat [B, h, w]`` to [0, 1] over the kept cells; erased cells become 0."""
    k = keep > 0.5
    big = torch.finfo(heat.dtype).max
    lo = torch.where(k, heat, torch.full_like(heat, big)).amin(dim=(-2, -1), keepdim=True)
    hi = torch.where(k, heat, torch.full_like(heat, -big)).amax(dim=(-2, -1), keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    out = ((heat - lo) / span).clamp(0.0, 1.0)
    return torch.where(k, out, torch.zeros_like(out))


@dataclass
class AttentionMiningResult:
    """Per-step maps of attention mining for one class, batched ``[B, h, w]``.

    ``heatmaps[t-1]`` is ``H_t`` (Eq. 7), ``masks[t-1]`` is ``M_t`` (1 kept, 0 erased, cumulative),
    ``final`` is ``H_f`` (Eq. 8).
    """

    heatmaps: list[torch.Tensor]
    masks: list[torch.Tensor]
    final: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.heatmaps)

    @property
    def erased(self) -> list[torch.Tensor]:
        """``1 - M_t``: the regions erased up to and including step ``t``."""
        return [1.0 - m for m in self.masks]


def attention_mining(
    features: torch.Tensor,
    weight: torch.Tensor,
    class_index: int,
    steps: int = 3,
    threshold: float = 0.5,
    scale: torch.Tensor | None = None,
) -> AttentionMiningResult:
    """Run ``steps`` AM steps (T = 3 is the paper's choice) on ``features`` for one class.

    features ``[B, K, h, w]`` (or ``[K, h, w]``), weight ``[C, K]`` (the classifier's ``W`` from
    ``model.cam_weights()``). Implements iterative-attention-mining.txt Eq. 7-8; never re-runs
    the backbone. ``scale`` (broadcastable to ``[B, h, w]``) multiplies the features of this
    class first: for DM models ``1 + psi_c``, so that ``H_1`` is the attention-guided CAM of
    disease-masks-attention.txt Eq. 4-5.
    """
    if features.dim() == 3:
        features = features.unsqueeze(0)
    if steps < 1:
        raise ValueError("attention mining needs at least one step")
    with torch.no_grad():
        x = features.detach().float()
        w = weight.detach().float()[class_index].to(x.device)  # [K]
        h1 = torch.einsum("bkhw,k->bhw", x, w)  # Eq. 7 at t = 1 (M_0 = 1)
        if scale is not None:
            h1 = h1 * scale.to(h1)
    return mine_cam(h1, steps, threshold)


def mine_cam(h1: torch.Tensor, steps: int = 3, threshold: float = 0.5) -> AttentionMiningResult:
    """Attention mining from the class's first map ``H_1 [B, h, w]`` (or ``[h, w]``).

    Eq. 7 is linear in ``X``, so ``H_t = (X * M_{t-1}) . w^c = M_{t-1} * H_1`` exactly: the steps
    need the class map only, never the ``K`` feature channels (:func:`attention_mining` is this
    after one ``X . w^c``; the pipeline gets every class's ``H_1`` from one einsum).
    """
    if steps < 1:
        raise ValueError("attention mining needs at least one step")
    with torch.no_grad():
        h1 = h1.detach().float()
        if h1.dim() == 2:
            h1 = h1.unsqueeze(0)
        b, h, wd = h1.shape
        h1_np = h1.cpu().numpy()
        keep_np = np.ones((b, h, wd), dtype=bool)  # M_0
        heatmaps: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for _ in range(steps):
            ht_np = h1_np * keep_np  # Eq. 7 (the erasure runs in numpy: one product, not a torch twin)
            keep_np = np.stack([erasure_step(ht_np[i], keep_np[i], threshold) for i in range(b)])
            heatmaps.append(torch.from_numpy(ht_np).to(h1.device))
            masks.append(torch.from_numpy(keep_np.astype(np.float32)).to(h1.device))
        # Eq. 8 on the per-step maps rescaled to [0, 1] over the cells kept at that step:
        # fill erased regions from the earlier heat maps (sum_{t'<t} N(H_t') * (1 - M_t')), then average.
        total = torch.zeros_like(heatmaps[0])
        fill = torch.zeros_like(heatmaps[0])
        kept_before = [torch.ones_like(masks[0])] + masks[:-1]
        normed = [_normalise_kept(ht, kb) for ht, kb in zip(heatmaps, kept_before)]
        for nt, mt in zip(normed, masks):
            total = total + nt + fill
            fill = fill + nt * (1.0 - mt)
        final = total / steps
    return AttentionMiningResult(heatmaps=heatmaps, masks=masks, final=final)


def erasure_masks(
    features: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Class-specific erasure masks ``M^c`` for training (iterative-attention-mining.txt Eq. 1, Sec. 3.2).

    The mask of class ``c`` is one AM step from ``M_0 = 1`` on the CAM of ``c``. With ``classes``
    ``[B]`` (one class per sample) returns ``[B, h, w]``; with ``None`` every class: ``[B, C, h, w]``.
    Masks carry no gradient (they are a discrete choice).
    """
    with torch.no_grad():
        x = features.detach().float()
        cams = torch.einsum("bkhw,ck->bchw", x, weight.detach().float().to(x.device)).cpu().numpy()
        b, c, h, w = cams.shape
        ones = np.ones((h, w), dtype=bool)
        if classes is None:
            out = np.stack(
                [np.stack([erasure_step(cams[i, k], ones, threshold) for k in range(c)]) for i in range(b)]
            )
        else:
            cls = [int(v) for v in torch.as_tensor(classes).reshape(-1).tolist()]
            if len(cls) != b:
                raise ValueError(f"need one class per sample: {len(cls)} classes for batch {b}")
            out = np.stack([erasure_step(cams[i, cls[i]], ones, threshold) for i in range(b)])
    return torch.from_numpy(out.astype(np.float32)).to(features.device, features.dtype)


def erase_features(
    features: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor | Sequence[int],
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Erased feature map ``X_hat = X * M^c`` (iterative-attention-mining.txt Eq. 1), one class per sample.

    Returns ``(erased [B, K, h, w], mask [B, h, w])``; gradients flow to ``features`` through the
    kept cells only.
    """
    mask = erasure_masks(features, weight, classes, threshold)
    return features * mask.unsqueeze(1), mask


def masked_class_logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masks: torch.Tensor,
) -> torch.Tensor:
    """Branch logits ``(w^c)^T GAP(X * M^c) (+ b_c)`` for every class (iterative-attention-mining.txt Eq. 2).

    ``masks [B, C, h, w]``. Computed without materialising ``C`` erased copies of ``X``:
    ``w^c . GAP(X * M^c) = mean_hw(M^c * (w^c . X))``. Feed to BCE-with-logits and average over
    classes for ``L_cls`` (Eq. 3).
    """
    cams = torch.einsum("bkhw,ck->bchw", features, weight.to(features.dtype))
    logits = (cams * masks.to(cams.dtype)).mean(dim=(-2, -1))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits


@dataclass
class _AMState:
    """What on-demand mining of another class needs: every class's ``H_1`` and the map-back."""

    cams: torch.Tensor  # [C, h, w] CPU float32: X . w^c for every class (Eq. 7 at t = 1)
    mapper: Any  # cxrviewer.core.explain.context.Mapper
    steps: int


def _mine(st: _AMState, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H_f, H_t steps, erased) of class ``c`` in original coordinates."""
    am = mine_cam(st.cams[c], steps=st.steps)
    steps = st.mapper(torch.cat(am.heatmaps, 0))
    erased = (st.mapper(torch.cat([1.0 - m for m in am.masks], 0), nearest=True, record=False) > 0.5).astype(np.uint8)
    return st.mapper(am.final)[0], steps, erased


def eager_classes(results: "Results", top_k: int, asked: Sequence[str] = ()) -> list[int]:
    """The classes whose on-demand maps (and, in the pipeline's ``top`` mode, boxes) are made at
    once: the ``top_k`` most probable and those ``asked`` for (unknown names ignored), in order."""
    want = set(results.top_classes(int(top_k))) if top_k > 0 else set()
    want.update(results.classes.index(n) for n in asked if n in results.classes)
    return sorted(want)


@register_explainer("attention_mining")
class AttentionMiningExplainer(Explainer, title="Attention mining (AM)", short="AM", order=50,
                               requires=("classifier",), families=("classifier",), needs_model=True, box_map="final",
                               box_priority=0, on_demand=True):
    """AM steps on the classifier's features with its CAM weights (Eq. 7-8); never re-runs the backbone.

    ``H_f`` for every class (all from one ``X . W`` einsum: :func:`mine_cam`); the steps ``H_t``
    and erased regions for the ``am_top_k`` most probable classes and those asked for
    (``am_classes``); :meth:`compute_class` adds another.
    """

    steps = 3
    maps = (MapSpec("final", "AM final H_f", "score"),
            MapSpec("steps", "AM step H_t", "score", steps=True),
            MapSpec("erased", "erased up to step t", "mask", steps=True))
    panels = (*(PanelSpec(f"am{t}", f"Attention mining t={t}", "steps", step=t, outline="erased",
                          quantity="activation", order=20 + t, caption=f"AM t={t}") for t in range(1, 4)),
              PanelSpec("am_final", "Attention mining final", "final", quantity="am_final", order=30,
                        caption="AM final H_f"))
    box_rule = BoxRule("ranked", max_boxes=3)
    box_score = "map"  # mean raw H_f inside the box

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        p = ctx.classifier_pass()
        cw = getattr(p.bundle.model, "cam_weights", None)
        if not callable(cw) or "features" not in p.out:
            return None
        with torch.no_grad():
            feats = p.out["features"][0].detach().float()
            cams = torch.einsum("khw,ck->chw", feats, cw()[0].detach().float().to(feats.device)).cpu()
        st = _AMState(cams, p.mapper, int(ctx.option("am_steps", self.steps)))
        res = ctx.results
        want = eager_classes(res, int(ctx.option("am_top_k", 3)), ctx.option("am_classes", ()))
        mined = {c: mine_cam(cams[c], steps=st.steps) for c in range(cams.shape[0])}
        finals = st.mapper(torch.cat([mined[c].final for c in range(cams.shape[0])], 0))
        steps, erased = {}, {}
        if want:
            hts = st.mapper(torch.cat([torch.cat(mined[c].heatmaps, 0) for c in want], 0))
            ers = st.mapper(torch.cat([1.0 - m for c in want for m in mined[c].masks], 0), nearest=True,
                            record=False) > 0.5
            for i, c in enumerate(want):
                steps[res.classes[c]] = hts[i * st.steps:(i + 1) * st.steps]
                erased[res.classes[c]] = ers[i * st.steps:(i + 1) * st.steps].astype(np.uint8)
        return ExplainerOutput({"final": np.asarray(finals, dtype=np.float32), "steps": steps, "erased": erased},
                               {"steps": st.steps}, state=st)

    def compute_class(self, results: "Results", class_index: int) -> bool:
        name = results.classes[class_index]
        steps = results.maps.get(self.name, {}).get("steps")
        if steps is not None and name in steps:
            return True
        st = results.state.get(self.name)
        if steps is None or st is None:
            return False
        _, steps[name], results.maps[self.name]["erased"][name] = _mine(st, class_index)
        return True

    def empty_reason(self, results: "Results") -> str:
        return "the classifier has no CAM weights (a linear head after global pooling) to mine with"

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        if panel.outline and panel.step > 1:
            return "(erased outlined)"
        return ""

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: torch.nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
        feats = self._require(output, "features")
        weight = context.get("weight")
        if weight is None:
            if model is None or not hasattr(model, "cam_weights"):
                raise ExplainError("attention mining needs the model (its cam_weights()) or weight=")
            weight, _ = model.cam_weights()
        scale = context.get("scale")
        if scale is None and model is not None and hasattr(model, "class_scale"):
            cs = model.class_scale(feats)  # DM models: 1 + psi_c (Eq. 4); None for the others
            scale = None if cs is None else cs[:, class_index]
        res = attention_mining(
            feats, weight, class_index, steps=int(context.get("steps", self.steps)), scale=scale
        )
        maps: dict[str, np.ndarray] = {"final": to_numpy(res.final)}
        for t, (ht, mt) in enumerate(zip(res.heatmaps, res.masks), start=1):
            maps[f"step{t}"] = to_numpy(ht)
            maps[f"erased{t}"] = to_numpy(1.0 - mt)
        return maps
