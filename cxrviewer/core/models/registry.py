"""Registry of every network cxrviewer builds, by name (timm's ``register_model`` idea).

A family module decorates a factory ``(**kwargs) -> nn.Module`` with
:func:`register_model`; :func:`create_model` builds it, merges the spec's default
kwargs with the caller's, and stamps ``arch`` (registry name), ``arch_kwargs``
(the full, JSON-serialisable kwargs, enough to rebuild the module) and ``family``
on the module, so a bundle can save ``(arch, arch_kwargs, state_dict)``.

Names are one per architecture (``cam_classifier``, ``msa``, ``dm``, ...) with a
``backbone=`` kwarg. For convenience :func:`create_model` and :func:`get_spec`
also accept the aliases ``"<backbone>"`` (the baseline CAM classifier on that
backbone, e.g. ``"resnet50"``) and ``"<backbone>_<name>"`` (e.g.
``"resnet50_msa"``, ``"densenet121_lung_heart"``, ``"tiny_cia"``); an alias
resolves to the registered name plus ``backbone=...``, and the module's ``arch``
is the registered name, never the alias.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from cxrviewer.core.errors import ModelError
from cxrviewer.core.families import FAMILIES

log = logging.getLogger(__name__)

InputsFn = Callable[[int, int, int], tuple]


def image_inputs(batch: int, size: int, in_channels: int) -> tuple[torch.Tensor]:
    """One image batch ``[B, C, size, size]`` in [-1, 1] (the default normalisation)."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch, in_channels, size, size, generator=g) * 2 - 1,)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    family: str
    description: str
    factory: Callable[..., nn.Module]
    default_kwargs: dict[str, Any] = field(default_factory=dict)
    #: kwargs that make a small, fast instance (tests, demos); merged over the defaults.
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: InputsFn = image_inputs

    def example_inputs(self, batch: int = 2, size: int = 256, in_channels: int = 1) -> tuple:
        """Valid positional forward inputs for a module built from this spec."""
        return self.inputs(batch, size, in_channels)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    description: str = "",
    default_kwargs: dict[str, Any] | None = None,
    test_kwargs: dict[str, Any] | None = None,
    inputs: InputsFn | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory under ``name`` (names are unique)."""
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name,
            family=family,
            description=description or (factory.__doc__ or "").strip().split("\n")[0],
            factory=factory,
            default_kwargs=dict(default_kwargs or {}),
            test_kwargs=dict(test_kwargs or {}),
            inputs=inputs or image_inputs,
        )
        return factory

    return deco


def _resolve(name: str) -> tuple[ModelSpec, dict[str, Any]]:
    """Registered spec and alias-implied kwargs for ``name``."""
    if name in _REGISTRY:
        return _REGISTRY[name], {}
    from cxrviewer.core.models.backbones import BACKBONES

    if name in BACKBONES and "cam_classifier" in _REGISTRY:
        return _REGISTRY["cam_classifier"], {"backbone": name}
    for bb in sorted(BACKBONES, key=len, reverse=True):
        prefix = bb + "_"
        if name.startswith(prefix):
            rest = name[len(prefix):]
            spec = _REGISTRY.get(rest)
            if spec is not None and "backbone" in spec.default_kwargs:
                return spec, {"backbone": bb}
    known = ", ".join(sorted(_REGISTRY))
    raise ModelError(
        f"unknown model architecture {name!r}; registered: {known} "
        f"(aliases '<backbone>' and '<backbone>_<name>' are accepted, backbones: "
        f"{', '.join(sorted(BACKBONES))})"
    )


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name`` (aliases resolve to their registered spec)."""
    return _resolve(name)[0]


def list_models(family: str | None = None) -> list[ModelSpec]:
    """All registered specs, sorted by name, optionally of one family."""
    if family is not None and family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return [s for _, s in sorted(_REGISTRY.items()) if family is None or s.family == family]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network ``name`` with ``kwargs`` over the spec's defaults.

    Raises :class:`ModelError` for an unknown name, unknown or invalid kwargs, or
    kwargs that cannot be stored as JSON in a bundle manifest.
    """
    spec, implied = _resolve(name)
    merged = {**spec.default_kwargs, **implied, **kwargs}
    try:
        json.dumps(merged)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{spec.name}: model kwargs must be JSON-serialisable ({err})") from err
    try:
        module = spec.factory(**merged)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"cannot build model {spec.name!r} with {merged}: {err}") from err
    module.arch = spec.name
    module.arch_kwargs = json.loads(json.dumps(merged))
    module.family = spec.family
    log.debug("built %s(%s)", spec.name, merged)
    return module
