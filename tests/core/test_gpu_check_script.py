"""benchmarks/gpu_check.py runs end to end without a GPU (GPU parts skipped) and, at toy scale, on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_the_check_runs_every_file_with_cuda_marked_tests():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
              if p.name != Path(__file__).name and "pytest.mark.cuda" in p.read_text(encoding="utf-8")}
    assert marked == set(gpu_check.CUDA_TEST_FILES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_without_cuda_the_gpu_parts_are_skipped_and_the_report_written(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["mode"].startswith("no CUDA")
    assert rep["parts"]["cuda_tests"]["status"] == "ok" and rep["parts"]["cuda_tests"]["failed"] == 0
    for name in ("analyze_cli_1_process", "pipeline_stages_and_autocast", "train_one_epoch",
                 "analyze_torchrun_2_processes"):
        assert rep["parts"][name]["status"] == "skipped", name


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert all(v["status"] == "ok" for v in parts.values()), parts
    assert parts["analyze_cli_1_process"]["studies_in_predictions_csv"] == 4
    assert parts["analyze_torchrun_2_processes"]["studies_in_predictions_csv"] == 4
    assert parts["train_one_epoch"]["bundle_written"] and parts["train_one_epoch"]["images_per_s"] > 0
    assert parts["pipeline_stages_and_autocast"]["autocast_vs_fp32"]["bf16"]["max_prob_diff"] < 0.05
