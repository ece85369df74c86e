"""Where a call runs: inside a ``torch.func`` transform, inside ``torch.compile``, or eagerly.

The one home of camfn's ``torch._C._functorch`` probes. Value-dependent checks (``.item()``, a Python
``if`` on a tensor) and impure fast paths only run where values are concrete.

Example:
    >>> import torch
    >>> from camfn.runtime import concrete, in_transform
    >>> in_transform(), concrete(torch.zeros(1))
    (False, True)
    >>> torch.func.vmap(lambda t: torch.tensor(concrete(t)))(torch.zeros(2)).tolist()
    [False, False]
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["FORWARD_AD", "concrete", "eager", "exporting", "in_transform", "peek", "tracing_for_export"]

_EXPORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("camfn_exporting", default=False)


@contextlib.contextmanager
def tracing_for_export() -> Iterator[None]:
    """Within: a method is being traced into a program (:func:`camfn.export`). Values are never concrete
    (value checks are skipped: they ran eagerly on the example first), impure fast paths are off, and
    noise is replayed from :func:`camfn.noise.pinned` as inside ``torch.compile``."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def exporting() -> bool:
    """True inside :func:`tracing_for_export`."""
    return _EXPORTING.get()


FORWARD_AD = threading.RLock()
"""Held around forward-mode AD (``torch.func.jvp``): its levels are process-wide, not per thread, so
concurrent ``jvp`` calls from several threads fail; methods declared ``forward_ad=True`` take turns."""


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``vjp``, ``jvp``) or an export trace."""
    return torch._C._functorch.peek_interpreter_stack() is not None or exporting()


def concrete(t: Tensor) -> bool:
    """True when ``t``'s values may be read (not a functorch wrapper, not inside ``torch.compile`` or an
    export trace)."""
    if torch.compiler.is_compiling() or exporting():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def eager() -> bool:
    """True outside every transform and outside ``torch.compile``: impure fast paths may run."""
    return not torch.compiler.is_compiling() and not in_transform()


def peek(t: Tensor) -> Tensor | None:
    """``t``'s values as a plain tensor for a read-only check, also inside ``torch.func`` transforms (a
    ``vmap``-ped tensor gives all its members); ``None`` inside ``torch.compile`` and export traces."""
    if torch.compiler.is_compiling() or exporting():
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t
