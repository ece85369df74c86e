r"""The activation family: maps from the activation ``A`` alone (no gradients).

``cam`` weights channels by the classifier's weights, ``eigencam`` takes the first principal component.
Only the part of the network up to the layer runs (for ``cam`` with ``target=None`` the whole network
runs once, to find the top-1 class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import torch.fx as fx
from torch import Tensor, nn

from ..errors import LayerError, TargetError
from ..forward import Params, activations
from ..graph import Layer, Traced, engine
from ..smoothing import smoothable
from ..targets import Target, classes
from .core import Maps, Options, _options, explain, finalize, num_classes, prepare, reduce

__all__ = ["cam", "eigencam"]

Layers = Layer | Sequence[Layer] | None


_POOL_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_POOL_CALLS = {"flatten", "mean", "view", "reshape", "squeeze", "adaptive_avg_pool2d", "avg_pool2d", "dropout"}


def _passes_through(traced: Traced, node: fx.Node) -> bool:
    """Pooling, flattening, dropout: ops CAM's derivation allows between the layer and the classifier."""
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), _POOL_MODULES)
    name = getattr(node.target, "__name__", node.target)
    return node.op in ("call_function", "call_method") and name in _POOL_CALLS


def _classifier(traced: Traced, layer: str) -> str:
    """Module path of the final ``nn.Linear``, checking only pooling/flatten stand between it and ``layer``.

    Cached on ``traced`` (a compiled call only reads the cache: dynamo cannot walk an fx graph).
    """
    key = ("classifier", layer)
    if key not in traced.engines:
        traced.engines[key] = _find_classifier(traced, layer)  # type: ignore[assignment]
    return traced.engines[key]  # type: ignore[return-value]


def _find_classifier(traced: Traced, layer: str) -> str:
    output = next(n for n in traced.module.graph.nodes if n.op == "output").args[0]
    node = output if isinstance(output, fx.Node) else None
    while node is not None and node.op == "call_module" and _passes_through(traced, node):
        node = node.args[0]  # dropout / identity after the classifier
    why = "the model's output is not produced by an nn.Linear"
    if (
        node is not None
        and node.op == "call_module"
        and isinstance(traced.module.get_submodule(node.target), nn.Linear)
    ):
        fc, step = str(node.target), node.args[0]
        while isinstance(step, fx.Node) and step.name != layer and _passes_through(traced, step):
            step = step.args[0]
        if isinstance(step, fx.Node) and step.name == layer:
            return fc
        between = traced.qualname.get(step.name, step.name) if isinstance(step, fx.Node) else repr(step)
        why = f"{between!r} stands between the layer and the classifier {fc!r}"
    raise LayerError(
        f"cam needs the layer to be followed only by global average pooling (and flatten/dropout) and the final "
        f"linear classifier; here {why}. Use gradcam (equal to cam on such models), or pass fc='path.of.linear' "
        "to use that layer's weights anyway"
    )


@smoothable
def cam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    fc: str | None = None,
    **options: Unpack[Options],
) -> Maps:
    r"""CAM (Zhou et al., 2016) for models ending in global average pooling and a linear layer.

    .. math:: L_c = \sum_k W_{c,k} A_k

    with :math:`W` the weight of the linear classifier ``fc`` (found automatically: the last
    ``nn.Linear`` whose input size is the layer's channel count), read from ``params``. Bias and the
    pooling factor do not change the normalised map, so on such a model ``cam`` equals ``gradcam``.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.cam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 5).shape
        torch.Size([1, 64, 64])
    """
    opts = _options(options)
    if callable(target) and not isinstance(target, Tensor):
        raise TargetError("cam needs class indices (int, (B,) or (B, T) tensor, or None); use gradcam for callables")
    traced, nodes, single = prepare(model, x, layer, opts)
    index, squeeze = classes(target, x.shape[0], num_classes(traced, x))
    output, acts = activations(engine(traced, nodes, with_output=target is None), params, x)
    cls = index(output if target is None else x)  # (B, T)
    maps = []
    for node, a in zip(nodes, acts, strict=True):
        path = fc or _classifier(traced, node)
        key = f"{path}.weight"
        weight = params[key] if key in params else traced.module.get_parameter(key)
        if weight.ndim != 2 or weight.shape[1] != a.shape[1]:
            raise LayerError(
                f"fc {path!r} has weight {tuple(weight.shape)}, which does not map the {a.shape[1]} channels "
                f"of layer {traced.qualname[node]!r} to classes"
            )
        w = weight[cls]  # (B, T, K)
        maps.append(reduce(w.reshape(*w.shape, *([1] * (a.ndim - 2))) * a.unsqueeze(1), opts["eigen_smooth"]))
    return finalize(maps, x, opts, squeeze, single)


def _activation(a: Tensor, _: Tensor | None) -> Tensor:
    return a


@smoothable
def eigencam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""Eigen-CAM (Muhammad & Yeasin, 2020): first principal component of the activation. Class-agnostic.

    With :math:`X` the :math:`(HW, K)` activation matrix, channels centred over space, and
    :math:`X = U S V^\top`: :math:`L = X v_1`, its sign chosen to correlate non-negatively with
    :math:`\sum_k A_k` (grad-cam has no sign rule and can return inverted maps). ``target`` is ignored.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.eigencam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    del target
    return explain(model, params, x, layer, None, _activation, uses_gradient=False, **{**options, "eigen_smooth": True})
