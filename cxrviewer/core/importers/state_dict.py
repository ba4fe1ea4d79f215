"""Where a checkpoint keeps its weights: the state dict inside whatever ``torch.load`` returned.

Used by the importer (cxrviewer/core/importers/checkpoint.py) and by the child process that
unpickles legacy checkpoints (cxrviewer/core/importers/_pickle_child.py), which needs this and
nothing else of the importer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ImportModelError

__all__ = ["STATE_KEYS", "find_state_dict"]

#: Keys under which training scripts store a model's state dict, in the order they are tried.
STATE_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net", "network", "weights",
                               "params", "state_dict_ema", "model_ema")


def find_state_dict(obj: Any, depth: int = 0) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a module's, a mapping of tensors, or one under
    a key of :data:`STATE_KEYS` (``{"state_dict": ..., "optimizer": ...}``)."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise ImportModelError(f"the checkpoint holds a {type(obj).__name__}, not a model or a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return tensors
    if depth < 3:
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, torch.nn.Module)):
                try:
                    return find_state_dict(inner, depth + 1)
                except ImportModelError:
                    continue
    if tensors:
        return tensors
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise ImportModelError(f"the checkpoint holds no state dict (top-level keys: {keys})")
