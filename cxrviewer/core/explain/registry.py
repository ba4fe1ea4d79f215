"""Registry of explanation methods (the GUI's method list and the tests are generated from it).

Pattern: one small base class (:class:`Explainer`, cf. pytorch-grad-cam's ``BaseCAM``) and
one subclass per method, each registered with :func:`register_explainer`. The method
modules are imported explicitly by ``cxrviewer.core.explain.__init__`` (explicit imports
survive PyInstaller; package scanning does not).

An explainer receives the model's forward-output dict (see MODEL_CONTRACT.md), a class
index and, where it needs them, the model and its input; it returns named numpy maps,
each ``[B, h, w]`` float32 with raw values (normalisation is a display choice).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError

log = logging.getLogger(__name__)

__all__ = ["ExplainError", "Explainer", "get_explainer", "list_explainers", "register_explainer"]


class Explainer:
    """Base class: subclasses set ``name``, ``title``, ``families`` and implement :meth:`explain`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: model families (see ``cxrviewer.core.models``) the method applies to
    families: ClassVar[tuple[str, ...]] = ()
    #: True when :meth:`explain` needs ``model`` and ``inputs`` (e.g. Grad-CAM re-runs the model)
    needs_model: ClassVar[bool] = False

    def applies_to(self, model: torch.nn.Module | None = None, family: str | None = None) -> bool:
        """Whether this method can explain ``model`` (or a model of ``family``)."""
        fam = family if family is not None else getattr(model, "family", None)
        return fam in self.families

    def explain(
        self,
        output: Mapping[str, torch.Tensor],
        class_index: int,
        *,
        model: torch.nn.Module | None = None,
        inputs: Any = None,
        **context: Any,
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, output: Mapping[str, torch.Tensor], class_index: int, **kw: Any) -> dict[str, np.ndarray]:
        return self.explain(output, class_index, **kw)

    # helpers for subclasses ------------------------------------------------
    def _require(self, output: Mapping[str, Any], key: str) -> Any:
        if key not in output:
            raise ExplainError(
                f"explanation method '{self.name}' needs the model output '{key}', "
                f"but the model returned only {sorted(output)}"
            )
        return output[key]


_REGISTRY: dict[str, type[Explainer]] = {}
E = TypeVar("E", bound=type[Explainer])


def register_explainer(name: str) -> Callable[[E], E]:
    """Class decorator: register an :class:`Explainer` subclass under ``name``."""

    def deco(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"explainer '{name}' is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_explainers(family: str | None = None) -> list[str]:
    """Registered method names (sorted), optionally only those applying to ``family``."""
    return sorted(n for n, c in _REGISTRY.items() if family is None or family in c.families)


def get_explainer(name: str) -> Explainer:
    """A fresh instance of the explainer registered as ``name`` (unknown -> :class:`ExplainError`)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ExplainError(
            f"unknown explanation method '{name}'; known: {', '.join(list_explainers())}"
        ) from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach, move to CPU and convert to float32 numpy."""
    return t.detach().to("cpu", torch.float32).numpy()
