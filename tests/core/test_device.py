"""Device choice, precision and the CPU fallback on CUDA out-of-memory."""
from __future__ import annotations

import pytest
import torch

from cxrviewer.core import device as dev
from cxrviewer.core.device import DeviceInfo, cpu_device, run_with_oom_fallback, select_device


def test_cpu_is_float32_by_default(monkeypatch):
    monkeypatch.delenv("CXRVIEWER_CPU_BF16", raising=False)
    info = select_device("cpu")
    assert info.device.type == "cpu" and info.dtype is None and not info.is_cuda
    assert "float32" in str(info)
    x = torch.ones(2, 2)
    with info.autocast():
        y = x @ x
    assert y.dtype == torch.float32


def test_cpu_bf16_only_with_native_bf16(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    info = cpu_device(cpu_bf16=True)
    assert info.dtype == torch.bfloat16
    with info.autocast():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    assert cpu_device(cpu_bf16=True).dtype is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_requested_without_gpu_falls_back_to_cpu(caplog):
    info = select_device("cuda")
    assert info.device.type == "cpu"
    assert "CUDA was requested" in caplog.text
    assert select_device("auto").device.type == "cpu"


def test_bad_device_name():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        select_device("tpu")


def test_oom_fallback_reruns_on_cpu(caplog):
    gpu = DeviceInfo(torch.device("cuda", 0), torch.bfloat16, "Fake GPU")
    calls = []

    def fn(x, *, device):
        calls.append(device)
        if device.is_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    out = run_with_oom_fallback(fn, 21, device=gpu)
    assert out.value == 42
    assert out.device.device.type == "cpu"
    assert [c.device.type for c in calls] == ["cuda", "cpu"]
    assert "out of memory" in out.notice and "Fake GPU" in out.notice
    assert "finished on the CPU" in caplog.text


def test_no_fallback_needed():
    out = run_with_oom_fallback(lambda *, device: device.name, device=cpu_device())
    assert out.notice is None and out.value == out.device.name
