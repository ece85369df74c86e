"""Model-family adapters: the defaults a library's models imply (layer, layout, output, target).

When a call leaves ``layer``, ``layout``, ``output`` or ``target`` unset, the driver asks
:func:`defaults`. An adapter is a function ``adapter(model, params, trace, x) -> Defaults | None``
registered for the top-level package that defines the model's class; built-in adapters (Hugging Face
``transformers``; torchvision and timm vision transformers) are imported only when a model of that package
is explained, so importing camfn never imports them. Fields an adapter leaves ``None`` keep camfn's generic behaviour.
An adapter registered with ``structural=True`` reads only the model's structure and the input's shape (never
``params`` or values): its answer is kept with the trace, per item shape, and it runs once per trace, not per call.

Example:
    >>> import torch, camfn
    >>> from camfn.adapters import defaults
    >>> net = torch.nn.Conv2d(3, 4, 3)
    >>> defaults(net, camfn.params(net), None, torch.zeros(1, 3, 8, 8))
    Defaults(layer=None, layout=None, output=None, target=None, classes=None)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["ADAPTERS", "Defaults", "defaults", "register"]


@dataclass(frozen=True)
class Defaults:
    """What an adapter infers; ``None`` fields are left to camfn's generic rules."""

    layer: str | None = None
    layout: Any = None  # a camfn.layout spec for ``layer`` (and for token layers the user names)
    output: Any = None  # the ``output=`` selector (``"logits"``, ``"pooler_output"``, ...)
    target: Any = None  # the default target (embedding models, detectors)
    classes: Any = None  # class c -> the target scoring it, where the output is not (B, C) logits (detectors)


Adapter = Callable[[nn.Module, dict[str, Tensor], Any, Tensor], Defaults | None]

ADAPTERS: dict[str, Adapter] = {}
"""Registered adapters by the top-level package of the model classes they handle."""
_STRUCTURAL: set[str] = set()  # packages whose adapter depends on structure and input shape only

_BUILTIN = {  # package -> adapter module, imported on first use
    "transformers": ".transformers",
    "torchvision": ".vision",
    "timm": ".vision",
}


def register(package: str, adapter: Adapter, *, structural: bool = False) -> None:
    """Use ``adapter`` for models whose class (or a base class) is defined in ``package``; ``structural=True``:
    it reads only the model's structure and ``x``'s shape, so its answer is kept with the trace."""
    ADAPTERS[package] = adapter
    (_STRUCTURAL.add if structural else _STRUCTURAL.discard)(package)


def _adapter(model: Any) -> str | None:
    """The package whose adapter handles ``model``, if any."""
    if not isinstance(model, nn.Module):
        return None
    for cls in type(model).__mro__:
        package = cls.__module__.split(".")[0]
        if package not in ADAPTERS and package in _BUILTIN:
            importlib.import_module(_BUILTIN[package], __name__)  # registers itself
        if package in ADAPTERS:
            return package
    return None


def defaults(model: Any, params: dict[str, Tensor], trace: Any, x: Tensor) -> Defaults:
    """The defaults the model's library implies (all ``None`` for models no adapter knows)."""
    package = _adapter(model)
    if package is None:
        return Defaults()
    adapter = ADAPTERS[package]
    if package not in _STRUCTURAL or trace is None:
        return adapter(model, params, trace, x) or Defaults()
    key = (package, tuple(x.shape[1:]))
    found = trace.cache.defaults.get(key)
    if found is None:
        found = trace.cache.defaults[key] = adapter(model, params, trace, x) or Defaults()
    return found
