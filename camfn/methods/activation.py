r"""The activation family: maps from the activation ``A`` alone (no gradients).

``cam`` weights channels by the classifier's weights, ``eigencam`` takes the first principal component.
For ``eigencam`` only the part of the network up to the layer runs.
"""

from __future__ import annotations

import torch.fx as fx
from torch import Tensor, nn

from ..driver import Layer, method
from ..errors import LayerError, TargetError
from ..options import Option
from ..tracing import Traced

__all__ = ["cam", "eigencam"]

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
    found = traced.cache.classifier.get(layer)
    if found is None:
        found = traced.cache.classifier[layer] = _find_classifier(traced, layer)
    return found


def _is_relu(traced: Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), nn.ReLU)
    name = getattr(node.target, "__name__", node.target)
    return node.op in ("call_function", "call_method") and name in ("relu", "relu_")


def _pools(traced: Traced, node: fx.Node) -> bool:
    """Spatial averaging (the global pooling of a convolutional head)."""
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), _POOL_MODULES[:6])
    return getattr(node.target, "__name__", node.target) in ("mean", "adaptive_avg_pool2d", "avg_pool2d")


def _conv_classifier(traced: Traced, output: fx.Node | None, layer: str) -> str | None:
    """A squeezenet-style head: ``layer -> (dropout) -> conv 1x1 -> (ReLU) -> global pool -> (flatten)``.

    Returns the 1x1 convolution's module path, or ``None`` where the head has another form.
    """
    node, pooled = output, False
    while node is not None and (_passes_through(traced, node) or _is_relu(traced, node)):
        pooled = pooled or _pools(traced, node)
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node is None or node.op != "call_module" or not pooled:  # no pooling: a dense (segmentation) head
        return None
    conv = traced.module.get_submodule(node.target)
    if not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d) or conv.groups != 1:
        return None
    if any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride):
        return None
    step = node.args[0]
    while isinstance(step, fx.Node) and step.name != layer and _passes_through(traced, step):
        step = step.args[0]
    return str(node.target) if isinstance(step, fx.Node) and step.name == layer else None


def _find_classifier(traced: Traced, layer: str) -> str:
    output = next(n for n in traced.module.graph.nodes if n.op == "output").args[0]
    node = output if isinstance(output, fx.Node) else None
    conv = _conv_classifier(traced, node, layer)
    if conv is not None:
        return conv
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
        "linear classifier (or a 1x1-convolution classifier, ReLU and global pooling); "
        f"here {why}. Use gradcam (equal to cam on such models), or pass fc='path.of.linear' "
        "to use that layer's weights anyway"
    )


def _fc(value: object, name: str) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        from ..errors import OptionError

        raise OptionError(f"{name}={value!r}: use None (find the classifier) or the module path of a linear layer")
    return value  # type: ignore[return-value]


@method(needs="forward", options={"fc": Option(None, _fc)})
def cam(at: Layer) -> Tensor:
    r"""CAM (Zhou et al., CVPR 2016) for models ending in global average pooling and a linear layer.

    .. math:: L_c = \sum_k W_{c,k} A_k

    with :math:`W` the weight of the linear classifier (found automatically, or the option ``fc`` = its
    module path), read from ``params``. Bias and the pooling factor do not change the normalised map, so
    on such a model ``cam`` equals ``gradcam``. Targets are class indices (``None``: the top-1 class).

    A 1x1-convolution classifier followed by global pooling (squeezenet: ``Conv2d(K, C, 1) -> ReLU ->
    AdaptiveAvgPool2d(1)``) is found too and its weight ``(C, K, 1, 1)`` read as ``W`` (as torchcam does;
    with the ReLU in the head, ``cam`` is then CAM's linear approximation, not equal to ``gradcam``).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.cam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 5).shape
        torch.Size([1, 64, 64])
    """
    call = at.call
    if call.target_is_callable:
        raise TargetError("cam needs class indices (int, (B,) or (B, T) tensor, or None); use gradcam for callables")
    path = at.options["fc"] or _classifier(call.trace, at.node)
    key = f"{path}.weight"
    weight = call.params[key] if key in call.params else call.trace.defaults.get(key)
    if weight is not None and weight.ndim > 2 and all(n == 1 for n in weight.shape[2:]):
        weight = weight.flatten(1)  # a 1x1-convolution classifier (classes, K, 1, 1)
    k = at.a.shape[2]
    if weight is None or weight.ndim != 2 or weight.shape[1] != k:
        got = None if weight is None else tuple(weight.shape)
        raise LayerError(
            f"fc {path!r} has weight {got}, which does not map the {k} channels of layer {at.name!r} to classes; "
            "pass fc='path.of.the.linear.classifier'"
        )
    w = weight[call.classes()]  # (B, T, K)
    return w.reshape(*w.shape, *([1] * (at.a.ndim - 3))) * at.a


@method(needs="activations", eigen=True, fixed_target=False)
def eigencam(at: Layer) -> Tensor:
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
    return at.a
