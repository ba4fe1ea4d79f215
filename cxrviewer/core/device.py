"""Where networks run and at what precision, with a CPU fallback on GPU out-of-memory.

Policy
------
* ``prefer="auto"``: CUDA when ``torch.cuda.is_available()``, else CPU.
* CUDA: autocast in bfloat16 when the GPU supports it (Ampere and newer),
  else float16.
* CPU: float32 by default. bfloat16 autocast on CPU is only a win on CPUs with
  native bf16 (AMX or AVX-512 BF16) and changes results in the third digit, so it
  is opt-in: ``select_device("cpu", cpu_bf16=True)``, ``cxrviewer analyze --cpu-bf16``
  or the environment variable ``CXRVIEWER_CPU_BF16=1``; it is honoured only when
  :func:`cpu_has_fast_bf16`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """A torch device plus the autocast dtype used on it (``None`` = full float32)."""

    device: torch.device
    dtype: torch.dtype | None
    name: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __str__(self) -> str:
        prec = str(self.dtype).replace("torch.", "") if self.dtype is not None else "float32"
        return f"{self.device} ({self.name}, {prec})"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast context for this device (a no-op for float32)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively, where oneDNN's bf16 convolutions beat float32:
    AMX tiles (Intel Sapphire Rapids and newer) or AVX-512 BF16 (AMD Zen 4 and newer, Intel Cooper
    Lake). On a 2-core AMD EPYC (Zen 4), ResNet-50 at 512 px: 0.34 s float32, 0.16 s bf16
    channels-last (``benchmarks/pipeline_cpu.py --cpu-bf16``)."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - older torch
        cap = ""
    if "AMX" in cap:
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def cpu_device(*, cpu_bf16: bool | None = None) -> DeviceInfo:
    """The CPU, float32 unless bf16 is asked for and the CPU computes it natively."""
    if cpu_bf16 is None:
        cpu_bf16 = os.environ.get("CXRVIEWER_CPU_BF16", "") in ("1", "true", "yes")
    dtype = torch.bfloat16 if cpu_bf16 and cpu_has_fast_bf16() else None
    return DeviceInfo(torch.device("cpu"), dtype, _cpu_name())


def select_device(prefer: str = "auto", *, cpu_bf16: bool | None = None) -> DeviceInfo:
    """Pick the device: ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``.

    Asking for ``"cuda"`` on a machine without it logs a warning and returns the CPU.
    """
    prefer = (prefer or "auto").lower()
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {prefer!r}")
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        idx = torch.cuda.current_device()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceInfo(torch.device("cuda", idx), dtype, torch.cuda.get_device_name(idx))
    if prefer == "cuda":
        log.warning("CUDA was requested but is not available; running on the CPU")
    return cpu_device(cpu_bf16=cpu_bf16)


@dataclass
class FallbackResult:
    """What :func:`run_with_oom_fallback` returns: the value, where it ran, any notice."""

    value: Any
    device: DeviceInfo
    notice: str | None = None


def run_with_oom_fallback(fn: Callable[..., Any], *args: Any, device: DeviceInfo,
                          **kwargs: Any) -> FallbackResult:
    """Call ``fn(*args, device=device, **kwargs)``; on CUDA out-of-memory retry on the CPU.

    On :class:`torch.cuda.OutOfMemoryError` the CUDA cache is emptied and ``fn``
    is called again with ``device=cpu_device()``; ``fn`` is responsible for
    moving its models/tensors to the device it is given. The notice says what
    happened (also logged as a warning).
    """
    try:
        return FallbackResult(fn(*args, device=device, **kwargs), device, None)
    except torch.cuda.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
    # Outside the except block, so the traceback's frames (and their GPU
    # tensors) are released before the cache is emptied.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cpu = cpu_device()
    notice = f"GPU ran out of memory on {device.name} ({first}); finished on the CPU instead"
    log.warning(notice)
    return FallbackResult(fn(*args, device=cpu, **kwargs), cpu, notice)


def autocast(info: DeviceInfo) -> contextlib.AbstractContextManager[None]:
    """``with autocast(info):`` the precision policy of ``info`` (same as ``info.autocast()``)."""
    return info.autocast()


def leave_one_core(switch_interval: float = 0.001) -> int:
    """Let torch use every core but one, so an interactive thread always has a core (returns threads).

    Also shortens the interpreter's thread switch interval (5 -> 1 ms) so that the interactive
    thread gets the GIL back quickly while a model worker runs Python code.
    """
    import os
    import sys

    sys.setswitchinterval(switch_interval)
    n = max(1, (os.cpu_count() or 2) - 1)
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
