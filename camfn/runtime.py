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

import threading

import torch
from torch import Tensor

__all__ = ["FORWARD_AD", "concrete", "eager", "in_transform"]

FORWARD_AD = threading.RLock()
"""Held around forward-mode AD (``torch.func.jvp``): its levels are process-wide, not per thread, so
concurrent ``jvp`` calls from several threads fail; methods declared ``forward_ad=True`` take turns."""


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``vjp``, ``jvp``)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def concrete(t: Tensor) -> bool:
    """True when ``t``'s values may be read (not a functorch wrapper, not inside ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def eager() -> bool:
    """True outside every transform and outside ``torch.compile``: impure fast paths may run."""
    return not torch.compiler.is_compiling() and not in_transform()
