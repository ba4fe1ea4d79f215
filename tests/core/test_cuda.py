"""CUDA paths (marker ``cuda``): skipped without a GPU, run by ``benchmarks/gpu_check.py`` on one.

CI has no GPU, so these only run where one is lent; each compares the CUDA result with the CPU
result of the same tiny random-weight models, so a wrong device move, a dtype left in half
precision or a kernel that differs beyond autocast's rounding fails here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.device import DeviceInfo, cpu_device, select_device
from cxrviewer.core.pipeline import Pipeline

from _tiny_bundles import make_tiny_bundles, synthetic_study

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    paths = make_tiny_bundles(tmp_path_factory.mktemp("cuda-bundles"))
    return {role: load_bundle(p) for role, p in paths.items()}


def _fp32_cuda() -> DeviceInfo:
    return DeviceInfo(torch.device("cuda", torch.cuda.current_device()), None, "cuda fp32")


def _flat_maps(res) -> dict[str, np.ndarray]:
    out = {}
    for ex, maps in res.maps.items():
        for key, val in maps.items():
            items = val.items() if isinstance(val, dict) else [("", val)]
            for sub, arr in items:
                if isinstance(arr, np.ndarray) and arr.ndim >= 2 and arr.dtype.kind == "f":
                    out[f"{ex}/{key}/{sub}"] = arr
    return out


def test_select_device_picks_the_gpu_with_a_half_precision_autocast():
    info = select_device("cuda")
    assert info.is_cuda and info.device.type == "cuda"
    assert info.dtype in (torch.bfloat16, torch.float16)


def test_pipeline_on_cuda_fp32_matches_the_cpu(bundles):
    study = synthetic_study()
    cpu = Pipeline(bundles, cpu_device()).run(study)
    gpu = Pipeline(bundles, _fp32_cuda()).run(study)
    assert np.abs(cpu.probabilities - gpu.probabilities).max() < 1e-3
    a, b = _flat_maps(cpu), _flat_maps(gpu)
    assert set(a) == set(b) and a
    for k in a:
        rng = float(np.ptp(a[k])) or 1.0
        assert np.abs(a[k] - b[k]).max() / rng < 2e-2, k


def test_pipeline_autocast_agrees_with_fp32_on_cuda(bundles):
    study = synthetic_study(seed=1)
    fp32 = Pipeline(bundles, _fp32_cuda()).run(study)
    amp = Pipeline(bundles, select_device("cuda")).run(study)
    assert np.abs(fp32.probabilities - amp.probabilities).max() < 5e-2
    assert "cuda" in amp.device


def test_a_training_step_on_cuda_is_finite_and_moves_the_weights():
    from cxrviewer.core.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("msa", backbone="tiny", num_classes=14).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(4, 1, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (4, 14), device="cuda").float()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=select_device("cuda").dtype):
        out = model(x)
        logits = out["logits"] if isinstance(out, dict) else out
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_oom_fallback_is_not_taken_on_a_small_cuda_run(bundles):
    from cxrviewer.core.device import run_with_oom_fallback

    def fn(*, device: DeviceInfo):
        return torch.ones(8, device=device.device).sum().item()

    res = run_with_oom_fallback(fn, device=select_device("cuda"))
    assert res.value == 8 and res.device.is_cuda and res.notice is None
