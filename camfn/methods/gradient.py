r"""The gradient family: maps from the activation ``A`` and the gradient ``G = dS/dA`` at a layer.

Notation per sample: ``A_k`` the ``k``-th channel (``K x H x W``), ``G_k`` its gradient, sums over
``i, j`` run over the spatial positions, ``Z = HW``. Every method here is one function on
:class:`camfn.driver.Layer` returning the contributions ``C_k`` (the map is ``sum_k C_k``); the public
function is ``method(model, params, x, layer=None, target=None, **options) -> maps`` with ``maps`` of
shape ``(B, H_in, W_in)`` (``(B, T, H_in, W_in)`` for ``(B, T)`` targets; a list for a list of layers).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..chunks import Chunk
from ..driver import Layer, _per_target, method, weighted
from ..errors import LayerError
from ..noise import gaussian
from ..options import Option, choice, chunk, nonnegative, positive_int, seed
from ..postprocess import first_component
from ..pullback import zeros
from ..rewrite import inject
from ..runtime import FORWARD_AD
from ..tracing import Traced

__all__ = [
    "eigengradcam",
    "fullgrad",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "plusplus",
    "segeigencam",
    "shapleycam",
    "smooth_gradcampp",
    "xgradcam",
]


@method(needs="gradients")
def gradcam(at: Layer) -> Tensor:
    r"""Grad-CAM (Selvaraju et al., 2017).

    .. math:: w_k = \frac{1}{Z}\sum_{ij} G_{k,ij}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(2, 3, 64, 64)
        >>> camfn.gradcam(model, camfn.params(model), x, "layer4", 281).shape
        torch.Size([2, 64, 64])
        >>> camfn.gradcam(model, camfn.params(model), x, "layer4", torch.tensor([[1, 2, 3]] * 2)).shape
        torch.Size([2, 3, 64, 64])
    """
    return weighted(at.g.mean(at.space, keepdim=True), at.a)


def plusplus(a: Tensor, g1: Tensor, g2: Tensor, g3: Tensor, eps: float = 1e-6) -> Tensor:
    """Grad-CAM++ contributions from the first three (possibly averaged) gradient powers."""
    space = tuple(range(3, a.ndim))
    alpha = g2 / (2 * g2 + a.sum(space, keepdim=True) * g3 + eps)
    alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
    return weighted((alpha * F.relu(g1)).sum(space, keepdim=True), a)


@method(needs="gradients")
def gradcampp(at: Layer) -> Tensor:
    r"""Grad-CAM++ (Chattopadhay et al., WACV 2018), closed form of Eq. 19 with exponential scores.

    .. math:: \alpha_{k,ij} = \frac{G_{k,ij}^2}{2 G_{k,ij}^2 + \sum_{ab} A_{k,ab}\, G_{k,ij}^3 + \epsilon},
              \quad w_k = \sum_{ij} \alpha_{k,ij}\,\mathrm{ReLU}(G_{k,ij}), \quad L = \sum_k w_k A_k

    with :math:`\alpha = 0` where :math:`G = 0` and :math:`\epsilon = 10^{-6}` (as grad-cam).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return plusplus(at.a, at.g, at.g.pow(2), at.g.pow(3))


@method(needs="gradients")
def xgradcam(at: Layer) -> Tensor:
    r"""XGrad-CAM (Fu et al., BMVC 2020).

    .. math:: w_k = \sum_{ij} \frac{A_{k,ij}}{\sum_{ab} A_{k,ab} + \epsilon} G_{k,ij}, \qquad L = \sum_k w_k A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.xgradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 1).shape
        torch.Size([1, 64, 64])
    """
    s = at.space
    return weighted((at.g * at.a).sum(s, keepdim=True) / (at.a.sum(s, keepdim=True) + 1e-7), at.a)


@method(needs="gradients")
def layercam(at: Layer) -> Tensor:
    r"""LayerCAM (Jiang et al., TIP 2021): element-wise positive gradients.

    .. math:: L = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}(G_k) \odot A_k\Big)

    For several layers pass a list and fuse the per-layer maps with :func:`camfn.fuse`
    (``tanh(2 L)`` per layer, resize, element-wise max).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> p, x = camfn.params(model), torch.randn(1, 3, 64, 64)
        >>> maps = camfn.layercam(model, p, x, ["layer2", "layer3", "layer4"], 7, size=None)
        >>> [m.shape[-1] for m in maps], camfn.fuse(maps, size=(64, 64)).shape
        ([8, 4, 2], torch.Size([1, 64, 64]))
    """
    return F.relu(at.g) * at.a


@method(needs="gradients")
def hirescam(at: Layer) -> Tensor:
    r"""HiResCAM (Draelos & Carin, 2020): gradients times activations, element-wise.

    .. math:: L = \sum_k G_k \odot A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.hirescam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 0).shape
        torch.Size([1, 64, 64])
    """
    return at.g * at.a


@method(needs="gradients")
def gradcam_elementwise(at: Layer) -> Tensor:
    r"""Element-wise Grad-CAM (grad-cam's ``GradCAMElementWise``).

    .. math:: L = \sum_k \mathrm{ReLU}(G_k \odot A_k)

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcam_elementwise(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return F.relu(at.g * at.a)


@method(needs="gradients", eigen=True)
def eigengradcam(at: Layer) -> Tensor:
    r"""Eigen-Grad-CAM: first principal component of ``G * A`` over space.

    With :math:`X` the :math:`(HW, K)` matrix of :math:`G \odot A`, channels centred over space, and
    :math:`X = U S V^\top`: :math:`L = X v_1`, signed to correlate non-negatively with
    :math:`\sum_k G_k \odot A_k`.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.eigengradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return at.g * at.a


@method(
    needs="forward",
    options={
        "n": Option(4, positive_int),
        "std": Option(0.3, nonnegative),
        "seed": Option(0, seed),
        "chunk_size": Option(None, chunk),
    },
)
def smooth_gradcampp(at: Layer) -> Tensor:
    r"""Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with gradient moments averaged over noisy inputs.

    With :math:`G_i = \partial S / \partial A` at :math:`x + \epsilon_i`,
    :math:`\epsilon_i \sim \mathcal N(0, \mathrm{std}^2)` and :math:`D_p = \frac1n \sum_i G_i^p`:

    .. math:: \alpha = \frac{D_2}{2 D_2 + \sum_{ab} A_{ab}\, D_3 + \epsilon}, \quad
              w_k = \sum_{ij} \alpha_{k,ij}\, \mathrm{ReLU}(D_{1,k,ij}), \quad L = \sum_k w_k A_k

    with :math:`A` the *clean* activation and the target (``None``: the clean top-1 class) fixed across
    noisy copies (torchcam mixes the last noisy activation in; camfn does not). Options: ``n`` noisy
    copies, ``std``, ``seed`` (int or ``torch.Generator``; noise shared by the batch), ``chunk_size``
    noisy copies of the batch per pass (``None``: all ``n`` in one pass). ``std=0`` gives :func:`gradcampp`.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.smooth_gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3, n=2).shape
        torch.Size([1, 64, 64])
    """
    opts, x = at.options, at.x
    n: int = opts["n"]
    noise = gaussian((n, *x.shape[1:]), opts["std"], opts["seed"], dtype=x.dtype, device=x.device)

    def moments(idx: Tensor) -> Tensor:
        g = at.gradients_at(x.unsqueeze(0) + noise.index_select(0, idx).unsqueeze(1))
        return torch.stack([g.sum(0), g.pow(2).sum(0), g.pow(3).sum(0)])

    size: Chunk = opts["chunk_size"]
    sums = at.chunks(moments, n, None if size == "auto" else size, "smooth_gradcampp", combine="sum")
    return plusplus(at.a, *(sums / n).unbind(0))


@method(needs="gradients")
def segeigencam(at: Layer) -> Tensor:
    r"""Seg-Eigen-CAM (Chung & Ying, Appl. Sci. 2025): first principal component of ``|G| * A``.

    With :math:`X` the :math:`(HW, K)` matrix of :math:`|G| \odot A` (Eq. 10), channels centred over
    space, and :math:`X = U S V^\top`: :math:`L = \pm X v_1`, the sign flipped when
    :math:`|\min L| > |\max L|` (Eq. 13), as grad-cam master's ``SegEigenCAM``.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.segeigencam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer3", 2).shape
        torch.Size([1, 64, 64])
    """
    return first_component(at.g.abs() * at.a, ndim=at.a.ndim - 3, sign="extreme").unsqueeze(2)


def pull_targets(pull: Callable[[Tensor], tuple[Tensor, ...]], s: Tensor) -> tuple[Tensor, ...]:
    """A vjp's pullback applied to every target column of scores ``s`` ((B,) or (B, T)): each ``(B, T, ...)``."""
    if s.ndim == 1:
        return tuple(g.unsqueeze(1) for g in pull(torch.ones_like(s)))
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    return tuple(g.movedim(0, 1) for g in vmap(pull)(eye[:, None, :].expand(s.shape[1], *s.shape)))


def gradient_and_hvp(at: Layer) -> tuple[Tensor, Tensor]:
    """``G = dS/dA`` and ``H A`` (``(B, T, K, *s)``, map frame) by one ``jvp`` of the pullback at the layer.

    Only the part of the network after the layer runs (``needs="cut"``). Forward-over-reverse runs under
    the math attention kernel: the fused CPU attention kernels have no forward-mode derivative (nor a
    double backward). Calls from several threads take turns (:data:`camfn.runtime.FORWARD_AD`; compiled calls take it in
    :class:`camfn.Compiled`).
    """
    call = at.call
    params, score, tail, extras = call.params, call.score, at.cut.tail, at.extras

    def gradient(delta: Tensor) -> Tensor:
        s, pull = vjp(lambda d: score(tail(params, at.raw + d, *extras)), delta)
        return pull_targets(pull, s)[0]

    serial = contextlib.nullcontext() if torch.compiler.is_compiling() else FORWARD_AD
    with serial, sdpa_kernel([SDPBackend.MATH]):
        g, hvp = jvp(gradient, (torch.zeros_like(at.raw),), (at.raw,))
    return _per_target(at.to_maps, g), _per_target(at.to_maps, hvp)


@method(needs="cut", forward_ad=True)
def shapleycam(at: Layer) -> Tensor:
    r"""ShapleyCAM (Cai et al., arXiv 2501.06261): gradient weights corrected by the Hessian.

    .. math:: w_k = \frac{1}{Z} \sum_{ij} \Big(G - \tfrac12\, H A\Big)_{k,ij}, \qquad L = \sum_k w_k A_k

    with :math:`H A = \frac{d}{d\epsilon} G(A + \epsilon A)\big|_{\epsilon=0}` the Hessian-vector
    product of the score w.r.t. the layer in the direction of :math:`A`, computed by one forward-mode
    ``torch.func.jvp`` of the pullback (forward-over-reverse, not a double backward). This also works on
    transformers with fused attention (``scaled_dot_product_attention``), where grad-cam's double
    backward fails on the CPU: camfn runs the product under the math attention kernel. The paper and
    grad-cam pair it with the target :func:`camfn.targets.rest`.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> camfn.shapleycam(model, camfn.params(model), x, "layer4", camfn.targets.rest(3)).shape
        torch.Size([1, 64, 64])
    """
    g, hvp = gradient_and_hvp(at)
    return weighted((g - 0.5 * hvp).mean(at.space, keepdim=True), at.a)


# ---------------------------------------------------------------------------------------- FullGrad
_CONV_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
}  # fmt: skip
_BN_OPS = {"batch_norm", "_native_batch_norm_legit_no_training"}  # eval BatchNorm in an exported graph


def bias_layers(trace: Traced) -> tuple[tuple[str, str, tuple[str, str, str, float] | None], ...]:
    """``(node, bias key, BatchNorm)`` of every conv (``BatchNorm=None``) and eval BatchNorm layer with a bias,
    ``BatchNorm = (weight key, running-mean key, running-variance key, eps)``; keys of ``params``; cached.

    In a torch.fx graph the layers are ``nn.Conv*`` / ``nn.BatchNorm*`` modules; in an exported graph (and a
    ``model_fn``'s) they are the aten calls ``conv2d`` / ``convolution`` (bias: the third argument) and
    ``batch_norm`` / ``_native_batch_norm_legit_no_training`` (affine, with running statistics), whose
    tensors are parameter reads: the same layers, so every tracer gives the same map."""
    if trace.cache.biases is None:
        graph = trace.module.graph
        find = _module_biases if trace.tracer == "fx" else _aten_biases
        trace.cache.biases = tuple(found for node in graph.nodes if (found := find(trace, node)) is not None)
    return trace.cache.biases


def _module_biases(trace: Traced, node: fx.Node) -> tuple | None:
    if node.op != "call_module":
        return None
    module, path = trace.module.get_submodule(node.target), str(node.target)
    if isinstance(module, nn.modules.conv._ConvNd) and module.bias is not None:
        return node.name, f"{path}.bias", None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.running_mean is not None:
        return node.name, f"{path}.bias", (f"{path}.weight", f"{path}.running_mean", f"{path}.running_var", module.eps)
    return None


def _aten_biases(trace: Traced, node: fx.Node) -> tuple | None:
    if node.op != "call_function":
        return None
    name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
    if name not in _CONV_OPS and name not in _BN_OPS:
        return None
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)

    def key(arg: str) -> str | None:
        value = args.get(arg)
        if value is None:
            return None
        if isinstance(value, fx.Node) and value.op == "get_attr" and value.target in trace.state_keys:
            return str(value.target)
        raise LayerError(
            f"fullgrad needs the {arg} of {trace.qualname.get(node.name, node.name)!r} as a parameter of the model, "
            f"but the graph computes it ({value}); read it as is from params (a model_fn: p['b'], not a function "
            "of it), or for a module explain it with tracer='fx'"
        )

    bias = key("bias")
    if name in _CONV_OPS or bias is None:
        return None if bias is None else (node.name, bias, None)
    weight, mean, var = key("weight"), key("running_mean"), key("running_var")
    if weight is None or mean is None or var is None or args.get("training", False):
        return None
    out = node
    if name != "batch_norm":  # returns (output, mean, invstd): the layer's output is item 0
        out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
        if out is None:
            return None
    return out.name, bias, (weight, mean, var, float(args["eps"]))


def effective_bias(at: Layer, bias: str, bn: tuple[str, str, str, float] | None) -> Tensor:
    """A conv's bias, or an eval BatchNorm's ``beta - mu gamma / sqrt(var + eps)``, read from ``params``."""
    call = at.call

    def get(key: str) -> Tensor:
        return call.params[key] if key in call.params else call.trace.defaults[key]

    if bn is None:
        return get(bias)
    weight, mean, var, eps = bn
    return get(bias) - get(mean) * get(weight) / torch.sqrt(get(var) + eps)


def _rescale(t: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    t = t - t.amin(dims, keepdim=True)
    return t / (t.amax(dims, keepdim=True) + eps)


@method(needs="forward", options={"scaling": Option("paper", choice("paper", "gradcam"))})
def fullgrad(at: Layer) -> Tensor:
    r"""FullGrad (Srinivas & Fleuret, NeurIPS 2019): input-gradient and bias-gradients of every layer.

    .. math:: L = \psi\big(|x \odot \nabla_x S|\big) + \sum_{l} \sum_{k} \psi\big(|b_{l,k}\,
              G_{l,k}|\big)

    over every conv and BatchNorm layer ``l`` with a bias, :math:`G_l = \partial S / \partial`
    (the layer's output) and :math:`b_l` its bias (eval BatchNorm: the effective bias
    :math:`\beta - \mu\gamma / \sqrt{\sigma^2 + \epsilon}`). All gradients come from *one* pullback:
    the graph is injected at every bias layer at once and the input gradient is taken in the same vjp.
    :math:`\psi` is the post-processing, the option ``scaling``:

    * ``"paper"`` (default, the authors' implementation): per sample and layer, min-max over all
      channels and positions (``/ (max + 1e-6)``), bilinear upsampling to the input size
      (``align_corners=True``), sum over channels;
    * ``"gradcam"`` (grad-cam's ``FullGrad``): min-max of each channel separately (``/ (max + 1e-7)``),
      bilinear resize (``align_corners=False``), sum over channels: every channel weighs the same, not
      every layer.

    The method is *layer-free*: it uses every bias layer of the network, so ``layer`` (and ``layout``) are
    ignored (they are still resolved, like every method's). Bias layers are found as modules of a torch.fx
    graph, or as the aten conv and batch-norm calls of an exported graph (``tracer="export"``, Hugging Face
    models, a ``model_fn``): the maps agree. Linear and LayerNorm biases are not spatial and not used (as in
    the paper's code and grad-cam's).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.fullgrad(model, camfn.params(model), torch.randn(1, 3, 64, 64), target=5).shape
        torch.Size([1, 64, 64])
    """
    call, x = at.call, at.x
    layers = bias_layers(call.trace)
    injected = inject(call.trace, [node for node, _, _ in layers])
    params, score = call.params, call.score

    def scores_of(inputs: Tensor, *deltas: Tensor) -> Tensor:
        return score(injected.program(params, inputs, *deltas)[0])

    s, pull = vjp(scores_of, x, *zeros(injected, x))
    grads = pull_targets(pull, s)
    paper = at.options["scaling"] == "paper"
    spatial = x.shape[2:]
    nd = len(spatial)
    space = tuple(range(-nd, 0))
    dims = (-nd - 1, *space) if paper else space
    eps = 1e-6 if paper else 1e-7
    total = _rescale((grads[0] * x.unsqueeze(1)).abs(), dims, eps).sum(2)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
    for (_, bias, bn), g in zip(layers, grads[1:], strict=True):
        b = effective_bias(at, bias, bn).reshape(-1, *([1] * nd))
        m = _rescale((b * g).abs(), dims, eps).sum(2)  # (B, T, h, w): the resize is linear, so sum first
        if tuple(m.shape[-nd:]) != tuple(spatial):
            m = F.interpolate(m, size=tuple(spatial), mode=mode, align_corners=paper)
        total = total + m
    return total.unsqueeze(2)
