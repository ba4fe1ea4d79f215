"""The explainability window: progressive inference, linked panels, caches, exports.

Offscreen Qt, tiny random-weight bundles (tests/core/_tiny_bundles.py), CPU.
No sleeps: qtbot.waitSignal / waitUntil on the worker's signals.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from _tiny_bundles import make_tiny_bundles  # noqa: E402

from cxrviewer.gui.main_window import MainWindow  # noqa: E402
from cxrviewer.gui.views.explain_panels import panel_keys  # noqa: E402

PANEL_SPECS = panel_keys()

WAIT_MS = 60_000
HEAT_KEYS = ("original", "am_final", "gradcam")  # per-class maps (CAM, H_f, Grad-CAM)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-models")
    make_tiny_bundles(d, input_size=128)
    return d


def _chest_png(path: Path, seed: int, shape=(300, 260)) -> Path:
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full(shape, 0.75, np.float32)
    for cx in (0.32, 0.68):
        img[((xx - w * cx) / (w * 0.15)) ** 2 + ((yy - h * 0.45) / (h * 0.3)) ** 2 < 1] = 0.3 + 0.05 * seed
    img = np.clip(img + rng.normal(0, 0.03, shape), 0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def studies(tmp_path) -> list[Path]:
    d = tmp_path / "studies"
    d.mkdir()
    return [_chest_png(d / f"chest{i}.png", i) for i in range(3)]


@pytest.fixture
def make_win(qtbot, tmp_path, monkeypatch, tiny_models):
    monkeypatch.setenv("CXRVIEWER_CONFIG_DIR", str(tmp_path / "config"))
    made = []

    def make(models_dir=tiny_models, cache=tmp_path / "cache") -> MainWindow:
        w = MainWindow(models_dir=str(models_dir), device="cpu", cache_folder=str(cache))
        qtbot.addWidget(w)
        w.resize(1400, 900)
        w.show()
        qtbot.waitExposed(w)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def same(a, b) -> bool:
    """``a`` shows exactly ``b`` (the same memory; views of one array are new objects)."""
    return a is not None and a.shape == b.shape and np.shares_memory(a, b) and np.array_equal(a, b)


def fillable(win: MainWindow, res) -> dict:
    """The panels the results can fill (the anatomy panel is empty when the tiny U-Net finds no lungs)."""
    return {k: p for k, p in win.grid.panels.items()
            if not (k == "anatomy" and res.get("anatomy", "posterior") is None)}


def open_and_analyse(qtbot, win: MainWindow, paths) -> tuple:
    with qtbot.waitSignal(win.inference.finished, timeout=WAIT_MS) as blocker:
        win.open_paths([str(p) for p in paths])
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)  # panels draw one per event-loop turn
    return tuple(blocker.args)


def test_open_study_fills_every_panel_progressively(qtbot, make_win, studies):
    win = make_win()
    assert win.grid.layout_name == "grid"  # models present -> all panels
    filled_per_stage: list[int] = []
    win.inference.stageReady.connect(lambda u: filled_per_stage.append(len(win.grid.filled_keys())))
    sha, res, source = open_and_analyse(qtbot, win, studies[:1])
    assert source == "run" and sha == win.state.study.pixel_sha256()
    assert len(filled_per_stage) >= 6  # one update per stage
    assert filled_per_stage[0] < len(PANEL_SPECS) and filled_per_stage == sorted(filled_per_stage)
    for key, panel in win.grid.panels.items():
        assert panel.has_image(), key
        assert panel.filled == (key in fillable(win, res)), (key, panel.content.caption)
    if "anatomy" not in fillable(win, res):
        assert "nothing to show for this study" in win.grid.panels["anatomy"].content.caption
    c = win.grid.class_index
    assert c == res.top_classes(1)[0]  # the top finding is shown first
    assert same(win.grid.panels["original"].map.data, res.get("cam", "cam")[c])
    assert win.grid.panels["am2"].overlay.data is not None  # erased region outlined at t=2
    assert win.findings.rowCount() == len(res.classes)
    assert win.findings.item(0, 0).text() == res.classes[c]
    assert win.study_list.findings(0).startswith(res.classes[c])
    assert not win.progress.isVisible() and "(computed)" in win.stage_label.text()
    assert "untrained" in win.models_label.text()  # random weights are labelled plainly
    assert "Device: cpu" in win.device_label.text()


def test_changing_the_class_updates_every_panel(qtbot, make_win, studies):
    win = make_win()
    _sha, res, _src = open_and_analyse(qtbot, win, studies[:1])
    c2 = int(np.argsort(res.probabilities)[0])  # least probable: its AM steps are mined on demand
    name = res.classes[c2]
    assert name not in res.get("attention_mining", "steps")
    with qtbot.waitSignal(win.inference.classMined, timeout=WAIT_MS):
        win.findings.selectRow([win.findings.class_at_row(r) for r in range(win.findings.rowCount())].index(c2))
    assert win.grid.class_index == c2
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    assert same(win.grid.panels["original"].map.data, res.get("cam", "cam")[c2])
    assert same(win.grid.panels["am_final"].map.data, res.get("attention_mining", "final")[c2])
    assert same(win.grid.panels["gradcam"].map.data, res.get("gradcam", "gradcam")[c2])
    assert same(win.grid.panels["disease_mask"].map.data, res.get("disease_mask", "psi")[c2])
    for t in (1, 2, 3):
        assert same(win.grid.panels[f"am{t}"].map.data, res.get("attention_mining", "steps")[name][t - 1])
    for key in (*HEAT_KEYS, "am1", "disease_mask"):
        assert name in win.grid.panels[key].content.caption, key


def test_linked_zoom_and_window_move_all_panels(qtbot, make_win, studies):
    win = make_win()
    open_and_analyse(qtbot, win, studies[:1])
    grid = win.grid
    before = {k: p.view.viewRect() for k, p in grid.panels.items()}
    grid.zoom(2.0)
    r0 = grid.original.view.viewRect()
    assert r0.width() < before["original"].width() * 0.6
    for key, p in grid.panels.items():
        if key == "normal":
            continue  # another image: never linked
        r = p.view.viewRect()
        assert r.center().x() == pytest.approx(r0.center().x(), abs=2), key
        assert r.center().y() == pytest.approx(r0.center().y(), abs=2), key
        assert p.zoom_level() == pytest.approx(grid.original.zoom_level(), rel=0.02), key
    # window/level drag in any linked panel re-levels every study panel
    levels0 = grid.panels["gradcam"].image_item.getLevels()
    grid.panels["gradcam"].windowDragged.emit(60.0, 0.0)
    assert grid.original.image_item.getLevels() == pytest.approx(grid.panels["gradcam"].image_item.getLevels())
    assert grid.panels["gradcam"].image_item.getLevels() != pytest.approx(levels0)
    # invert: study panels and the model-input images (aligned, paired normal) together
    win.act_invert.trigger()
    assert grid.original.inverted and grid.panels["aligned"].inverted and grid.panels["gradcam"].inverted
    win.act_invert.trigger()
    assert not grid.original.inverted and not grid.panels["aligned"].inverted
    # unlinked: zooming the original leaves the others alone
    win.act_link.trigger()
    assert not grid.linked
    other = grid.panels["gradcam"].view.viewRect()
    grid.zoom(2.0)
    assert grid.panels["gradcam"].view.viewRect() == other
    lv = grid.panels["gradcam"].image_item.getLevels()
    grid.panels["gradcam"].windowDragged.emit(-80.0, 0.0)
    assert grid.original.image_item.getLevels() != pytest.approx(grid.panels["gradcam"].image_item.getLevels())
    assert grid.panels["gradcam"].image_item.getLevels() != pytest.approx(lv)


def test_switching_study_mid_inference_leaves_no_stale_panel(qtbot, make_win, studies):
    win = make_win()
    shas = []
    with qtbot.waitSignal(win.inference.stageReady, timeout=WAIT_MS):
        win.open_paths([str(p) for p in studies])
    first_sha = win.state.study.pixel_sha256()
    with qtbot.waitSignal(win.inference.finished, timeout=WAIT_MS,
                          check_params_cb=lambda sha, r, s: sha != first_sha) as blocker:
        win.state.step(1)  # mid-inference
    shas.append(blocker.args[0])
    res = blocker.args[1]
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    current = win.state.study.pixel_sha256()
    assert shas[0] == current and res.pixel_sha256 == current
    assert win.grid.results is res
    qtbot.wait(300)  # anything still queued for the old study would arrive now
    assert win.grid.results.pixel_sha256 == current
    c = win.grid.class_index
    assert same(win.grid.panels["original"].map.data, res.get("cam", "cam")[c])
    assert all(p.filled for p in fillable(win, res).values())
    assert not [m for lvl, m in win.log_panel.messages if lvl == "error"]


def test_closing_mid_inference_exits_cleanly(qtbot, make_win, studies):
    win = make_win()
    with qtbot.waitSignal(win.inference.stageReady, timeout=WAIT_MS):
        win.open_paths([str(studies[0])])
    win.close()
    assert not win.model_runner.busy and not win.runner.busy
    assert win.model_runner.pool.activeThreadCount() == 0


def test_results_cached_in_memory_and_on_disk(qtbot, make_win, studies, tmp_path):
    win = make_win()
    sha0, res0, src0 = open_and_analyse(qtbot, win, studies[:2])
    assert src0 == "run"
    with qtbot.waitSignal(win.inference.finished, timeout=WAIT_MS):
        win.state.step(1)
    with qtbot.waitSignal(win.inference.finished, timeout=WAIT_MS) as back:
        win.state.step(-1)
    assert back.args[0] == sha0 and back.args[2] == "memory" and back.args[1] is res0
    qtbot.waitUntil(lambda: not win.grid.pending, timeout=WAIT_MS)
    assert all(p.filled for p in fillable(win, res0).values())
    assert list((tmp_path / "cache").glob(f"{sha0[:32]}-*.h5"))
    win2 = make_win()  # a new session: the HDF5 results cache answers
    _sha, res, src = open_and_analyse(qtbot, win2, studies[:1])
    assert src == "cache"
    cam0 = res0.get("cam", "cam")  # the cached file (format 3) holds maps within 1e-3 of their range
    np.testing.assert_allclose(res.get("cam", "cam"), cam0, rtol=0, atol=1e-3 * float(cam0.max() - cam0.min()))
    assert all(p.has_image() for p in win2.grid.panels.values())


def test_offline_results_file_opens_without_models(qtbot, make_win, studies, tiny_models, tmp_path):
    from cxrviewer.core.io import load_study
    from cxrviewer.core.io.results import write_results
    from cxrviewer.core.pipeline import Pipeline

    study = load_study(studies[0])
    res = Pipeline.from_dirs(tiny_models, "cpu", map_max_side=128).run(study)
    h5 = write_results(res, tmp_path / "out" / "chest0" / "results.h5")
    empty = tmp_path / "no-models"
    empty.mkdir()
    win = make_win(models_dir=empty, cache=tmp_path / "cache2")
    assert not win.inference.bundles
    sha, got, src = open_and_analyse(qtbot, win, [h5])
    assert src.startswith("file") and str(h5) in src
    assert sha == study.pixel_sha256()
    assert win.study_list.findings(0)  # top findings column filled from the file
    assert win.grid.panels["original"].filled and win.grid.panels["contrast"].filled
    np.testing.assert_allclose(got.probabilities, res.probabilities)
    # a `cxrviewer analyze --out` folder opens as a worklist of its studies
    from cxrviewer.core.result_cache import expand_paths

    wl = expand_paths([tmp_path / "out"])
    assert len(wl) == 1 and wl[0].path == studies[0] and wl[0].extra["results"] == str(h5)
    # results saved next to the study are found when the image itself is opened
    import shutil

    shutil.copy(h5, studies[0].with_name("chest0.results.h5"))
    win2 = make_win(models_dir=empty, cache=tmp_path / "cache3")
    _sha, _got, src2 = open_and_analyse(qtbot, win2, [studies[0]])
    assert src2.startswith("file") and "chest0.results.h5" in src2


def test_export_png_and_csv(qtbot, make_win, studies, tmp_path):
    win = make_win()
    _sha, res, _src = open_and_analyse(qtbot, win, studies[:1])
    png = win.export_panels(str(tmp_path / "panels.png"))
    img = Image.open(png)
    assert img.size[0] == win.grid.width() and img.size[1] > win.grid.height()
    caption_band = np.asarray(img.convert("L"))[: img.size[1] - win.grid.height()]
    assert caption_band.max() > 100  # text burned in
    out = win.export_findings(str(tmp_path / "findings.csv"))
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == len(res.classes)
    probs = [float(r["probability"]) for r in rows]
    assert probs == sorted(probs, reverse=True)
    assert rows[0]["class"] == res.classes[res.top_classes(1)[0]]
    assert "untrained" in rows[0]["models"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_layouts_and_worklist_filter_sort(qtbot, make_win, studies):
    win = make_win()
    open_and_analyse(qtbot, win, studies)
    grid = win.grid
    win.set_layout("1x1")
    assert [k for k, p in grid.panels.items() if p.isVisible()] == ["original"]
    win.set_layout("2x2")
    assert sum(p.isVisible() for p in grid.panels.values()) == 4
    win.set_layout("1xN")
    ys = {p.y() for p in grid.panels.values() if p.isVisible()}
    assert len(ys) == 1 and sum(p.isVisible() for p in grid.panels.values()) == len(PANEL_SPECS)
    sl = win.study_list
    sl.set_findings(1, [("Mass", 0.9)])
    sl.set_findings(2, [("Nodule", 0.1)])
    win.filter_box.setText("mass")
    assert sl.visible_rows() == [1]
    win.filter_box.setText("")
    sl.header().setSortIndicator(3, sl.header().sortIndicatorOrder().DescendingOrder)
    assert sl.visible_rows()[0] == 1  # highest top probability first
    sl.set_status(2, "ok")
    assert sl.status(2) == "ok"


def test_model_picker_folders_persist(qtbot, make_win, tiny_models, tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    win = make_win(models_dir=empty)
    assert win.grid.layout_name == "1x1"  # nothing to explain: one big panel
    win.add_model_folder(str(tiny_models))
    assert win.model_picker.folder == str(tiny_models)
    assert len(win.inference.bundles) == 5 and win.grid.layout_name == "grid"
    assert "5 untrained" in win.model_picker.summary.text()
    win2 = make_win(models_dir=empty)  # settings remember the folder and the choice
    assert win2.model_picker.folder == str(tiny_models)


def test_panels_the_models_cannot_fill_are_hidden(qtbot, make_win, studies, tiny_models, tmp_path):
    import shutil

    seg_only = tmp_path / "seg-only"
    seg_only.mkdir()
    shutil.copytree(tiny_models / "segmentation.cxrbundle", seg_only / "segmentation.cxrbundle")
    win = make_win(models_dir=seg_only)
    _sha, res, _src = open_and_analyse(qtbot, win, studies[:1])
    assert res.probabilities is None and res.get("segmentation", "masks") is not None
    shown = [k for k, p in win.grid.panels.items() if p.isVisible()]
    assert shown == ["original", "anatomy", "lung_heart"]  # anatomy needs only the lung/heart masks
    assert win.grid.panels["lung_heart"].filled and win.grid.panels["lung_heart"].overlay.data is not None
    assert "no classifier" in win.grid.original.content.caption
