"""M4: contrast-induced attention network, CIA-Net (cia-net-alignment-contrast-attention.txt Sec. 3.2).

* Feature branch: ``F+`` = stage-5 (C5) output of the positive image.
* Attention branch: a shared encoder (backbone up to stage 4, C4) run on the
  positive and its paired negative, 2x2 max pool, 1x1 conv -> maps ``M+``, ``M-``
  on the C5 grid. ``dM = |M+ - M-|`` normalised so ``sum_k dm_k = w*h`` (a tiny
  epsilon keeps identical pairs at a uniform map of ones).
* ``F = dM * F+`` (Eq. 3), then the head (1x1 conv, ReLU, 1x1 conv) and a
  sigmoid give ``C x h x w`` grid probabilities.

The grid follows the input size: stride 32, so 512 px -> 16 x 16 (the paper),
256 px -> 8 x 8. ``forward(..., upsample_to=128)`` bilinearly upsamples ``F``
before the last two convolutions, the paper's test-time trick (Sec. 3.3).
``share_encoder=False`` (default, the paper: a backbone per branch) gives the
attention branch its own encoder; ``True`` reuses the feature branch's stages 1-4.

The negative side needs only ``M-`` (:meth:`CIANet.negative_attention`): for a fixed normal
bank it is computed once (``forward(x_pos, neg_attention=...)``; the bank cache lives in
``cxrviewer/core/explain/contrast.py``) and :func:`negative_fingerprint` says which weights made it.

Negative pairing (Sec. 4.4): :func:`hash_codes` resizes images to 16x16 and
flattens them; :func:`nearest_normal` picks the bank entry with the highest
cosine similarity.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.backbones import build_backbone
from cxrviewer.core.models.registry import image_inputs, register_model

HASH_SIZE = 16


def hash_codes(images: torch.Tensor, size: int = HASH_SIZE) -> torch.Tensor:
    """``[N, 1, H, W]`` -> ``[N, size*size]`` codes: area-resized to 16x16 and flattened (CIA-Net Sec. 4.4)."""
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4:
        raise ModelError(f"hash_codes expects [N, 1, H, W], got shape {tuple(images.shape)}")
    small = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), size)
    return small.flatten(1)


def cosine_similarity_matrix(codes: torch.Tensor, bank_codes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[N, M]`` between codes ``[N, D]`` and a bank ``[M, D]``."""
    return F.normalize(codes.float(), dim=-1) @ F.normalize(bank_codes.float(), dim=-1).t()


def nearest_normals(codes: torch.Tensor, bank_codes: torch.Tensor) -> torch.Tensor:
    """Index into the bank of the nearest code by cosine distance, for each of ``[N, D]`` codes."""
    if bank_codes.dim() != 2 or bank_codes.shape[0] == 0:
        raise ModelError("the bank of normal hash codes is empty")
    return cosine_similarity_matrix(codes.reshape(-1, bank_codes.shape[1]), bank_codes).argmax(1)


def nearest_normal(code: torch.Tensor, bank_codes: torch.Tensor) -> int:
    """Index of the bank code ``[M, D]`` nearest to ``code [D]`` by cosine distance."""
    return int(nearest_normals(code.reshape(1, -1), bank_codes)[0])


def normalise_attention(diff: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale ``|M+ - M-|`` ``[B, 1, h, w]`` so its cells sum to ``w*h`` (CIA-Net Eq. 3)."""
    d = diff.abs() + eps
    n = d.shape[-1] * d.shape[-2]
    return d * (n / d.sum((2, 3), keepdim=True))


class CIANet(nn.Module):
    """Contrast-induced attention network (CIA-Net Eq. 3 and Sec. 3.2)."""

    family = "cia"

    def __init__(self, backbone: str = "resnet50", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1, head_channels: int = 512, share_encoder: bool = False) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(backbone, in_channels)
        self.share_encoder = bool(share_encoder)
        self.encoder = None if self.share_encoder else build_backbone(backbone, in_channels)
        c4 = self.backbone.channels["stage4"]
        k = self.backbone.out_channels
        self.attention_conv = nn.Conv2d(c4, 1, kernel_size=1)
        hidden = int(head_channels)
        self.head = nn.Sequential(nn.Conv2d(k, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, self.num_classes, 1))
        self.feature_channels = k

    def feature_layer(self) -> nn.Module:
        return self.backbone.stages["stage5"]

    def _attention(self, c4: torch.Tensor) -> torch.Tensor:
        return self.attention_conv(F.max_pool2d(c4, kernel_size=2, stride=2, ceil_mode=True))

    def attention_encoder(self) -> nn.Module:
        """The encoder whose C4 gives the attention maps (the backbone itself when shared)."""
        return self.backbone if self.share_encoder else self.encoder

    def negative_attention(self, x_neg: torch.Tensor) -> torch.Tensor:
        """``M-`` ``[B, 1, h', w']`` of negatives ``x_neg`` (before any resize to the C5 grid).

        Depends only on the attention encoder's stages 1-4 and ``attention_conv``
        (:func:`negative_state`), so a fixed normal bank's maps can be computed once.
        """
        return self._attention(self.attention_encoder()(x_neg, until="stage4")["stage4"])

    def before_fold(self) -> None:
        """Record :func:`negative_fingerprint` of the unfolded weights (``models/fold.py``): a bank
        cache made by this model before folding stays valid for the folded, equal-valued one."""
        self._pre_fold = _hash_state(self)

    def after_fold(self) -> None:
        """Pair the unfolded weights' fingerprint with the folded ones' (weights changed after
        folding no longer match, and are fingerprinted as they are)."""
        self._fold_fingerprints = (_hash_state(self), self._pre_fold)

    def _positive(self, x_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M+, F+)`` of the positive alone."""
        if self.share_encoder:
            c4 = self.backbone(x_pos, until="stage4")["stage4"]
            return self._attention(c4), self.backbone.stages["stage5"](c4)
        return self._attention(self.encoder(x_pos, until="stage4")["stage4"]), self.backbone(x_pos)["stage5"]

    def forward(self, x_pos: torch.Tensor, x_neg: torch.Tensor | None = None,
                upsample_to: int | None = None, *,
                neg_attention: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Grid outputs for positive ``x_pos`` paired with negative ``x_neg`` (both ``[B,C,H,W]``).

        ``neg_attention``: the negative's precomputed ``M-`` (:meth:`negative_attention`,
        ``[B or 1, 1, h', w']``) instead of ``x_neg``; the negative then costs no encoder pass.
        """
        b = x_pos.shape[0]
        if neg_attention is not None:
            if x_neg is not None:
                raise ModelError("give the negative image or its attention map, not both")
            m_pos, f_pos = self._positive(x_pos)
            m_neg = neg_attention.to(device=m_pos.device, dtype=m_pos.dtype)
            if m_neg.dim() != 4 or m_neg.shape[1] != 1 or m_neg.shape[0] not in (1, b) \
                    or m_neg.shape[-2:] != m_pos.shape[-2:]:
                raise ModelError(f"negative attention {tuple(m_neg.shape)} does not fit the positive's "
                                 f"{tuple(m_pos.shape)}")
            m_neg = m_neg.expand_as(m_pos)
        else:
            if x_neg is None or x_neg.shape != x_pos.shape:
                got = None if x_neg is None else tuple(x_neg.shape)
                raise ModelError(f"positive {tuple(x_pos.shape)} and negative {got} differ in shape")
            if self.share_encoder:
                c4 = self.backbone(torch.cat([x_pos, x_neg]), until="stage4")["stage4"]
                f_pos = self.backbone.stages["stage5"](c4[:b])
            else:
                f_pos = self.backbone(x_pos)["stage5"]
                c4 = self.encoder(torch.cat([x_pos, x_neg]), until="stage4")["stage4"]
            m = self._attention(c4)
            m_pos, m_neg = m[:b], m[b:]
        if m_pos.shape[-2:] != f_pos.shape[-2:]:
            m_pos = F.interpolate(m_pos, size=f_pos.shape[-2:], mode="bilinear", align_corners=False)
            m_neg = F.interpolate(m_neg, size=f_pos.shape[-2:], mode="bilinear", align_corners=False)
        dm = normalise_attention(m_pos - m_neg)
        weighted = dm * f_pos
        h = weighted
        if upsample_to:
            h = F.interpolate(h, size=(int(upsample_to),) * 2, mode="bilinear", align_corners=False)
        logits = self.head(h)
        # MIL image probability P = 1 - prod_j (1 - p_j) (CIA-Net Eq. 5), in log space.
        log_none = -F.softplus(logits).flatten(2).sum(2)
        return {
            "grid_logits": logits,
            "grid_probs": torch.sigmoid(logits),
            "image_probs": -torch.expm1(log_none),
            "attention": dm,
            "attention_pos": m_pos,
            "attention_neg": m_neg,
            "features": f_pos,
            "weighted_features": weighted,
        }


def negative_state(model: CIANet) -> list[tuple[str, torch.Tensor]]:
    """The named tensors ``M-`` depends on (attention encoder stem and stages 2-4, ``attention_conv``)."""
    enc = model.attention_encoder()
    out = [(f"encoder.{n}", t) for n, t in list(enc.named_parameters()) + list(enc.named_buffers())
           if not n.startswith("stages.stage5.")]
    out += [(f"attention_conv.{n}", t) for n, t in model.attention_conv.named_parameters()]
    return out


def _hash_state(model: CIANet) -> str:
    """SHA-256 of :func:`negative_state` as it is now (names, shapes, float32 values)."""
    h = hashlib.sha256()
    for name, t in negative_state(model):
        v = t.detach()
        v = v.float() if v.is_floating_point() else v
        h.update(f"{name}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def negative_fingerprint(model: CIANet) -> str:
    """SHA-256 of :func:`negative_state` (names, shapes, float32 values): what a cached ``M-`` was made by.
    A BN-folded model (``models/fold.py``, inference only) whose folded weights are unchanged answers
    with the value of its unfolded weights."""
    digest = _hash_state(model)
    pair = getattr(model, "_fold_fingerprints", None)
    return pair[1] if pair is not None and pair[0] == digest else digest


def _pair_inputs(batch: int, size: int, in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    (x,) = image_inputs(batch, size, in_channels)
    g = torch.Generator().manual_seed(1)
    return x, (torch.rand(batch, in_channels, size, size, generator=g) * 2 - 1)


@register_model(
    "cia",
    family="cia",
    description="M4 CIA-Net: C5 features weighted by |M+ - M-| from a shared C4 encoder, grid probabilities",
    default_kwargs={"backbone": "resnet50", "num_classes": NUM_CLASSES, "in_channels": 1,
                    "head_channels": 512, "share_encoder": False},
    test_kwargs={"backbone": "tiny", "head_channels": 32},
    inputs=_pair_inputs,
)
def cia(**kwargs: Any) -> CIANet:
    """CIA-Net (cia-net-alignment-contrast-attention.txt Eq. 3-5)."""
    return CIANet(**kwargs)
