r"""Activations and gradients at layers: one forward and one ``torch.func.vjp`` of an injected program.

For a score ``S = score(f(x))`` of shape ``(B, T)``,

.. math:: G_{t} = \frac{\partial S_{\cdot t}}{\partial A} = \frac{\partial S_{\cdot t}}{\partial \delta}\Big|_{\delta=0}

comes from one forward pass and one ``vjp``; the pullback is ``vmap``-ped over the ``T`` one-hot
cotangents, so ``T`` targets cost one forward and ``T`` backward passes through the *tail* of the network
only (the part after the layer; no parameter gradients).

Example:
    >>> import torch, torchvision, camfn
    >>> from camfn.tracing import trace
    >>> from camfn.rewrite import inject
    >>> from camfn.pullback import gradients
    >>> model = torchvision.models.resnet18().eval()
    >>> result = gradients(inject(trace(model), ["layer4_1_relu_1"]), camfn.params(model),
    ...                    torch.randn(2, 3, 64, 64), lambda out: out[:, :3])
    >>> result.acts[0].shape, result.grads[0].shape
    (torch.Size([2, 512, 2, 2]), torch.Size([2, 3, 512, 2, 2]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .errors import TargetError
from .rewrite import Injected
from .runtime import eager, in_transform

__all__ = ["Gradients", "activations", "channels_last", "gradients", "zeros"]

Params = dict[str, Tensor]


def zeros(injected: Injected, x: Tensor) -> tuple[Tensor, ...]:
    """Zero perturbations shaped like each layer's activation for input ``x``."""
    return tuple(torch.zeros(shape, dtype=dtype, device=x.device) for shape, dtype in injected.delta_shapes(x))


def activations(injected: Injected, p: Params, x: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
    """``(output, acts)``; for a headless rewrite ``(None, acts)`` and only the head of the net runs."""
    result = injected.program(p, x, *zeros(injected, x))
    return result if injected.with_output else (None, result)


class Gradients(NamedTuple):
    """``output``; ``acts[i]``: ``(B, K, ...)``; ``grads[i]``: ``(B, T, K, ...)``; ``scores``: ``(B, T)``."""

    output: Any
    acts: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    scores: Tensor
    squeeze: bool


def gradients(injected: Injected, p: Params, x: Tensor, score: Any) -> Gradients:
    """Activations and ``dS/dA`` at every layer of ``injected`` for every column of ``score(output)``.

    ``score(output)`` returns ``(B,)`` (one target per sample: ``squeeze`` is True) or ``(B, T)``. Outside
    every transform and ``torch.compile`` the pullback is plain autograd on the zero perturbations (the same
    numbers as ``torch.func.vjp`` with less per-op dispatch); inside them, ``torch.func.vjp``.
    """
    if eager():
        return _autograd(injected, p, x, score)

    def f(*deltas: Tensor) -> tuple[Tensor, tuple[Any, tuple[Tensor, ...]]]:
        output, acts = injected.program(p, x, *deltas)
        return score(output), (output, acts)

    s, pull, (output, acts) = vjp(f, *zeros(injected, x), has_aux=True)
    _check_scores(s, x)
    squeeze = s.ndim == 1
    if squeeze:
        grads = tuple(g.unsqueeze(1) for g in pull(torch.ones_like(s)))
        s = s.unsqueeze(1)
    else:
        eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
        cotangents = eye[:, None, :].expand(s.shape[1], s.shape[0], s.shape[1])
        grads = tuple(g.movedim(0, 1) for g in vmap(pull)(cotangents))
    return Gradients(output, tuple(acts), grads, s, squeeze)


def _check_scores(s: Any, x: Tensor) -> None:
    if not isinstance(s, Tensor) or s.ndim not in (1, 2) or s.shape[0] != x.shape[0]:
        raise TargetError(f"the target gave scores of shape {getattr(s, 'shape', type(s))}; expected (B,) or (B, T)")
    if not s.is_floating_point():
        raise TargetError(f"the target returned {s.dtype} scores; a score must be a float tensor (differentiable)")


def _autograd(injected: Injected, p: Params, x: Tensor, score: Any) -> Gradients:
    """:func:`gradients` by ``torch.autograd.grad``; the maps stay differentiable when ``x`` or ``p`` require
    grad (``create_graph``), and nothing else keeps a graph."""
    graph = torch.is_grad_enabled() and (x.requires_grad or any(v.requires_grad for v in p.values()))
    with torch.enable_grad():
        deltas = tuple(z.requires_grad_() for z in zeros(injected, x))
        output, acts = injected.program(p, x, *deltas)
        s = score(output)
        _check_scores(s, x)
        if not s.requires_grad:  # the score does not depend on the layer at all
            grads = tuple(torch.zeros_like(d) for d in deltas)
        elif s.ndim == 1:
            grads = torch.autograd.grad(s.sum(), deltas, create_graph=graph, allow_unused=True)
        else:
            eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
            cotangents = eye[:, None, :].expand(s.shape[1], s.shape[0], s.shape[1])
            grads = torch.autograd.grad(
                s, deltas, cotangents, create_graph=graph, allow_unused=True, is_grads_batched=True
            )
            grads = tuple(g if g is None else g.movedim(0, 1) for g in grads)
    squeeze = s.ndim == 1
    shaped = tuple(
        (torch.zeros_like(d) if g is None else g).reshape(d.shape[0], -1, *d.shape[1:])
        for g, d in zip(grads, deltas, strict=True)
    )
    if not graph:
        output = (
            output.detach()
            if isinstance(output, Tensor)
            else torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, output)
        )
        s, acts = s.detach(), tuple(a.detach() for a in acts)
        shaped = tuple(g.detach() for g in shaped)
    return Gradients(output, tuple(acts), shaped, s.unsqueeze(1) if squeeze else s, squeeze)


def channels_last(p: Params) -> Params:
    """``p`` with every 4-d floating tensor (conv weights) in channels-last memory layout; values unchanged.

    Inference-heavy paths (the perturbation methods' thousands of forwards) run ~1.8x faster on CPU with
    channels-last weights and inputs. Inside a ``torch.func`` transform ``p`` is returned as it is (vmap
    has no fast path for channels-last strides).
    """
    if in_transform():
        return p
    return {
        k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
        for k, v in p.items()
    }
