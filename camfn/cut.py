"""The escape hatch for any model: ``Cut(head, tail)``, explained at ``layer="head"``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only
from torchvision.models.feature_extraction import NodePathTracer

__all__ = ["Cut", "CutTracer", "detached_weights"]


class _Detached(TorchFunctionMode):
    """Every ``nn.Parameter`` a torch function receives is passed detached (same storage, no autograd
    history): a closure's weights stay constants of the differentiated function, so no tensor built
    from them (HF Swin's and BEiT's attention masks) requires grad, and the user's modules are not touched."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        args, kwargs = tree_map_only(nn.Parameter, torch.Tensor.detach, (args, kwargs or {}))
        return func(*args, **kwargs)


def detached_weights() -> TorchFunctionMode:
    """A context in which closed-over ``nn.Parameter`` s are used detached (see :class:`_Detached`).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> with detached_weights():
        ...     y = lin(torch.ones(1, 2))
        >>> y.requires_grad, lin.weight.requires_grad
        (False, True)
    """
    return _Detached()


class _Function(nn.Module):
    """A plain callable as a module (no parameters of its own: it closes over whatever it uses, detached)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        with detached_weights():
            return self.fn(*args)


class Cut(nn.Module):
    r"""A model given as ``head(x) -> A`` and ``tail(A) -> output``: the escape hatch for any model.

    Explain ``Cut(head, tail)`` as the model at ``layer="head"`` (the default). camfn never traces
    inside ``head`` or ``tail``; the gradient is the pullback of the tail at ``A``:

    .. math:: G = \frac{\partial S(\mathrm{tail}(A))}{\partial A}\Big|_{A = \mathrm{head}(x)}

    ``head`` and ``tail`` are modules or plain callables (closures over the user's modules: their
    parameters are then read from those modules, not from ``params``, and used detached, so the head
    runs as a constant of the differentiated function and nothing built from the weights requires grad).
    With ``tail_takes_input=True`` the tail is called as ``tail(A, x)`` (detection models need the images
    after the backbone).
    ``autograd_tail=True`` differentiates the tail with plain ``torch.autograd`` instead of
    ``torch.func`` (for ops without functorch support, such as torchvision's ``roi_align`` in detection
    heads); the tail must then return a tensor and the target one score per sample.

    Example:
        >>> import torch, torchvision, camfn
        >>> net = torchvision.models.resnet18().eval()
        >>> head = torch.nn.Sequential(*list(net.children())[:-2])
        >>> tail = lambda a: net.fc(a.mean((2, 3)))
        >>> cut = camfn.Cut(head, tail)
        >>> camfn.gradcam(cut, camfn.params(cut), torch.randn(1, 3, 64, 64), "head", 3).shape
        torch.Size([1, 64, 64])
    """

    def __init__(self, head: Any, tail: Any, *, tail_takes_input: bool = False, autograd_tail: bool = False) -> None:
        super().__init__()
        if not (callable(head) and callable(tail)):
            raise TypeError("Cut(head, tail) needs two callables: head(x) -> A and tail(A) -> output")
        self.head = head if isinstance(head, nn.Module) else _Function(head)
        if autograd_tail:
            tail = _Function(lambda a, *rest, fn=tail: _AutogradTail.apply(a, fn, rest))
        self.tail = tail if isinstance(tail, nn.Module) else _Function(tail)
        self.tail_takes_input = tail_takes_input

    def forward(self, x: torch.Tensor) -> Any:
        a = self.head(x)
        return self.tail(a, x) if self.tail_takes_input else self.tail(a)


class _AutogradTail(torch.autograd.Function):
    """``fn(a, *rest)`` whose backward re-runs ``fn`` under plain autograd (once differentiable)."""

    @staticmethod
    def forward(a: torch.Tensor, fn: Any, rest: tuple) -> torch.Tensor:
        with torch.no_grad():
            return fn(a, *rest)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        a, fn, rest = inputs
        ctx.fn, ctx.rest = fn, rest
        ctx.save_for_backward(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (a,) = ctx.saved_tensors
        with torch.enable_grad(), detached_weights():
            leaf = a.detach().requires_grad_(True)
            rest = [r.detach() if isinstance(r, torch.Tensor) else r for r in ctx.rest]
            (g,) = torch.autograd.grad(ctx.fn(leaf, *rest), leaf, grad, allow_unused=True)
        return (torch.zeros_like(a) if g is None else g), None, None


class CutTracer(NodePathTracer):
    """Traces a :class:`Cut` as two opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        return module_qualname in ("head", "tail") or super().is_leaf_module(m, module_qualname)
