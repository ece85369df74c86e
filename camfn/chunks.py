"""Chunks by budget: how many perturbed copies one forward sees, and evaluating work chunk by chunk.

Perturbation methods and metrics run the network on many perturbed copies of the input. Too few copies
per forward wastes the batch dimension; too many exhaust memory and caches. The default
``chunk_size="auto"`` sizes a chunk by the work it holds: ``BUDGET`` elements of perturbed input (about
8 copies of a 3 x 224 x 224 image, 32 at 112 px, 98 at 64 px).

Example:
    >>> import torch
    >>> from camfn.chunks import copies_per_forward
    >>> [copies_per_forward("auto", (3, size, size)) for size in (224, 112, 64)], copies_per_forward(4, (3, 8, 8))
    ([8, 32, 98], 4)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import OptionError

__all__ = ["BUDGET", "Chunk", "check_chunk", "chunked", "copies_per_forward"]

BUDGET = 8 * 3 * 224 * 224
"""Elements of perturbed input per forward that ``chunk_size="auto"`` aims at."""
MAX_COPIES = 256

Chunk = int | Literal["auto"] | None


def check_chunk(value: Any, name: str = "chunk_size") -> Chunk:
    """``"auto"``, ``None`` (everything in one forward) or a positive int; anything else is refused."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(
            f"{name}={value!r}: use 'auto' (default: sized by a work budget), a positive int (perturbed copies "
            "per forward) or None (all at once)"
        )
    return value


def copies_per_forward(chunk_size: Chunk, item_shape: Sequence[int]) -> int | None:
    """Copies per forward for ``chunk_size``; ``"auto"``: ``BUDGET`` elements of items shaped ``item_shape``."""
    if chunk_size == "auto":
        return max(1, min(MAX_COPIES, BUDGET // max(1, math.prod(item_shape))))
    return chunk_size


def chunked(
    fn: Callable[[Tensor], Any],
    n: int,
    size: int | None,
    *,
    device: torch.device | str = "cpu",
    combine: Literal["cat", "sum"] = "cat",
    progress: bool = False,
    desc: str = "",
) -> Any:
    """``fn`` over ``arange(n)`` in chunks of at most ``size`` indices (the fewest such chunks, of even
    sizes), concatenated on axis 0 (or summed).

    ``size=None`` evaluates everything at once. ``progress=True`` shows a tqdm bar (optional dependency
    ``pip install camfn[progress]``).
    """
    size = n if size is None else max(1, size)
    size = -(-n // -(-n // size)) if n else size  # as many chunks, of even sizes (98 + 98 + 22 -> 73 x 3)
    starts: Any = range(0, n, size)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            warnings.warn("progress=True needs tqdm (pip install tqdm); running without a bar", stacklevel=3)
        else:
            starts = tqdm(starts, desc=desc, unit="chunk", total=-(-n // size))
    total: Any = None
    parts = []
    for start in starts:
        out = fn(torch.arange(start, min(start + size, n), device=device))
        if combine == "sum":  # tensors or tuples of tensors
            total = out if total is None else torch.utils._pytree.tree_map(torch.add, total, out)
        else:
            parts.append(out)
    return total if combine == "sum" else torch.cat(parts)
