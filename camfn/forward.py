r"""The traced forward: a pure function of ``(params, x, deltas)``, and gradients at layers.

Given an :class:`~camfn.graph.Engine` (the rewritten graph), everything here is a pure function built on
``torch.func``: no hooks, no ``.grad``, no module state. For a score ``S = score(f(x))`` of shape
``(B, T)``,

.. math:: G_{t} = \frac{\partial S_{\cdot t}}{\partial A} = \frac{\partial S_{\cdot t}}{\partial \delta}\Big|_{\delta=0}

comes from one forward pass and one ``torch.func.vjp``; the pullback is ``vmap``-ped over the ``T``
one-hot cotangents, so ``T`` targets cost one forward and ``T`` backward passes through the *tail* of the
network only (the part after the layer; no parameter gradients).

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> p = camfn.params(model)
    >>> out = camfn.forward.apply(model, p, torch.randn(1, 3, 64, 64))
    >>> out.shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .errors import TargetError
from .graph import Engine, trace

__all__ = ["Gradients", "activations", "apply", "gradients", "params", "run"]

Params = dict[str, Tensor]


def params(model: nn.Module) -> Params:
    """The model's parameters and buffers as a dict of detached tensors (shared storage, no copy).

    Pass it, or any dict with the same keys (another checkpoint, a randomised copy, a stack of them made
    with ``torch.func.stack_module_state`` under ``vmap``), as the ``params`` of every method.

    Example:
        >>> import torch, camfn
        >>> sorted(camfn.params(torch.nn.Linear(2, 3)))
        ['bias', 'weight']
    """
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach() for k, v in state.items()}


def channels_last(p: Params) -> Params:
    """``p`` with every 4-d floating tensor (conv weights) in channels-last memory layout; values unchanged.

    Inference-heavy paths (the perturbation methods' thousands of forwards) run ~1.8x faster on CPU with
    channels-last weights and inputs. Inside a ``torch.func`` transform ``p`` is returned as it is (vmap
    has no fast path for channels-last strides).
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return p
    return {
        k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
        for k, v in p.items()
    }


def run(engine: Engine, p: Params, x: Tensor, deltas: tuple[Tensor, ...]) -> Any:
    """Evaluate the rewritten graph: ``(output, acts)`` (or ``acts`` for a headless engine)."""
    return engine.program(p, x, *deltas)


def zeros(engine: Engine, x: Tensor) -> tuple[Tensor, ...]:
    """Zero perturbations shaped like each layer's activation for input ``x``."""
    return tuple(torch.zeros(shape, dtype=dtype, device=x.device) for shape, dtype in engine.delta_shapes(x))


def apply(model: nn.Module, p: Params, x: Tensor, **trace_options: Any) -> Any:
    """The model's output for ``x`` under parameters ``p``: ``f(p, x)``, pure."""
    return trace(model, **trace_options).program()(p, x)


def activations(engine: Engine, p: Params, x: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
    """``(output, acts)``; for a headless engine ``(None, acts)`` and only the head of the net runs."""
    result = run(engine, p, x, zeros(engine, x))
    return result if engine.with_output else (None, result)


class Gradients(NamedTuple):
    """``acts[i]``: ``(B, K, ...)``; ``grads[i]``: ``(B, T, K, ...)``; ``scores``: ``(B, T)``."""

    output: Any
    acts: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    scores: Tensor
    squeeze: bool


def gradients(engine: Engine, p: Params, x: Tensor, score: Any) -> Gradients:
    """Activations and ``dS/dA`` at every layer of ``engine`` for every column of ``score(output)``.

    ``score(output)`` returns ``(B,)`` (one target per sample: ``squeeze`` is True) or ``(B, T)``.
    """

    def f(*deltas: Tensor) -> tuple[Tensor, tuple[Any, tuple[Tensor, ...]]]:
        output, acts = run(engine, p, x, deltas)
        return score(output), (output, acts)

    s, pull, (output, acts) = vjp(f, *zeros(engine, x), has_aux=True)
    if not isinstance(s, Tensor) or s.ndim not in (1, 2) or s.shape[0] != x.shape[0]:
        raise TargetError(f"the target gave scores of shape {getattr(s, 'shape', type(s))}; expected (B,) or (B, T)")
    squeeze = s.ndim == 1
    if squeeze:
        grads = tuple(g.unsqueeze(1) for g in pull(torch.ones_like(s)))
        s = s.unsqueeze(1)
    else:
        eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
        cotangents = eye[:, None, :].expand(s.shape[1], s.shape[0], s.shape[1])
        grads = tuple(g.movedim(0, 1) for g in vmap(pull)(cotangents))
    return Gradients(output, tuple(acts), grads, s, squeeze)


def chunked(
    fn: Callable[[Tensor], Tensor],
    n: int,
    chunk_size: int | None,
    *,
    device: torch.device | str = "cpu",
    combine: Literal["cat", "sum"] = "cat",
    progress: bool = False,
    desc: str = "",
) -> Tensor:
    """``fn`` over ``arange(n)`` in chunks of ``chunk_size`` indices, concatenated on axis 0 (or summed).

    The memory bound of every perturbation method: ``fn`` builds and evaluates one chunk at a time.
    ``chunk_size=None`` evaluates everything at once. ``progress=True`` shows a tqdm bar (optional
    dependency ``pip install camfn[progress]``).
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: use a positive int, or None for one chunk")
    size = n if chunk_size is None else chunk_size
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
