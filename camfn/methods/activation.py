r"""The activation family: maps from the activation ``A`` alone (no gradients).

``cam`` weights channels by the classifier's weights, ``eigencam`` takes the first principal component.
Only the part of the network up to the layer runs (for ``cam`` with ``target=None`` the whole network
runs once, to find the top-1 class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

from torch import Tensor, nn

from ..errors import LayerError, TargetError
from ..forward import Params, activations
from ..graph import Layer, Traced, engine
from ..postprocess import finish, first_component
from ..targets import Target, classes
from .core import Maps, Options, _options, explain, num_classes, prepare

__all__ = ["cam", "eigencam"]

Layers = Layer | Sequence[Layer] | None


def _classifier(traced: Traced, channels: int) -> str:
    """Module path of the last ``nn.Linear`` with ``in_features == channels``."""
    for node in reversed(list(traced.module.graph.nodes)):
        if node.op == "call_module":
            module = traced.module.get_submodule(node.target)
            if isinstance(module, nn.Linear) and module.in_features == channels:
                return str(node.target)
    raise LayerError(
        f"cam needs global pooling followed by a linear classifier with {channels} inputs after the layer; "
        "none was found. Pass fc='path.of.linear', or use gradcam (equal to cam on such models)"
    )


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
        path = fc or _classifier(traced, a.shape[1])
        key = f"{path}.weight"
        weight = params[key] if key in params else traced.module.get_parameter(key)
        if weight.ndim != 2 or weight.shape[1] != a.shape[1]:
            raise LayerError(
                f"fc {path!r} has weight {tuple(weight.shape)}, which does not map the {a.shape[1]} channels "
                f"of layer {traced.qualname[node]!r} to classes"
            )
        w = weight[cls]  # (B, T, K)
        raw = (w.reshape(*w.shape, *([1] * (a.ndim - 2))) * a.unsqueeze(1)).sum(2)
        m = finish(raw, x, relu=opts["relu"], size=opts["size"], normalize=opts["normalize"])
        maps.append(m.squeeze(1) if squeeze else m)
    return maps[0] if single else maps


def _eigencam(a: Tensor, _: Tensor | None) -> Tensor:
    return first_component(a, ndim=a.ndim - 3)


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
    return explain(model, params, x, layer, None, _eigencam, uses_gradient=False, **options)
