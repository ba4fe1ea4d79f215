"""Contrast-induced attention (CIA-Net): cia-net-alignment-contrast-attention.txt Eq. 3 and its test procedure.

``dM = |M+ - M-|`` between the attention maps of a positive image and its paired normal
image, rescaled so that ``sum_k dm_k = w * h``; the weighted feature map is ``dM * F+``.
The pair is the normal image whose 16x16 "hash code" is nearest by cosine distance (Sec. 4.3.2).

Normal-bank cache: the bank is fixed, so the negative side (``M-``, all CIA-Net needs from the
paired normal) is computed once per bank image, not once per study. A bundle may carry it in
``extras.npz`` (``normal_bank_attention`` float32 ``[N, 1, h, w]`` and ``normal_bank_attention_key``,
a JSON record of the weights fingerprint, bank digest, input size and normalisation it was made
with: :func:`precompute_bank_attention`, written by ``cxr-train cia``); it is used for float32
runs when every field matches, otherwise ignored with a logged notice. Missing entries are
computed on first use under the run's device and autocast and kept in memory with the model
(keyed by device, dtype, input size, normalisation, bank and the weights' identity and version),
so the cached path gives the uncached path's numbers. Pipeline option ``cia_bank_cache=False``
turns the cache off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError, ModelError
from cxrviewer.core.explain.boxes import BoxRule
from cxrviewer.core.explain.context import accepts
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer,
                                             to_numpy)

if TYPE_CHECKING:
    from cxrviewer.core.bundle import LoadedBundle
    from cxrviewer.core.preprocess import Preprocess
    from cxrviewer.core.device import DeviceInfo
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

__all__ = ["BANK_ATTENTION", "BANK_ATTENTION_KEY", "ContrastExplainer", "ContrastResult", "apply_contrast",
           "bank_attention", "bank_cache_key", "bank_negatives", "contrast_attention", "pair_and_contrast",
           "precompute_bank_attention"]

log = logging.getLogger(__name__)

#: ``extras.npz`` arrays of the precomputed normal bank (module docstring).
BANK_ATTENTION = "normal_bank_attention"
BANK_ATTENTION_KEY = "normal_bank_attention_key"
_CACHE_VERSION = 1

_EPS = 1e-12


def contrast_attention(m_pos: torch.Tensor, m_neg: torch.Tensor) -> torch.Tensor:
    """``dM = |M+ - M-|`` scaled so each sample's map sums to ``w * h`` (cia-net Eq. 3).

    Accepts ``[B, h, w]`` or ``[B, 1, h, w]`` (returned in the same shape). A zero difference
    (identical images) gives the uniform map of ones, i.e. no re-weighting.
    """
    d = (m_pos - m_neg).abs()
    h, w = d.shape[-2:]
    flat = d.reshape(d.shape[0], -1)
    s = flat.sum(dim=1, keepdim=True)
    uniform = torch.ones_like(flat)
    scaled = torch.where(s > _EPS, flat * (h * w) / s.clamp_min(_EPS), uniform)
    return scaled.reshape(d.shape)


def apply_contrast(features: torch.Tensor, d_m: torch.Tensor) -> torch.Tensor:
    """Weighted feature map ``F = dM * F+`` cell by cell (cia-net Eq. 3); features ``[B, K, h, w]``."""
    if d_m.dim() == 3:
        d_m = d_m.unsqueeze(1)
    return features * d_m


@dataclass
class ContrastResult:
    """Contrast map ``[B, h, w]``, grid probabilities ``[B, C, gh, gw]`` and the paired normal indices."""

    attention: torch.Tensor
    grid_probs: torch.Tensor
    pair_index: list[int]


def pair_and_contrast(
    model: torch.nn.Module,
    x_pos: torch.Tensor,
    bank_images: torch.Tensor,
    bank_codes: torch.Tensor | None = None,
) -> ContrastResult:
    """CIA-Net test procedure (cia-net Sec. 3.3, 4.3.2): pair each positive with its nearest normal, run the model.

    ``bank_images [M, 1, H, W]`` are normal images (same preprocessing as ``x_pos``); their hash
    codes are computed with ``cxrviewer.core.models.cia.hash_codes`` unless given.
    """
    try:
        from cxrviewer.core.models.cia import hash_codes, nearest_normal
    except ImportError as exc:  # pragma: no cover - depends on the models package
        raise ExplainError(f"the CIA model family is not available: {exc}") from exc
    with torch.no_grad():
        codes = bank_codes if bank_codes is not None else hash_codes(bank_images)
        q = hash_codes(x_pos)
        idx = [int(nearest_normal(q[i], codes)) for i in range(q.shape[0])]
        x_neg = bank_images[idx].to(x_pos.device, x_pos.dtype)
        out = model(x_pos, x_neg)
    att = out["attention"]
    if att.dim() == 4:
        att = att[:, 0]
    return ContrastResult(attention=att, grid_probs=out["grid_probs"], pair_index=idx)


# ---- the normal bank's M-, computed once (module docstring) ---------------------------------
def bank_negatives(bank: np.ndarray, idx: Sequence[int], input_size: Sequence[int], pre: "Preprocess",
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Network inputs ``[len(idx), 1, H, W]`` of bank images ``idx`` (uint8 / 255, resized, normalised)."""
    from cxrviewer.core.preprocess import resize

    t = torch.from_numpy(np.asarray(bank)[list(idx)].astype(np.float32) / 255.0)[:, None].to(device)
    return pre.normalise(resize(t, (int(input_size[0]), int(input_size[1]))))


def _bank_digest(bank: np.ndarray) -> str:
    a = np.ascontiguousarray(bank)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def _norm_record(pre: "Preprocess") -> Any:
    return json.loads(json.dumps({"kind": pre.normalisation, "mean": pre.mean, "std": pre.std}))


def bank_cache_key(model: torch.nn.Module, bank: np.ndarray, input_size: Sequence[int],
                   normalisation: Any) -> dict[str, Any]:
    """What a precomputed bank ``M-`` depends on: weights fingerprint, bank digest, input size, normalisation."""
    from cxrviewer.core.models.cia import negative_fingerprint
    from cxrviewer.core.preprocess import Preprocess

    pre = Preprocess.from_normalisation(normalisation)
    return {"version": _CACHE_VERSION, "dtype": "float32", "model": negative_fingerprint(model),
            "bank": _bank_digest(bank), "input_size": [int(input_size[0]), int(input_size[1])],
            "normalisation": _norm_record(pre)}


def precompute_bank_attention(model: torch.nn.Module, bank: np.ndarray, input_size: Sequence[int],
                              normalisation: Any, *, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Bundle extras holding ``M-`` of every bank image (float32, eval mode) and its key JSON."""
    from cxrviewer.core.preprocess import Preprocess

    pre = Preprocess.from_normalisation(normalisation)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = [model.negative_attention(bank_negatives(bank, range(i, min(i + batch_size, len(bank))),
                                                            input_size, pre, device)).float().cpu()
                    for i in range(0, len(bank), batch_size)]
    finally:
        model.train(was)
    key = bank_cache_key(model, bank, input_size, normalisation)
    return {BANK_ATTENTION: torch.cat(maps).numpy().astype(np.float32),
            BANK_ATTENTION_KEY: np.asarray([json.dumps(key, sort_keys=True)])}


@dataclass
class _BankState:
    """One model's cached ``M-`` per bank index, valid for ``key`` only."""

    key: tuple
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    from_file: set[int] = field(default_factory=set)
    notice: str = ""


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _BankState]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _memory_key(b: "LoadedBundle", device: "DeviceInfo") -> tuple:
    """Device, autocast dtype, input size, normalisation, bank identity and the weights' identity/version."""
    from cxrviewer.core.models.cia import negative_state

    bank = b.extras["normal_bank_images"]
    versions = tuple((t.data_ptr(), t._version) for _, t in negative_state(b.model))
    return (str(device.device), str(device.dtype), tuple(b.manifest.input_size),
            json.dumps(b.manifest.normalisation, sort_keys=True, default=str), id(bank),
            bank.__array_interface__["data"][0], tuple(bank.shape), bool(b.model.training), versions)


def _file_problem(b: "LoadedBundle", arr: Any, raw: Any) -> str:
    """Why the bundle's precomputed ``M-`` cannot be used ('' when it can)."""
    bank = np.asarray(b.extras["normal_bank_images"])
    if arr is None or raw is None:
        return f"only one of {BANK_ATTENTION}/{BANK_ATTENTION_KEY} is present"
    if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[0] != len(bank) or arr.shape[1] != 1:
        return f"{BANK_ATTENTION} is {arr.dtype} {tuple(arr.shape)}, not float32 [{len(bank)}, 1, h, w]"
    try:
        key = json.loads(str(np.asarray(raw).reshape(-1)[0]))
    except (ValueError, IndexError) as exc:
        return f"{BANK_ATTENTION_KEY} is not a JSON record ({exc})"
    want = bank_cache_key(b.model, bank, b.manifest.input_size, b.manifest.normalisation)
    bad = [k for k in want if not isinstance(key, dict) or key.get(k) != want[k]]
    return f"made with a different {', '.join(bad)}" if bad else ""


def _load_file_cache(b: "LoadedBundle", device: "DeviceInfo", st: _BankState) -> None:
    arr, raw = b.extras.get(BANK_ATTENTION), b.extras.get(BANK_ATTENTION_KEY)
    if (arr is None and raw is None) or device.dtype is not None:
        return  # none, or an autocast run: compute under its dtype, as the uncached path does
    problem = _file_problem(b, arr, raw)
    if problem:
        st.notice = f"precomputed normal-bank attention ignored: {problem}"
        log.warning("%s: %s; computed on first use instead", b.path, st.notice)
        return
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device.device)
    st.maps = {i: t[i:i + 1] for i in range(t.shape[0])}
    st.from_file = set(st.maps)


def bank_attention(b: "LoadedBundle", idx: int, device: "DeviceInfo") -> tuple[torch.Tensor, str]:
    """``M-`` ``[1, 1, h, w]`` of bank image ``idx`` and where it came from (``bundle``, ``memory``,
    ``computed``): the bundle's precomputed array when valid, else computed once and kept."""
    from cxrviewer.core.preprocess import Preprocess

    key = _memory_key(b, device)
    with _LOCK:
        st = _STATES.get(b.model)
        if st is None or st.key != key:
            st = _BankState(key)
            _load_file_cache(b, device, st)
            _STATES[b.model] = st
        if idx in st.maps:
            return st.maps[idx], "bundle" if idx in st.from_file else "memory"
        pre = Preprocess.from_manifest(b.manifest)
        x = bank_negatives(b.extras["normal_bank_images"], [idx], b.manifest.input_size, pre, device.device)
        with torch.no_grad(), device.autocast():
            st.maps[idx] = b.model.negative_attention(x)
        return st.maps[idx], "computed"


def _drop_file_cache(b: "LoadedBundle", reason: str) -> None:
    """Forget the bundle's precomputed ``M-`` (it did not fit the network's grid)."""
    with _LOCK:
        st = _STATES.get(b.model)
        if st is not None:
            for i in st.from_file:
                st.maps.pop(i, None)
            st.from_file = set()
            st.notice = f"precomputed normal-bank attention ignored: {reason}"
    log.warning("%s: precomputed normal-bank attention ignored (%s); computed instead", b.path, reason)


def _bank_notice(b: "LoadedBundle") -> str:
    st = _STATES.get(b.model)
    return st.notice if st is not None else ""


@register_explainer("contrast")
class ContrastExplainer(Explainer, title="Contrast-induced attention (CIA)", short="CIA", order=70,
                        requires=("cia",), families=("cia",), box_map="grid", box_priority=2):
    """CIA-Net's contrast map dM and the class's grid probabilities (cia-net Eq. 3, test at 0.5)."""

    maps = (MapSpec("contrast", "contrast attention dM", "score", per_class=False),
            MapSpec("grid", "grid probabilities (nearest-upsampled)", "probability"),
            MapSpec("grid_raw", "grid probabilities as the network gave them", "probability", frame="own"),
            MapSpec("paired_normal", "the paired normal image (bank frame)", "image", frame="own",
                    per_class=False))
    panels = (PanelSpec("contrast", "Contrast attention dM", "contrast", quantity="contrast",
                        order=40, per_class=False, caption="Contrast dM"),
              PanelSpec("normal", "Paired normal", "paired_normal", kind="image", order=50, per_class=False,
                        caption="Paired normal"))
    box_rule = BoxRule("grid", 0.5)
    box_score = "probability"  # mean grid probability inside the box

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        from cxrviewer.core.models.cia import hash_codes, nearest_normal

        b = ctx.bundles["cia"]
        pre = ctx.preprocess("cia")
        bank = np.asarray(b.extras["normal_bank_images"])
        x01, box = pre.crop_resize(ctx.work)
        code = hash_codes(x01.float().cpu())[0]
        codes = b.extras.get("normal_bank_codes")
        codes_t = (torch.from_numpy(np.asarray(codes, np.float32)) if codes is not None
                   else hash_codes(torch.from_numpy(bank.astype(np.float32) / 255.0)[:, None]))
        idx = nearest_normal(code, codes_t)
        kw = {}
        up = b.manifest.inference.get("upsample_to")
        if up and accepts(b.model, "upsample_to"):
            kw["upsample_to"] = int(up)  # cia-net Sec. 3.3 test-time upsampling of F before the head
        out, source = self._run(ctx, pre.normalise(x01), idx, kw)
        att = out["attention"][0].float()
        att = att[0] if att.dim() == 3 else att
        grid = out["grid_probs"][0].float()
        mp = ctx.mapper(box)
        ids = b.extras.get("normal_bank_ids")
        pair_id = str(ids[idx]) if ids is not None and len(ids) > idx else f"bank[{idx}]"
        if not ctx.results.classes:
            ctx.results.classes = tuple(b.manifest.classes)
        attrs = {"classes": list(b.manifest.classes), "paired_normal_id": pair_id, "normal_bank_cache": source}
        notice = _bank_notice(b) if source != "off" else ""
        if notice:
            attrs["normal_bank_cache_notice"] = notice
        return ExplainerOutput(
            {"contrast": mp(att)[0], "grid": mp(grid, nearest=True),
             "grid_raw": grid.cpu().numpy().astype(np.float32), "paired_normal": bank[idx].astype(np.uint8)},
            attrs)

    @staticmethod
    def _run(ctx: "ExplainContext", x: torch.Tensor, idx: int,
             kw: dict[str, Any]) -> tuple[Mapping[str, torch.Tensor], str]:
        """CIA-Net on ``x`` paired with bank image ``idx``: its cached ``M-`` when the model takes one
        (one encoder pass fewer), else the image itself. Returns (outputs, cache source or ``off``)."""
        b = ctx.bundles["cia"]
        if ctx.option("cia_bank_cache", True) and accepts(b.model, "neg_attention") \
                and callable(getattr(b.model, "negative_attention", None)):
            m_neg, source = bank_attention(b, idx, ctx.device)
            try:
                with torch.no_grad(), ctx.device.autocast():
                    return b.model(x, neg_attention=m_neg, **kw), source
            except ModelError as exc:
                if source != "bundle":
                    raise
                _drop_file_cache(b, str(exc))
            m_neg, source = bank_attention(b, idx, ctx.device)
            with torch.no_grad(), ctx.device.autocast():
                return b.model(x, neg_attention=m_neg, **kw), source
        neg = bank_negatives(b.extras["normal_bank_images"], [idx], b.manifest.input_size,
                             ctx.preprocess("cia"), x.device)
        with torch.no_grad(), ctx.device.autocast():
            return b.model(x, neg, **kw), "off"

    def missing(self, roles: Collection[str]) -> str:
        return "" if self.applies(roles) else "needs a CIA model with a normal bank (not loaded)"

    def class_reason(self, results: "Results", name: str) -> str:
        return "" if name in self.classes(results) else "not a CIA model class"

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        if panel.key == "normal":
            return str(results.attrs.get(self.name, {}).get("paired_normal_id") or "")
        raw = results.get(self.name, "grid_raw")
        names = self.classes(results)
        if raw is None or class_index is None or class_index >= len(results.classes):
            return ""
        name = results.classes[class_index]
        if name not in names:
            return ""
        return f"· {name} grid max p={float(raw[names.index(name)].max()):.2f}"

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *, model: torch.nn.Module | None = None,
                inputs: Any = None, **context: Any) -> dict[str, np.ndarray]:
        att = self._require(output, "attention")
        if att.dim() == 4:
            att = att[:, 0]
        maps = {"contrast": to_numpy(att)}
        if "grid_probs" in output:
            maps["grid"] = to_numpy(output["grid_probs"][:, class_index])
        pair = context.get("pair_index", output.get("pair_index") if hasattr(output, "get") else None)
        if pair is not None:
            maps["pair_index"] = np.asarray(torch.as_tensor(pair).reshape(-1).tolist(), dtype=np.int64)
        return maps
