r"""The activation family: maps from the activation ``A`` alone (no gradients).

``cam`` weights channels by the classifier's weights, ``eigencam`` takes the first principal component,
``kpcacam`` the first kernel principal component, ``fem`` weights channels by their share of outlying
positions, ``randomcam`` by random weights (a sanity baseline), and ``sobel`` ignores the model (an
edge-detector baseline). Except for ``cam`` only the part of the network up to the layer runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..driver import Layer, method, weighted
from ..errors import InputError, LayerError, OptionError, TargetError
from ..noise import uniform
from ..options import Option, choice, finite, seed
from ..tracing import Traced

__all__ = ["cam", "eigencam", "fem", "kpcacam", "randomcam", "sobel"]

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


def _op_name(node: fx.Node) -> Any:
    """The op's plain name: ``"mean"`` for ``torch.mean``, ``Tensor.mean`` and ``aten.mean.dim`` alike."""
    packet = getattr(node.target, "overloadpacket", None)  # torch.export's aten ops
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", node.target)


def _passes_through(traced: Traced, node: fx.Node) -> bool:
    """Pooling, flattening, dropout: ops CAM's derivation allows between the layer and the classifier."""
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), _POOL_MODULES)
    return node.op in ("call_function", "call_method") and _op_name(node) in _POOL_CALLS


def _classifier(traced: Traced, layer: str, output: Any = None) -> str:
    """Module path of the final ``nn.Linear``, checking only pooling/flatten stand between it and ``layer``.

    Cached on ``traced`` (a compiled call only reads the cache: dynamo cannot walk an fx graph).
    """
    key = layer if output is None else f"{layer}|{output!r}"
    found = traced.cache.classifier.get(key)
    if found is None:
        found = traced.cache.classifier[key] = _find_classifier(traced, layer, output)
    return found


def _is_relu(traced: Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and _op_name(node) in ("relu", "relu_")


def _pools(traced: Traced, node: fx.Node) -> bool:
    """Spatial averaging (the global pooling of a convolutional head)."""
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), _POOL_MODULES[:6])
    return _op_name(node) in ("mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool2d")


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


def _linear(traced: Traced, node: fx.Node | None) -> str | None:
    """The module path of the linear layer computing ``node``: an ``nn.Linear`` call, or (torch.export) an
    ``aten.linear`` of the weight ``<path>.weight``."""
    if node is None:
        return None
    if node.op == "call_module" and isinstance(traced.module.get_submodule(node.target), nn.Linear):
        return str(node.target)
    weight = node.args[1] if node.op == "call_function" and _op_name(node) == "linear" else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight"):
        return str(weight.target)[: -len(".weight")]
    return None


def _is_norm(traced: Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), nn.LayerNorm)
    return node.op == "call_function" and _op_name(node) == "layer_norm"


def _output_node(traced: Traced, output: Any) -> fx.Node | None:
    """The graph node of the model's output, or of its ``output`` field (``"logits"`` of a transformers model)."""
    found = next(n for n in traced.module.graph.nodes if n.op == "output").args[0]
    if isinstance(found, Mapping):
        found = found.get(output) if isinstance(output, str) else None
    return found if isinstance(found, fx.Node) else None


def _find_classifier(traced: Traced, layer: str, output: Any = None) -> str:
    node = _output_node(traced, output)
    conv = _conv_classifier(traced, node, layer)
    if conv is not None:
        return conv
    while node is not None and node.op == "call_module" and _passes_through(traced, node):
        node = node.args[0]  # dropout / identity after the classifier
    why = "the model's output is not produced by an nn.Linear"
    fc = _linear(traced, node)
    if fc is not None and node is not None:
        step, norm, pooled = node.args[0], False, False  # a norm of the pooled vector (ConvNeXt's head) is allowed
        while isinstance(step, fx.Node) and step.name != layer:
            if _is_norm(traced, step) and not pooled and not norm:
                norm = True
            elif _passes_through(traced, step):
                pooled = pooled or _pools(traced, step)
            else:
                break
            step = step.args[0]
        if isinstance(step, fx.Node) and step.name == layer and (pooled or not norm):
            return fc
        between = traced.qualname.get(step.name, step.name) if isinstance(step, fx.Node) else repr(step)
        why = f"{between!r} stands between the layer and the classifier {fc!r}"
    raise LayerError(
        f"cam needs the layer to be followed only by global average pooling (and flatten/dropout, a norm of the "
        "pooled vector) and the final linear classifier (or a 1x1-convolution classifier, ReLU and global "
        f"pooling); here {why}. Use gradcam (equal to cam on such models), or pass fc='path.of.linear' "
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
    path = at.options["fc"] or _classifier(call.trace, at.node, at.options["output"])
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


def signed_like(proj: Tensor, reference: Tensor, space: tuple[int, ...]) -> Tensor:
    """``proj`` with its sign flipped where it correlates negatively with ``reference`` over ``space``
    (the eigen methods' sign rule)."""
    p = proj - proj.mean(space, keepdim=True)
    r = reference - reference.mean(space, keepdim=True)
    return torch.where((p * r).sum(space, keepdim=True) < 0, -proj, proj)


@method(needs="activations", fixed_target=False, options={"k": Option(2.0, finite)})
def fem(at: Layer) -> Tensor:
    r"""FEM, the Feature Explanation Method (Fuad et al., IPTA 2020). Class-agnostic.

    .. math:: w_k = \frac{1}{Z} \sum_{ij} [A_{k,ij} > \mu_k + k\,\sigma_k], \qquad L = \sum_k w_k A_k

    with :math:`\mu_k`, :math:`\sigma_k` the mean and (population) standard deviation of channel ``k``
    over space and ``k`` the option (default 2, the k-sigma rule), as grad-cam's ``FEM``. ``target`` is
    ignored.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.fem(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer3", k=1.0).shape
        torch.Size([1, 64, 64])
    """
    a, s = at.a, at.space
    mu = a.mean(s, keepdim=True)
    sigma = a.std(s, keepdim=True, correction=0)
    share = (a > mu + at.options["k"] * sigma).to(a.dtype).mean(s, keepdim=True)
    return share * a


@method(needs="activations", fixed_target=False, options={"seed": Option(0, seed)})
def randomcam(at: Layer) -> Tensor:
    r"""Random-CAM: channels weighted by random numbers, a sanity baseline (grad-cam's ``RandomCAM``).

    .. math:: w_k \sim \mathcal U(-1, 1), \qquad L = \sum_k w_k A_k

    The weights are drawn from ``seed`` (int or ``torch.Generator``) by :func:`camfn.noise.uniform`, one
    per channel and shared by the batch (a sample's map does not depend on the rest of the batch; grad-cam
    draws per sample from numpy's global state). No backward pass; ``target`` is ignored.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> p, x = camfn.params(model), torch.randn(1, 3, 64, 64)
        >>> first, again = (camfn.randomcam(model, p, x, "layer4", seed=1) for _ in range(2))
        >>> bool((first == again).all())
        True
    """
    a = at.a
    w = uniform((a.shape[2],), -1.0, 1.0, at.options["seed"], dtype=a.dtype, device=a.device)
    return weighted(w.expand(1, 1, -1), a)


# ------------------------------------------------------------------------------------------- KPCA
KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def _gamma(value: object, name: str) -> float | None:
    if value is None:
        return None
    value = finite(value, name)
    if value <= 0:
        raise OptionError(f"{name}={value!r}: use a number > 0, or None for 1 / channels")
    return value


def kernel_matrix(x: Tensor, kernel: str, gamma: float | None) -> Tensor:
    """sklearn's pairwise kernel of the rows of ``x`` ``(..., n, K)`` (``gamma=None``: ``1 / K``;
    ``coef0 = 1``, ``degree = 3``, as ``KernelPCA``'s defaults)."""
    g = 1.0 / x.shape[-1] if gamma is None else gamma
    dot = x @ x.transpose(-1, -2)
    if kernel == "linear":
        return dot
    if kernel == "sigmoid":
        return torch.tanh(g * dot + 1.0)
    if kernel == "poly":
        return (g * dot + 1.0) ** 3
    sq = x.pow(2).sum(-1)
    if kernel == "rbf":
        return torch.exp(-g * (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * dot).clamp_min(0))
    norm = sq.sqrt()
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    return dot / (norm.unsqueeze(-1) * norm.unsqueeze(-2))  # cosine


@method(
    needs="activations",
    fixed_target=False,
    options={"kernel": Option("sigmoid", choice(*KERNELS)), "gamma": Option(None, _gamma)},
)
def kpcacam(at: Layer) -> Tensor:
    r"""KPCA-CAM (Karmani et al., 2024): the first kernel principal component of the activation. Class-agnostic.

    Per sample: :math:`X` the :math:`(HW, K)` activation matrix, channels centred over space;
    :math:`\mathcal K_{ij} = \kappa(x_i, x_j)` (``kernel``: ``"sigmoid"`` :math:`\tanh(\gamma x^\top y + 1)`
    (default), ``"rbf"``, ``"poly"`` (degree 3), ``"linear"``, ``"cosine"``; ``gamma=None`` is
    :math:`1/K`), centred in feature space :math:`\tilde{\mathcal K} = (I - \tfrac1n 1)\mathcal K
    (I - \tfrac1n 1)`; with :math:`(\lambda_1, v_1)` its top eigenpair

    .. math:: L = \sqrt{\lambda_1}\, v_1

    as sklearn's ``KernelPCA(n_components=1).fit_transform`` (grad-cam's ``KPCA_CAM``), in torch (no
    sklearn at run time). The sign of :math:`v_1` is arbitrary: it is chosen to correlate non-negatively
    with :math:`\sum_k A_k` (the eigen methods' rule). ``target`` is ignored.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.kpcacam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer3", kernel="rbf").shape
        torch.Size([1, 64, 64])
    """
    a = at.a
    spatial = a.shape[3:]
    x = a.flatten(3).transpose(-1, -2)  # (B, 1, n, K)
    x = x - x.mean(-2, keepdim=True)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    low = x.dtype in (torch.float16, torch.bfloat16)
    k = kernel_matrix(x.float() if low else x, at.options["kernel"], at.options["gamma"])
    k = k - k.mean(-1, keepdim=True)
    k = k - k.mean(-2, keepdim=True)
    values, vectors = torch.linalg.eigh(k)
    proj = (vectors[..., -1] * values[..., -1:].clamp_min(0).sqrt()).to(a.dtype)  # (B, 1, n)
    proj = signed_like(proj, a.sum(2).flatten(2), (-1,))
    return proj.reshape(*proj.shape[:2], 1, *spatial)


# ------------------------------------------------------------------------------------------ Sobel
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.cvtColor(RGB2GRAY)


@method(needs="activations", fixed_target=False, options={"norm": Option("l1", choice("l1", "l2"))})
def sobel(at: Layer) -> Tensor:
    r"""Sobel edge magnitude of the image: a model-free baseline for the metrics (grad-cam's ``sobel_cam``).

    With :math:`I` the grey image (``0.299 R + 0.587 G + 0.114 B`` for 3 channels, the channel itself for
    1, the channel mean otherwise) and :math:`S_x, S_y` the 3 x 3 Sobel filters (reflect-101 border, as
    cv2):

    .. math:: L = \tfrac12 \big(|S_x * I| + |S_y * I|\big) \quad (\texttt{norm="l1"}, \text{ grad-cam}),
              \qquad L = \sqrt{(S_x * I)^2 + (S_y * I)^2} \quad (\texttt{norm="l2"})

    The signature is every method's, but the model, ``layer`` and ``target`` are ignored (the network up
    to the layer still runs, as for every class-agnostic method). grad-cam works on ``uint8`` images and
    rounds and saturates each term at 255; camfn keeps floats.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.sobel(model, camfn.params(model), torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 64, 64])
    """
    x = at.x
    if x.ndim != 4:
        raise InputError(f"sobel needs 2-d images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 3:
        gray = (x * x.new_tensor(_GRAY).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        gray = x.mean(1, keepdim=True)
    padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")
    sx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sx, sx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    gx, gy = F.conv2d(padded, kernels).unbind(1)
    edges = 0.5 * (gx.abs() + gy.abs()) if at.options["norm"] == "l1" else torch.sqrt(gx**2 + gy**2)
    return edges.reshape(x.shape[0], 1, 1, *x.shape[2:])
