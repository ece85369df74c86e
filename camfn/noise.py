"""Explicit randomness: every random draw in camfn comes from a seed or a ``torch.Generator``.

Noise never depends on the data, so it is drawn outside any ``torch.func`` transform: under ``vmap`` every
vmapped call sees the same noise (no ``randomness=`` argument needed) and, with an int seed, the same
seed gives the same map. Noise is shared by the samples of a batch, so a sample's map does not depend on
the rest of the batch.

Example:
    >>> from camfn.noise import gaussian
    >>> bool((gaussian((2, 3), std=1.0, seed=7) == gaussian((2, 3), std=1.0, seed=7)).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Seed", "gaussian", "generator"]

Seed = int | torch.Generator


def generator(seed: Seed) -> torch.Generator:
    """A CPU generator for ``seed`` (an int), or ``seed`` itself when it is a generator."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def gaussian(
    shape: Sequence[int],
    std: float,
    seed: Seed,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``N(0, std^2)`` noise of ``shape``, drawn on the CPU from ``seed`` and moved to ``device``.

    Drawn on the CPU so that the numbers do not depend on the device.
    """
    with torch._C._DisableFuncTorch():
        draw = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float32)
    return (draw * std).to(dtype=dtype, device=device)
