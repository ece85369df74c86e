"""The one options validator: the options every method shares and the validators of each method's extras.

Each validator takes the option's value and returns it (possibly normalised, never silently coerced) or
raises :class:`~camfn.errors.OptionError` naming the option, the value and what to pass instead.

Example:
    >>> from camfn.options import validate
    >>> validate({"relu": False}, {})["relu"]
    False
    >>> validate({"normalize": "no"}, {})
    Traceback (most recent call last):
    ...
    camfn.errors.OptionError: normalize='no': use True or False
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .chunks import check_chunk
from .errors import OptionError, nearest

__all__ = [
    "SHARED",
    "Option",
    "boolean",
    "choice",
    "finite",
    "nonnegative",
    "positive_int",
    "seed",
    "validate",
]

Validator = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Option:
    """An option: its default and its validator ``(value, name) -> value``."""

    default: Any
    check: Validator


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name}={value!r}: use True or False")
    return value


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name}={value!r}: use a positive int")
    return value


def finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(f"{name}={value!r}: use a finite number")
    return float(value)


def nonnegative(value: Any, name: str) -> float:
    value = finite(value, name)
    if value < 0:
        raise OptionError(f"{name}={value!r}: use a finite number >= 0")
    return value


def seed(value: Any, name: str) -> int | torch.Generator:
    if isinstance(value, torch.Generator):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64:
        raise OptionError(f"{name}={value!r}: use an int in [-2**63, 2**64) or a torch.Generator")
    return value


def choice(*values: Any) -> Validator:
    def check(value: Any, name: str) -> Any:
        if not any(value == v and type(value) is type(v) for v in values):
            raise OptionError(f"{name}={value!r}: use one of {', '.join(map(repr, values))}")
        return value

    return check


def _size(value: Any, name: str) -> Any:
    if value is None or value == "input":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        isinstance(value, tuple | list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        return tuple(value)
    raise OptionError(
        f"{name}={value!r}: use 'input' (default), None (layer resolution) or positive ints such as (224, 224)"
    )


def _dict_or_none(value: Any, name: str) -> Any:
    if value is not None and not isinstance(value, dict):
        raise OptionError(f"{name}={value!r}: use a dict or None")
    return value


def _output(value: Any, name: str) -> Any:
    if (
        value is None
        or isinstance(value, str)
        or callable(value)
        or (isinstance(value, int) and not isinstance(value, bool))
    ):
        return value
    raise OptionError(f"{name}={value!r}: use None, a dict key or attribute name, a tuple index or a callable")


def _any(value: Any, name: str) -> Any:
    return value


SHARED: dict[str, Option] = {
    "relu": Option(True, boolean),
    "size": Option("input", _size),
    "normalize": Option(True, boolean),
    "hooks": Option("error", choice("error", "ignore", "keep")),
    "tracer": Option("auto", choice("auto", "fx", "export")),
    "tracer_options": Option(None, _dict_or_none),
    "model_kwargs": Option(None, _dict_or_none),
    "eigen_smooth": Option(False, boolean),
    "aug_smooth": Option(False, boolean),
    "layout": Option(None, _any),  # validated against the layer's shape by camfn.layout
    "output": Option(None, _output),
    "progress": Option(False, boolean),
    "nonfinite": Option("raise", choice("raise", "nan")),
}
"""Options every method takes, with their defaults."""


def validate(options: Mapping[str, Any], extras: Mapping[str, Option]) -> dict[str, Any]:
    """``options`` checked against :data:`SHARED` and a method's ``extras``, with every default filled in."""
    known = {**SHARED, **extras}
    out = {}
    for key, value in options.items():
        spec = known.get(key)
        if spec is None:
            hint = nearest(key, known, n=3)
            raise OptionError(
                f"unknown option {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Use one of: {list(known)}"
            )
        out[key] = spec.check(value, key)
    for key, spec in known.items():
        if key not in out:
            out[key] = spec.default
    return out


def chunk(value: Any, name: str) -> Any:
    """Validator of ``chunk_size``: ``"auto"``, ``None`` or a positive int."""
    return check_chunk(value, name)
