"""Exceptions raised by camfn. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CamfnError",
    "DamagedFileError",
    "HookError",
    "InputError",
    "LayerError",
    "ModeError",
    "OptionError",
    "TargetError",
    "TraceError",
    "UnsafeFileError",
    "nearest",
]


class CamfnError(Exception):
    """Base class of every error camfn raises on purpose."""


class InputError(CamfnError, ValueError, TypeError):
    """An argument cannot be explained as given: ``x`` (dtype, shape, values), ``params``, the model."""


class UnsafeFileError(InputError):
    """A file camfn was asked to load could run code (a pickle of Python objects, code in a program)."""


class DamagedFileError(InputError):
    """A file camfn wrote earlier (or was given) is truncated, damaged or of another kind."""


class TargetError(CamfnError, ValueError):
    """The target does not fit the model's output or the batch."""


class LayerError(CamfnError, KeyError):
    """The requested layer is not a node or module path of the traced model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModeError(CamfnError, RuntimeError):
    """The model is in a mode that makes maps depend on the rest of the batch."""


class HookError(CamfnError, RuntimeError):
    """The model carries hooks camfn will not run or drop without being told."""


class TraceError(CamfnError, RuntimeError):
    """torch.fx could not trace the model."""


class OptionError(CamfnError, ValueError, TypeError):
    """An unknown keyword option or an option value of the wrong kind."""


def nearest(name: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` names most similar to ``name`` (for "did you mean" messages)."""
    names = list(dict.fromkeys(names))
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    if len(close) < n:  # also offer names that share the leading path
        head = name.split(".")[0]
        close += [c for c in names if c.startswith(head) and c not in close][: n - len(close)]
    return close
