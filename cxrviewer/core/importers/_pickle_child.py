"""The child process that unpickles a legacy checkpoint (``--allow-pickle``) and writes plain tensors.

Runs in a ``spawn`` process started by :func:`cxrviewer.core.importers.checkpoint._read_in_child`.
Whatever code the pickle holds runs here, not in the caller. The result goes back as a file
the parent reads with ``torch.load(weights_only=True)``: a ``{name: tensor}`` dict (and a small
JSON file with the module's label list, if it has one); the parent never unpickles the input.
"""
from __future__ import annotations

import json


def convert(src: str, dst: str, err: str, meta: str) -> None:
    """Unpickle ``src``; write its state dict to ``dst`` and labels to ``meta``, or a message to ``err``."""
    try:
        import torch

        from .state_dict import find_state_dict

        obj = torch.load(src, map_location="cpu", weights_only=False)
        targets = getattr(obj, "targets", None) or getattr(obj, "pathologies", None)
        info = {}
        if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets) and len(targets) <= 1000:
            info["targets"] = [str(t)[:256] for t in targets]
        state = {str(k): v.detach().cpu().clone().contiguous().as_subclass(torch.Tensor)
                 for k, v in find_state_dict(obj).items() if isinstance(v, torch.Tensor)}
        torch.save(state, dst)
        with open(meta, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
    except BaseException as exc:  # noqa: BLE001 - report anything, then fail
        with open(err, "w", encoding="utf-8") as fh:
            fh.write(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:250] if str(exc).strip() else ''}")
        raise SystemExit(1) from None
