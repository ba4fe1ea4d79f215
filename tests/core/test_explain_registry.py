"""The explainer registry (the GUI's method list is generated from it)."""
from __future__ import annotations

import pytest

from cxrviewer.core.errors import CxrError, ExplainError
from cxrviewer.core.explain import Explainer, get_explainer, list_explainers

EXPECTED = {"cam", "attention_mining", "contrast", "disease_mask", "gradcam"}


def test_all_methods_registered() -> None:
    assert EXPECTED <= set(list_explainers())
    assert "contrast" in list_explainers("cia") and "cam" not in list_explainers("cia")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_explainer_has_metadata(name: str) -> None:
    ex = get_explainer(name)
    assert isinstance(ex, Explainer)
    assert ex.name == name and ex.title and ex.families
    assert ex.applies_to(family=ex.families[0])
    assert not ex.applies_to(family="segmentation")


def test_unknown_method_is_a_typed_error() -> None:
    with pytest.raises(ExplainError, match="unknown explanation method") as info:
        get_explainer("nope")
    assert isinstance(info.value, CxrError)


def test_missing_output_key_is_a_typed_error() -> None:
    with pytest.raises(ExplainError, match="attention"):
        get_explainer("contrast").explain({"logits": None}, 0)
