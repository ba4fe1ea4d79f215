"""``cxrviewer analyze`` over archives: list files, progress, resume after a kill, the combined
predictions table and torchrun shards (tiny random-weight bundles, tiny PNGs)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tiny_bundles import make_tiny_bundles
from cxrviewer.__main__ import main
from cxrviewer.cli import _archive
from cxrviewer.core.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    make_tiny_bundles(d, roles=("classifier",), input_size=64)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small PNGs, half of them in a sub-folder (the folder is searched recursively)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(d / ("sub" if i % 2 else ".") / f"im{i}.png")
    return d


def _args(models_dir, out, *extra):
    return ["--models", str(models_dir), "--out", str(out), "--device", "cpu", "--no-panels", "--workers", "0",
            *extra]


@pytest.fixture
def count_runs(monkeypatch):
    """Counts Pipeline.run calls."""
    calls = []
    real = Pipeline.run

    def counted(self, study):
        calls.append(study.meta.source_path)
        return real(self, study)

    monkeypatch.setattr(Pipeline, "run", counted)
    return calls


def _table(out):
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_kill_after_three_and_restart_computes_only_the_rest(models_dir, images, tmp_path, monkeypatch, count_runs,
                                                            capsys):
    clean = tmp_path / "clean"
    assert main(["analyze", str(images), *_args(models_dir, clean, "--workers", "1")]) == 0  # decoded by a worker
    assert len(count_runs) == 6
    expected = _table(clean)
    assert expected[0] == list(_archive.TABLE_COLUMNS) and len(expected) == 1 + 6 * 14
    assert sorted({r[0] for r in expected[1:]}) == [f"im{i}" for i in range(6)]

    # the killed run: the 4th study is interrupted half-way through writing its folder
    import cxrviewer.core.io.results as results_io

    real_write, writes = results_io.write_results, []

    def write_then_die(results, path, **kw):
        writes.append(path)
        real_write(results, path, **kw)
        if len(writes) == 4:
            raise KeyboardInterrupt  # as a kill: nothing after this point runs

    monkeypatch.setattr(results_io, "write_results", write_then_die)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["analyze", str(images), *_args(models_dir, out)])
    monkeypatch.setattr(results_io, "write_results", real_write)
    done = sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    assert len(done) == 3 and not (out / "predictions.csv").exists()
    assert len(list((out / _archive.PARTIAL).iterdir())) == 1  # the half-written 4th, never in place
    mtimes = {n: (out / n / "summary.json").stat().st_mtime_ns for n in done}
    # an older version's half-written folder (results.h5, no summary) is redone in place, not suffixed
    fifth = next(f"im{i}" for i in range(6) if f"im{i}" not in done and not (out / f"im{i}").exists())
    (out / fifth).mkdir()
    shutil.copy(clean / fifth / "results.h5", out / fifth / "results.h5")

    del count_runs[:]
    assert main(["analyze", str(images), *_args(models_dir, out)]) == 0
    assert len(count_runs) == 3  # only the other three
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in done} == mtimes
    assert sorted(p.name for p in out.iterdir()) == [f"im{i}" for i in range(6)] + ["predictions.csv"]
    assert _table(out) == [[c.replace(str(clean), str(out)) for c in row] for row in expected]

    del count_runs[:]  # a third run: nothing to do, same table
    assert main(["analyze", str(images), *_args(models_dir, out)]) == 0
    assert count_runs == [] and _table(out) == expected
    capsys.readouterr()


def test_done_needs_same_models_options_and_file(models_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    src = images / "im0.png"
    assert main(["analyze", str(src), *_args(models_dir, out)]) == 0
    s = json.loads((out / "im0" / "summary.json").read_text())
    analysis = s["analysis"]
    assert set(analysis["weights_sha256"]) == {"classifier"} and len(analysis["weights_sha256"]["classifier"]) == 64
    assert s["source_file"]["bytes"] == src.stat().st_size
    assert _archive.is_done(out / "im0", str(src), analysis)
    assert not _archive.is_done(out / "im0", str(src), {**analysis, "weights_sha256": {"classifier": "0" * 64}})
    assert not _archive.is_done(out / "im0", str(src), {**analysis, "map_size": 64})
    assert not _archive.is_done(out / "im0", str(images / "im2.png"), analysis)
    copy = tmp_path / "im0.png"
    shutil.copy(src, copy)
    s["source_path"], s["source_file"] = str(copy), _archive.source_identity(str(copy))
    (out / "im0" / "summary.json").write_text(json.dumps(s))
    assert _archive.is_done(out / "im0", str(copy), analysis)
    os.utime(copy, ns=(1, 1))  # the file changed since
    assert not _archive.is_done(out / "im0", str(copy), analysis)
    capsys.readouterr()


def test_cpu_bf16_is_recorded_and_never_mixed_with_a_float32_analysis(models_dir, images, tmp_path, monkeypatch,
                                                                      count_runs, capsys):
    from cxrviewer.core import device as dev

    monkeypatch.delenv("CXRVIEWER_CPU_BF16", raising=False)
    src, out = images / "im0.png", tmp_path / "out"
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    assert main(["analyze", str(src), *_args(models_dir, out, "--cpu-bf16")]) == 0
    assert "--cpu-bf16: this CPU has no native bf16" in capsys.readouterr().err
    s = json.loads((out / "im0" / "summary.json").read_text())
    assert "float32" in s["device"] and "cpu_precision" not in s["analysis"]
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    assert main(["analyze", str(src), *_args(models_dir, out, "--cpu-bf16")]) == 0
    s = json.loads((out / "im0" / "summary.json").read_text())
    assert "bfloat16" in s["device"] and s["analysis"]["cpu_precision"] == "bfloat16"
    assert len(count_runs) == 2  # the float32 analysis was not taken as this one's
    assert main(["analyze", str(src), *_args(models_dir, out, "--cpu-bf16")]) == 0
    assert len(count_runs) == 2  # the same precision again: resumed, nothing recomputed
    assert main(["analyze", str(src), *_args(models_dir, out)]) == 0
    assert len(count_runs) == 3 and "float32" in json.loads((out / "im0" / "summary.json").read_text())["device"]


def test_list_file(models_dir, images, tmp_path, capsys):
    lst = tmp_path / "studies.txt"
    rel = os.path.relpath(images / "sub" / "im1.png", tmp_path)
    lst.write_text(f"# two studies and a missing one\n{images / 'im0.png'}\n\n{rel}\nnope.png\n{images / 'im0.png'}\n")
    out = tmp_path / "out"
    rc = main(["analyze", "--list", str(lst), *_args(models_dir, out)])
    assert rc == 1  # the missing file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.png" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["im0", "im1", "predictions.csv"]
    assert [r[0] for r in _table(out)[1::14]] == ["im0", "im1"]
    assert main(["analyze", "--list", str(tmp_path / "absent.txt"), *_args(models_dir, out)]) == 2
    assert "absent.txt" in capsys.readouterr().err


def test_progress_lines_and_quiet(models_dir, images, tmp_path, capsys):
    args = _args(models_dir, tmp_path / "out", "--progress-every", "0")
    assert main(["analyze", str(images / "sub"), *args]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" studies")[0] for line in err] == ["1/3", "2/3", "3/3"]
    assert all("studies/s" in line and "ETA" in line for line in err)
    assert main(["analyze", str(images / "sub"), *args]) == 0  # all done: one line, no stdout
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [cap.err.strip()] and "3/3 studies (0 analysed, 3 already done" in cap.err
    assert cap.out == ""
    assert main(["analyze", str(images), *_args(models_dir, tmp_path / "q", "--quiet", "--progress-every", "0")]) == 0
    assert capsys.readouterr() == ("", "")


def test_progress_on_a_terminal_updates_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = _archive.Progress(2, s)
    p.update(skipped=1)
    p._last = float("-inf")
    p.update(analysed=1)
    p.close()
    text = s.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 2
    assert "2/2 studies (1 analysed, 1 already done, 0 failed)" in text


def test_two_ranks_write_the_table_of_one_process(models_dir, images, tmp_path, monkeypatch, count_runs, capsys):
    """RANK/WORLD_SIZE shards in this process (rank 1 then rank 0, barrier stubbed): disjoint
    shards, and rank 0's table equals one process's."""
    one = tmp_path / "one"
    assert main(["analyze", str(images), *_args(models_dir, one)]) == 0
    out = tmp_path / "two"
    seen = {}
    for rank in (1, 0):
        monkeypatch.setattr(_archive.Shard, "from_env", classmethod(lambda cls, device="auto", r=rank: cls(r, 2)))
        del count_runs[:]
        assert main(["analyze", str(images), *_args(models_dir, out)]) == 0
        seen[rank] = sorted(Path(p).name for p in count_runs)
        assert (out / "predictions.csv").exists() == (rank == 0)
    assert seen == {0: ["im0.png", "im3.png", "im4.png"], 1: ["im1.png", "im2.png", "im5.png"]}  # input order: im0 im2 im4 sub/im1 im3 im5
    assert _table(out) == [[c.replace(str(one), str(out)) for c in row] for row in _table(one)]
    capsys.readouterr()


@pytest.mark.slow
def test_torchrun_two_processes_write_the_table_of_one(models_dir, images, tmp_path):
    """The real thing: ``torchrun --nproc_per_node 2`` (gloo on the CPU), about 25 s here."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = ["-m", "cxrviewer", "analyze", str(images), *_args(models_dir, "OUT"), "--quiet"]
    subprocess.run([sys.executable, *[str(one) if c == "OUT" else c for c in cmd]], env=env, check=True,
                   timeout=300)
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", *[str(two) if c == "OUT" else c for c in cmd]],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (two / "predictions.csv").read_bytes() == (one / "predictions.csv").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == [f"im{i}" for i in range(6)] + ["predictions.csv"]


@pytest.mark.slow
def test_sigkilled_run_restarts_where_it_stopped(models_dir, tmp_path):
    """A real SIGKILL mid-run (decoding worker included), then the same command again."""
    import signal
    import time

    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(src / f"s{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cxrviewer", "analyze", str(src), "--models", str(models_dir), "--out", str(out),
           "--device", "cpu", "--no-panels", "--workers", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, env=env)
    while p.poll() is None and len(list(out.glob("*/summary.json"))) < 3:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = {q.parent.name: q.stat().st_mtime_ns for q in out.glob("*/summary.json")}
    assert 3 <= len(before) < 40 and not (out / "predictions.csv").exists()
    subprocess.run(cmd, env=env, check=True, timeout=300)
    after = {q.parent.name: q.stat().st_mtime_ns for q in out.glob("*/summary.json")}
    assert len(after) == 40 and all(after[k] == v for k, v in before.items())  # the done ones untouched
    assert len(_table(out)) == 1 + 40 * 14 and not (out / _archive.PARTIAL).exists()


def test_panels_only_on_request_for_folders_and_lists(models_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--models", str(models_dir), "--out", str(out), "--device", "cpu", "--workers", "0", "--quiet"]
    assert main(["analyze", str(images), *base]) == 0  # a folder: no panels by default
    assert not list(out.glob("*/panels.png")) and len(list(out.glob("*/results.h5"))) == 6
    assert json.loads((out / "im0" / "summary.json").read_text())["analysis"]["panels"] is False
    lst = tmp_path / "two.txt"
    lst.write_text(f"{images / 'im0.png'}\n{images / 'im2.png'}\n")
    out2 = tmp_path / "out2"
    assert main(["analyze", "--list", str(lst), *base[:2], "--out", str(out2), *base[4:], "--panels"]) == 0
    assert sorted(p.parent.name for p in out2.glob("*/panels.png")) == ["im0", "im2"]
    out3 = tmp_path / "out3"
    assert main(["analyze", str(images / "im0.png"), *base[:2], "--out", str(out3), *base[4:]]) == 0
    assert (out3 / "im0" / "panels.png").is_file()  # a single file keeps its panels
    capsys.readouterr()


def test_a_failed_write_is_reported_for_its_study_and_the_others_go_on(models_dir, images, tmp_path, monkeypatch,
                                                                       capsys):
    import cxrviewer.core.io.results as results_io

    real = results_io.write_results

    def flaky(results, path, **kw):
        if results.source_path.endswith("im2.png"):
            raise results_io.ResultsFileError("cannot write results: disk full", path=str(path))
        return real(results, path, **kw)

    monkeypatch.setattr(results_io, "write_results", flaky)
    out = tmp_path / "out"
    assert main(["analyze", str(images), *_args(models_dir, out, "--quiet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "im2" in err[0], err
    assert sorted(p.parent.name for p in out.glob("*/summary.json")) == ["im0", "im1", "im3", "im4", "im5"]
    assert not (out / "im2").exists() and not list((out / _archive.PARTIAL).glob("*"))


def test_background_writer_keeps_order_bounds_the_queue_and_stops_after_an_interrupt():
    import threading

    gate = threading.Event()
    ran: list[int] = []
    w = _archive.BackgroundWriter(ahead=1)

    def job(i, fail=None):
        def run():
            if i == 0:
                gate.wait(5)
            ran.append(i)
            if fail is not None:
                raise fail
        return run

    assert w.submit(0, job(0)) == []  # still running: nothing to report
    gate.set()
    done = w.submit(1, job(1, ValueError("bad")))  # two queued > ahead: waits for the first
    assert done[0] == (0, None)
    rest = done[1:] + w.drain()
    assert [t for t, _ in rest] == [1] and isinstance(rest[0][1], ValueError)
    w.submit(2, job(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        w.submit(3, job(3))
        w.drain()
    w.close()
    assert ran == [0, 1, 2]  # the job after the interrupt never started
    serial = _archive.BackgroundWriter(threaded=False)
    assert serial.submit("a", job(9)) == [("a", None)] and ran[-1] == 9


def test_a_worker_that_dies_costs_only_its_study(tmp_path):
    """A decoding worker killed mid-load breaks the whole process pool: the prefetcher restarts it,
    retries the study alone (one that dies twice is the only error), and loads the rest."""
    import _crashing_loaders  # beside this file, as _tiny_bundles: the spawned workers import it by name

    entries = ["ok:0", "ok:1", "crash:2", "ok:3", f"once:{tmp_path / 'marker'}", "ok:5", "ok:6"]
    pre = _archive.Prefetcher(entries, 2, loader=_crashing_loaders.load)
    try:
        outs = [pre.get(i) for i in range(len(entries))]
    finally:
        pre.close()
    assert [s for s, _ in outs] == ["ok", "ok", "error", "ok", "ok", "ok", "ok"]
    assert "crash:2" in outs[2][1] and "process died" in outs[2][1]
    assert [v for s, v in outs if s == "ok"] == [e for e in entries if not e.startswith("crash")]
    assert (tmp_path / "marker").exists() and pre.restarts >= 3  # crash:2 twice, once:... once
