r"""Guided backpropagation (Springenberg et al., 2015) and Guided Grad-CAM (Selvaraju et al., 2017).

Guided backpropagation is the input gradient of the score ``S`` through a copy of the traced graph in which
every ReLU lets a gradient through only where both its input and the incoming gradient are positive:

.. math:: y = \mathrm{ReLU}(z) \text{ forward}, \qquad
          \frac{\partial S}{\partial z} \leftarrow \mathbb 1[z > 0]\,
          \mathrm{ReLU}\Big(\frac{\partial S}{\partial y}\Big) \text{ backward}

The copy is a rewrite of camfn's trace: ``nn.ReLU`` modules, ``F.relu`` / ``torch.relu`` calls and the
``Tensor.relu`` method, in-place variants included, become a guided ReLU (a ``torch.autograd.Function``
that works under ``torch.func`` transforms). ReLUs inside modules that fx keeps as leaves are swapped in a
structural copy of that module. The user's modules, their ``inplace`` flags and their parameters are never
touched. Other activations (ReLU6, GELU, ...) keep their ordinary gradient, as in the references.

Guided Grad-CAM multiplies the guided gradient by the Grad-CAM map resized to the input:
``guided_gradcam = guided_backprop * gradcam[:, None]``.

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> p, x = camfn.params(model), torch.randn(2, 3, 32, 32)
    >>> camfn.guided_backprop(model, p, x, 3).shape, camfn.guided_gradcam(model, p, x, "layer3", 3).shape
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 3, 32, 32]))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from ..checks import check_input, check_model
from ..driver import num_classes
from ..errors import InputError, LayerError, OptionError
from ..hooks import HookPolicy
from ..layer_names import Layer
from ..rewrite import Program, program
from ..targets import Output, Target, scores
from ..tracing import Params, Traced, trace
from .gradient import gradcam

__all__ = ["GuidedReLU", "guided_backprop", "guided_gradcam", "guided_program", "guided_relu"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_OPTIONS = ("hooks", "tracer_options", "output")


class GuidedReLU(torch.autograd.Function):
    """``relu(z)`` forward; backward ``1[z > 0] * relu(grad)``. Works under ``vjp``, ``grad`` and ``vmap``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:  # type: ignore[override]
        return torch.relu(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return torch.where(z > 0, grad.clamp_min(0), torch.zeros_like(grad))


def guided_relu(z: Tensor) -> Tensor:
    """The guided ReLU: the value of ``relu(z)``, a gradient only where ``z > 0`` and the gradient is ``> 0``.

    Example:
        >>> import torch
        >>> from camfn.methods.guided import guided_relu
        >>> z = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
        >>> torch.autograd.grad(guided_relu(z), z, torch.tensor([5.0, 5.0, -5.0]))[0]
        tensor([0., 5., 0.])
    """
    return GuidedReLU.apply(z)


class _GuidedReLUModule(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return guided_relu(z)


def _guided_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` (same tensors, new containers) with every ``nn.ReLU`` made guided."""
    if isinstance(module, nn.ReLU):
        return _GuidedReLUModule()
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else _guided_copy(m) for k, m in module._modules.items()}
    return clone


def _has_relu(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ReLU) for m in module.modules())


def _relu_node(node: fx.Node, root: nn.Module) -> tuple[bool, bool]:
    """``(is a ReLU, is in place)`` for a graph node."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return isinstance(module, nn.ReLU), bool(getattr(module, "inplace", False))
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.target in (torch.relu_, F.relu_) or node.kwargs.get("inplace", False) is True
        return True, inplace or (len(node.args) > 1 and node.args[1] is True)
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return True, node.target == "relu_"
    return False, False


def _rewrite(traced: Traced) -> tuple[fx.Graph, list[str]]:
    """A copy of the traced graph with guided ReLUs, and the leaf modules that need a guided copy."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(traced.module.graph, env))
    root = traced.module
    leaves = []
    for old, node in env.items():
        relu, inplace = _relu_node(old, root)
        if not relu:
            if node.op == "call_module" and _has_relu(root.get_submodule(node.target)):
                leaves.append(node.target)
            continue
        source = node.args[0]
        with graph.inserting_after(node):
            guided = graph.call_function(guided_relu, (source,))
        node.replace_all_uses_with(guided)
        graph.erase_node(node)
        if inplace and isinstance(source, fx.Node):  # later readers of the input saw the ReLU's result
            order = {n: i for i, n in enumerate(graph.nodes)}
            later = [u for u in source.users if u is not guided and order[u] > order[guided]]
            for user in later:
                user.replace_input_with(source, guided)
    graph.lint()
    return graph, leaves


def guided_program(traced: Traced) -> Program:
    """The traced model with every ReLU guided, as a pure function ``(params, x) -> output``; cached."""
    if traced.cache.guided is not None:
        return traced.cache.guided
    graph, leaves = _rewrite(traced)
    root = fx.GraphModule(traced.module, graph, "Guided" + traced.module.__class__.__name__)
    for target in leaves:
        parent, _, name = target.rpartition(".")
        holder = root.get_submodule(parent) if parent else root
        if parent and holder is traced.module.get_submodule(parent):  # never write the traced skeleton
            raise LayerError(f"cannot make the ReLUs inside {target!r} guided; trace it without leaf modules")
        setattr(holder, name, _guided_copy(traced.module.get_submodule(target)))
    traced.cache.guided = program(traced, root.graph, prune=False, root=root)
    return traced.cache.guided


def guided_backprop(
    model: nn.Module,
    params: Params,
    x: Tensor,
    target: Target = None,
    *,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    output: Output = None,
) -> Tensor:
    r"""Guided backpropagation: the input gradient of ``S`` with every ReLU's backward guided.

    .. math:: R = \frac{\partial^{\mathrm{guided}} S}{\partial x}, \qquad
              \text{each ReLU: } \frac{\partial S}{\partial z} = \mathbb 1[z > 0]\,
              \mathrm{ReLU}\Big(\frac{\partial S}{\partial y}\Big)

    Returns ``(B, C, H, W)`` input gradients (not a map: signed, unnormalised), ``(B, T, C, H, W)`` for
    ``(B, T)`` targets. ``target``, ``hooks``, ``tracer_options`` and ``output`` as for every method.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18(num_classes=4).eval()
        >>> g = camfn.guided_backprop(model, camfn.params(model), torch.randn(1, 3, 32, 32), torch.tensor([[0, 1]]))
        >>> g.shape
        torch.Size([1, 2, 3, 32, 32])
    """
    check_input(x)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"guided backpropagation needs an nn.Module (its ReLUs), got {type(model).__name__}; pass the module"
        )
    check_model(model)
    traced = trace(model, hooks=hooks, tracer_options=tracer_options)
    program = guided_program(traced)
    score = scores(target, x.shape[0], num_classes(traced, x, output), output)
    s, pull = vjp(lambda inp: score(program(params, inp)), x)
    if s.ndim == 1:
        return pull(torch.ones_like(s))[0]
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    cotangents = eye[:, None, :].expand(s.shape[1], s.shape[0], s.shape[1])
    return vmap(pull)(cotangents)[0].movedim(0, 1)


def guided_gradcam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layer | None = None,
    target: Target = None,
    **options: Any,
) -> Tensor:
    r"""Guided Grad-CAM: guided backpropagation times the Grad-CAM map at the input resolution.

    .. math:: R_{c,ij} = \frac{\partial^{\mathrm{guided}} S}{\partial x_{c,ij}} \cdot L^{\mathrm{Grad\text{-}CAM}}_{ij}

    ``L`` is :func:`camfn.gradcam` with the same ``options`` (ReLU, resize to the input, min-max by
    default). Returns ``(B, C, H, W)`` (``(B, T, C, H, W)`` for ``(B, T)`` targets). One layer only.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18(num_classes=4).eval()
        >>> camfn.guided_gradcam(model, camfn.params(model), torch.randn(2, 3, 32, 32), "layer3").shape
        torch.Size([2, 3, 32, 32])
    """
    if layer is not None and not isinstance(layer, str | nn.Module):
        raise LayerError("guided_gradcam takes one layer; call it once per layer")
    if options.get("size", "input") != "input":
        raise OptionError(f"size={options['size']!r}: guided_gradcam multiplies by the map at the input size")
    cam = gradcam(model, params, x, layer, target, **options)
    guided = guided_backprop(model, params, x, target, **{k: options[k] for k in _OPTIONS if k in options})
    return guided * cam.unsqueeze(cam.ndim - (x.ndim - 2))
