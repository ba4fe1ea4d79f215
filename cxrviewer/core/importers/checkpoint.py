"""Reading a user's checkpoint as plain tensors, safely (Qt-free).

* ``.safetensors`` files are read with :mod:`safetensors` (no code can run).
* Anything else is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
  containers only. A file that needs pickle (a whole module saved with ``torch.save(model)``,
  as torchxrayvision's weights are, or an ``argparse.Namespace`` in a training checkpoint)
  is refused with :class:`PickleRequiredError` unless the caller allows pickle; then it is
  unpickled in a separate ``spawn`` process (:mod:`._pickle_child`) that writes the tensors
  back as a plain state dict, which this process reads with ``weights_only=True`` again: the
  caller's process never unpickles the user's file.

Sizes are checked before anything is read: the file (:data:`MAX_CHECKPOINT_BYTES`), the
members a torch zip file declares, and a safetensors header.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundle import MAX_PARAMETERS, MAX_WEIGHTS_PICKLE_BYTES
from ..checksum import sha256_file
from ..errors import ImportModelError
from .state_dict import find_state_dict

log = logging.getLogger(__name__)

#: Largest checkpoint read: the weights of :data:`MAX_PARAMETERS` float32 parameters and two
#: optimizer moments (Adam), plus room for metadata.
MAX_CHECKPOINT_BYTES = 3 * 4 * MAX_PARAMETERS + (64 << 20)
#: Largest safetensors JSON header.
MAX_SAFETENSORS_HEADER = MAX_WEIGHTS_PICKLE_BYTES
#: Seconds the child that unpickles a legacy checkpoint may take.
PICKLE_CHILD_TIMEOUT_S = 600.0

#: What torch's weights-only unpickler says about a well-formed pickle that holds other objects.
_NEEDS_PICKLE: tuple[str, ...] = ("Unsupported global", "Unsupported class", "Trying to call reduce", "GLOBAL")


class PickleRequiredError(ImportModelError):
    """The checkpoint holds pickled Python objects; reading it needs ``--allow-pickle``."""


@dataclass
class Checkpoint:
    """A checkpoint's tensors and what is known about the file."""

    state: dict[str, torch.Tensor]
    path: Path
    sha256: str
    bytes: int
    pickled: bool = False  # read through the pickle child
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"targets": [...]} of a torchxrayvision module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _check_zip(p: Path) -> None:
    """A torch zip file must declare at most :data:`MAX_CHECKPOINT_BYTES` and small pickles."""
    try:
        with zipfile.ZipFile(p) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ImportModelError(f"not a readable torch zip file: {_first_line(exc)}", path=str(p)) from exc
    if sum(m.file_size for m in members) > MAX_CHECKPOINT_BYTES:
        raise ImportModelError(f"declares more than {MAX_CHECKPOINT_BYTES >> 20} MiB; refused unread", path=str(p))
    for m in members:
        if m.filename.endswith(".pkl") and m.file_size > MAX_WEIGHTS_PICKLE_BYTES:
            raise ImportModelError(f"holds a {m.file_size}-byte pickle (limit {MAX_WEIGHTS_PICKLE_BYTES >> 20} "
                                   f"MiB); refused unread", path=str(p))


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or struct.unpack("<Q", head)[0] > MAX_SAFETENSORS_HEADER:
        raise ImportModelError("not a safetensors file, or its header is over the limit; refused", path=str(p))
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportModelError("reading .safetensors needs the safetensors package (pip install safetensors)",
                               path=str(p)) from exc
    try:
        return dict(load_file(str(p), device="cpu"))
    except Exception as exc:  # noqa: BLE001 - the library's own errors, one typed line
        raise ImportModelError(f"cannot read the safetensors file: {_first_line(exc)}", path=str(p)) from exc


def _read_torch(p: Path) -> Any:
    """``torch.load(weights_only=True)`` after the zip checks; :class:`PickleRequiredError` if it needs pickle."""
    if zipfile.is_zipfile(p):
        _check_zip(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not any(m in str(exc) for m in _NEEDS_PICKLE):  # e.g. "Unsupported operand": not a pickle at all
            raise ImportModelError("cannot be read as a torch checkpoint (truncated, damaged or another kind of "
                                   "file)", path=str(p)) from exc
        raise PickleRequiredError(
            "holds pickled Python objects (e.g. a whole model saved with torch.save(model)); loading it could "
            "run code from the file, so it was refused unread. If you trust it, rerun with --allow-pickle "
            "(it is then unpickled in a separate process)", path=str(p)) from exc
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, ...
        raise ImportModelError(f"cannot be read as a torch checkpoint: {type(exc).__name__}: {_first_line(exc)}",
                               path=str(p)) from exc


def _read_in_child(p: Path, timeout: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unpickle ``p`` in a ``spawn`` child; read back the plain state dict it writes (weights_only)."""
    import multiprocessing

    from ..io.dicom import _main_not_reimported
    from . import _pickle_child

    tmp = Path(tempfile.mkdtemp(prefix="cxrviewer-import-"))  # private: mode 0700
    out, err, meta = tmp / "state.pt", tmp / "error.txt", tmp / "meta.json"
    try:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_pickle_child.convert, args=(str(p), str(out), str(err), str(meta)),
                           name="cxrviewer-unpickle", daemon=True)
        with _main_not_reimported():
            proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
            raise ImportModelError(f"unpickling took longer than {timeout:.0f} s and was stopped", path=str(p))
        if proc.exitcode != 0 or not out.is_file():
            why = err.read_text(encoding="utf-8", errors="replace")[:300].strip() if err.is_file() else ""
            raise ImportModelError(f"the pickled checkpoint could not be read (in its child process, exit "
                                   f"{proc.exitcode}): {why or 'no message'}", path=str(p))
        state = find_state_dict(_read_torch(out))
        info = json.loads(meta.read_text(encoding="utf-8")[:1 << 20]) if meta.is_file() else {}
        return state, info if isinstance(info, dict) else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False,
                    warn: Callable[[str], None] | None = None,
                    child_timeout: float = PICKLE_CHILD_TIMEOUT_S) -> Checkpoint:
    """The tensors of the checkpoint at ``path`` (see module docstring); typed errors only."""
    p = Path(path)
    if not p.is_file():
        raise ImportModelError("checkpoint file not found", path=str(p))
    size = p.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise ImportModelError(f"is {size} bytes, over the {MAX_CHECKPOINT_BYTES >> 20} MiB checkpoint limit; "
                               f"refused unread", path=str(p))
    sha = sha256_file(p)
    if p.suffix.lower() == ".safetensors":
        return Checkpoint(_read_safetensors(p), p, sha, size)
    try:
        return Checkpoint(find_state_dict(_read_torch(p)), p, sha, size)
    except PickleRequiredError:
        if not allow_pickle:
            raise
    msg = (f"WARNING: {p.name} is a pickled checkpoint; --allow-pickle lets it run any code it holds. It is "
           f"unpickled in a separate process; only its tensors come back.")
    (warn or log.warning)(msg)
    state, meta = _read_in_child(p, child_timeout)
    return Checkpoint(state, p, sha, size, pickled=True, meta=meta)


# ---- key layout -------------------------------------------------------------------------------
_OLD_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def fix_old_densenet_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old torchvision DenseNet names (``denselayer1.norm.1.weight``) as today's (``norm1.weight``)."""
    out = {}
    for k, v in state.items():
        m = _OLD_DENSE.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def strip_prefixes(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop leading name parts every key shares (``module.``, ``module.densenet121.``,
    ``_orig_mod.``, ...) while the keys do not yet match ``expected``."""
    out = dict(state)
    for _ in range(4):
        if not out or set(out) & expected:
            break
        heads = {k.split(".", 1)[0] for k in out}
        if len(heads) != 1 or any("." not in k for k in out):
            break
        out = {k.split(".", 1)[1]: v for k, v in out.items()}
    return out


def _listed(keys: list[str], n: int = 4) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def fit_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
              ignore: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``model`` exactly (missing BatchNorm counters become 0); returns the
    ignored keys dropped. Missing, unexpected or wrongly shaped tensors: :class:`ImportModelError`
    listing the first few."""
    expected = model.state_dict()
    state = dict(state)
    dropped = [k for k in state if k not in expected and k.split(".")[-1] in ignore]
    for k in dropped:
        state.pop(k)
    for k, t in expected.items():
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = torch.zeros_like(t, device="cpu")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_listed(missing)}" if missing else "", f"unexpected {_listed(unexpected)}" if unexpected else ""]
        raise ImportModelError(f"the checkpoint does not fit {what}: " + "; ".join(p for p in parts if p))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(t.shape)}" for k, t in expected.items()
           if tuple(state[k].shape) != tuple(t.shape)]
    if bad:
        raise ImportModelError(f"the checkpoint does not fit {what}: wrong shapes {'; '.join(bad[:4])}"
                               + (f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""))
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ImportModelError(f"the checkpoint holds NaN or infinite values in {_listed(nonfinite)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return dropped
