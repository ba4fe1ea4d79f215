"""GUI tests are hermetic: the window's default model folder is an empty temporary one
(explanation tests pass their own tiny bundles with ``MainWindow(models_dir=...)``)."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_bundled_models(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRVIEWER_MODELS", str(tmp_path_factory.mktemp("no-models")))
