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

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

from .errors import OptionError
from .runtime import exporting

__all__ = ["Seed", "gaussian", "gaussians", "generator", "pinned", "uniform"]

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

    Drawn on the CPU so that the numbers do not depend on the device. Inside ``torch.compile`` the draw
    made eagerly under :func:`pinned` is replayed (see there).
    """
    return next(gaussians(shape, std, seed, 1, dtype=dtype, device=device))


def gaussians(
    shape: Sequence[int],
    std: float,
    seed: Seed,
    n: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """``n`` successive ``N(0, std^2)`` draws of ``shape`` from one generator for ``seed``, one at a time.

    Example:
        >>> from camfn.noise import gaussian, gaussians
        >>> first, second = gaussians((3,), 1.0, seed=5, n=2)
        >>> bool((first == gaussian((3,), 1.0, seed=5)).all()), bool((first == second).all())
        (True, False)
    """
    if torch.compiler.is_compiling() or exporting():
        for i in range(n):
            yield _replay((tuple(shape), std, seed, i, dtype, str(device)))
        return
    g = generator(seed)
    for i in range(n):
        with torch._C._DisableFuncTorch():
            draw = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        out = (draw * std).to(dtype=dtype, device=device)
        if _PINNED is not None and not isinstance(seed, torch.Generator):
            _PINNED[(tuple(shape), std, seed, i, dtype, str(device))] = out
        yield out


def uniform(
    shape: Sequence[int],
    low: float,
    high: float,
    seed: Seed,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``U(low, high)`` draws of ``shape`` from ``seed``, on the CPU, replayed inside ``torch.compile`` like
    :func:`gaussian` (recorded under :func:`pinned`).

    Example:
        >>> from camfn.noise import uniform
        >>> w = uniform((1000,), -1.0, 1.0, seed=3)
        >>> bool((w == uniform((1000,), -1.0, 1.0, seed=3)).all()), bool(w.min() >= -1), bool(w.max() < 1)
        (True, True, True)
    """
    key = (tuple(shape), ("uniform", low, high), seed, 0, dtype, str(device))  # seed at index 2, as gaussians'
    if torch.compiler.is_compiling() or exporting():
        return _replay(key)
    with torch._C._DisableFuncTorch():
        draw = torch.rand(tuple(shape), generator=generator(seed), dtype=torch.float32)
    out = (low + (high - low) * draw).to(dtype=dtype, device=device)
    if _PINNED is not None and not isinstance(seed, torch.Generator):
        _PINNED[key] = out
    return out


# ------------------------------------------------------------------------------ noise under compile
_PINNED: dict[tuple, torch.Tensor] | None = None
_PIN_LOCK = threading.Lock()
_USERS: dict[int, int] = {}  # id(store) -> threads inside pinned(store)
_BEFORE: dict[int, dict[tuple, torch.Tensor] | None] = {}  # id(store) -> what was pinned before it


@contextlib.contextmanager
def pinned(store: dict[tuple, torch.Tensor]) -> Iterator[dict[tuple, torch.Tensor]]:
    """Record eager draws made with an int seed into ``store``, and replay them inside ``torch.compile``.

    A compiled region cannot create a ``torch.Generator``. :func:`camfn.compiled` therefore runs the
    method once eagerly under ``pinned(store)`` (recording every draw) and calls the compiled function
    under the same ``pinned(store)``, where each draw is read back as a constant: the compiled map
    equals the eager one. The noise tensors stay alive as long as ``store``.
    """
    global _PINNED
    with _PIN_LOCK:  # threads sharing one store (one Compiled) keep it pinned until the last one leaves
        if _USERS.get(id(store), 0) == 0:
            _BEFORE[id(store)] = _PINNED
        _USERS[id(store)] = _USERS.get(id(store), 0) + 1
        _PINNED = store
    try:
        yield store
    finally:
        with _PIN_LOCK:
            _USERS[id(store)] -= 1
            if _USERS[id(store)] == 0:
                del _USERS[id(store)]
                previous = _BEFORE.pop(id(store))
                if _PINNED is store:
                    _PINNED = previous


def _replay(key: tuple) -> torch.Tensor:
    if isinstance(key[2], torch.Generator):
        raise OptionError("inside torch.compile, noise needs an int seed (a torch.Generator cannot be replayed)")
    if _PINNED is None or key not in _PINNED:
        raise OptionError(
            "a noisy method ran inside torch.compile without its noise drawn first; compile it with "
            "camfn.compiled(method, model, layer, ...), which draws the noise eagerly once per input shape"
        )
    return _PINNED[key]
