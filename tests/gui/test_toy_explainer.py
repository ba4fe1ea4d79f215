"""The explainer contract: a method registered from this module alone (input x gradient) is computed
by the pipeline, written to and read back from results.h5, drawn in panels.png, listed and
filled as a panel in the viewer's grid, and scored by the evaluation. No other file knows it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from _tiny_bundles import make_tiny_bundles, synthetic_study  # noqa: E402

from cxrviewer.core.bundle import load_bundle  # noqa: E402
from cxrviewer.core.explain.boxes import BoxRule  # noqa: E402
from cxrviewer.core.explain.registry import (Explainer, ExplainerOutput, MapSpec, PanelSpec,  # noqa: E402
                                             register_explainer, unregister_explainer)
from cxrviewer.core.io.results import read_results, write_results  # noqa: E402
from cxrviewer.core.pipeline import Pipeline  # noqa: E402

NAME = "input_x_gradient"


class InputXGradient(Explainer):
    """|x * d y_c / d x| of every class on the classifier's own input (Shrikumar et al.)."""

    title = "Input x gradient"
    short = "ixg"
    order = 45
    requires = ("classifier",)
    maps = (MapSpec("saliency", "input x gradient", "score"),)
    panels = (PanelSpec("ixg", "Input x gradient", "saliency", quantity="saliency", order=95),)
    box_rule = BoxRule("threshold", max_boxes=1)
    box_map = "saliency"

    def compute(self, ctx):  # noqa: ANN001, ANN201 - the contract's signature
        b = ctx.bundles["classifier"]
        pre = ctx.preprocess("classifier")
        x01, box = pre.crop_resize(ctx.work)
        x = pre.normalise(x01).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = b.model(x)["logits"][0]
            maps = []
            for c in range(logits.shape[0]):
                (g,) = torch.autograd.grad(logits[c], x, retain_graph=c < logits.shape[0] - 1)
                maps.append((x * g)[0, 0].abs().detach())
        return ExplainerOutput({"saliency": ctx.mapper(box)(torch.stack(maps))}, {"units": "|x dy/dx|"})


@pytest.fixture(scope="module")
def toy():
    register_explainer(NAME)(InputXGradient)
    yield InputXGradient
    unregister_explainer(NAME)


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    paths = make_tiny_bundles(tmp_path_factory.mktemp("b"), ("alignment", "classifier"), input_size=64)
    pl = Pipeline({r: load_bundle(p) for r, p in paths.items()}, "cpu", map_max_side=64)
    return pl, pl.run(synthetic_study())


def test_pipeline_computes_the_registered_method(run):
    pl, res = run
    assert NAME in pl.stages and pl.stages.index(NAME) > pl.stages.index("cam")
    sal = res.get(NAME, "saliency")
    assert sal.shape == (len(res.classes), *res.map_shape) and np.isfinite(sal).all() and sal.max() > 0
    assert NAME in res.timings
    assert res.boxes[NAME] and len(res.boxes_for(res.classes[0], NAME)) == 1


def test_results_file_round_trip(run, tmp_path):
    _, res = run
    back = read_results(write_results(res, tmp_path / "r.h5"))
    sal, got = res.get(NAME, "saliency"), back.get(NAME, "saliency")  # format 3: within 1e-3 of the range
    assert got.shape == sal.shape and np.abs(got - sal).max() <= 1e-3 * float(sal.max() - sal.min())
    assert back.attr(NAME, "units") == "|x dy/dx|" and back.boxes[NAME] == res.boxes[NAME]


def test_panels_png_has_its_tile(run):
    from cxrviewer.core.render import panel_tiles

    _, res = run
    captions = [cap[0] for _rgb, cap in panel_tiles(synthetic_study(), res)]
    assert any(c.startswith("Input x gradient") for c in captions)


def test_viewer_lists_and_fills_its_panel(run, qtbot):
    from cxrviewer.core.display import build_display
    from cxrviewer.gui.state import ViewerState
    from cxrviewer.gui.views.panel_grid import PanelGrid

    _, res = run
    state = ViewerState()
    grid = PanelGrid(state)
    qtbot.addWidget(grid)
    assert "ixg" in grid.panels
    grid.set_available(res.models)
    assert "ixg" in grid.shown_order()
    state.set_study(synthetic_study())
    grid.set_results(res, display=build_display(res))
    grid.flush()
    panel = grid.panels["ixg"]
    assert panel.filled and res.classes[grid.class_index] in panel.content.caption
    assert np.shares_memory(panel.map.data, res.get(NAME, "saliency"))


def test_evaluation_scores_it_beside_the_others(toy, tmp_path):
    from cxrviewer.core.io import read_nih_folder
    from training.evaluate import evaluate_pipeline, markdown_tables
    from training.phantoms import write_phantom_dataset

    folder = write_phantom_dataset(tmp_path / "ph", 6, size=96, seed=0)
    paths = make_tiny_bundles(tmp_path / "b", ("classifier",), input_size=64)
    pl = Pipeline({"classifier": load_bundle(paths["classifier"])}, "cpu", map_max_side=64)
    refs = list(read_nih_folder(folder))
    result = evaluate_pipeline(pl, refs)
    assert NAME in result["methods"] and "cam" in result["methods"]
    assert result["n_boxed_images"] > 0
    row = result["methods"][NAME]["iou"]["0.1"]
    assert all(0.0 <= (v["acc"] or 0.0) <= 1.0 for v in row.values())
    assert "Input x gradient" in markdown_tables(result)
