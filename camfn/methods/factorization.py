r"""Deep Feature Factorization (Collins et al., ECCV 2018): concepts by non-negative matrix factorisation.

:func:`dff` does not return one map per target, so it is not a method of :data:`camfn.METHODS`: it returns
the concepts, the per-image concept maps ``(B, n, H, W)`` and, given a classifier head, each concept's top
classes. :func:`nmf` is the factorisation itself (HALS, in torch, seeded; no sklearn at run time), and
:func:`camfn.viz.concepts_overlay` draws the concept maps over an image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..driver import Layer, Spec, explain
from ..errors import LayerError, OptionError
from ..layer_names import Layer as LayerName
from ..noise import Seed, gaussian
from ..postprocess import finish
from ..runtime import concrete
from ..tracing import Model, Params

__all__ = ["Factorization", "dff", "nmf"]


def nmf(v: Tensor, n: int, *, seed: Seed = 0, max_iter: int = 500, tol: float | None = 1e-5) -> tuple[Tensor, Tensor]:
    r"""Non-negative matrix factorisation ``V ~ W H`` (Frobenius loss) by HALS, seeded.

    ``v`` ``(m, N) >= 0``; returns ``W`` ``(m, n)`` and ``H`` ``(n, N)``, both ``>= 0``, minimising
    :math:`\lVert V - W H \rVert_F` by hierarchical alternating least squares (Cichocki & Phan 2009: exact
    column-wise updates :math:`w_j \leftarrow \max(0, w_j + ((V H^\top)_j - W (H H^\top)_j) /
    (H H^\top)_{jj})`, and likewise for the rows of ``H``), the same coordinate descent as sklearn's
    default ``NMF(solver="cd")``. Initialisation as sklearn's ``init="random"``:
    :math:`|\mathcal N(0, 1)| \sqrt{\bar V / n}`, drawn from ``seed`` (:func:`camfn.noise.gaussian`: the
    same numbers inside ``vmap`` and, replayed, inside :func:`camfn.compiled`). Stops after ``max_iter``
    sweeps or when the relative decrease of the error over 10 sweeps is below ``tol``. That test reads
    values, so inside ``torch.func`` transforms (``vmap``) and ``torch.compile`` exactly ``max_iter`` sweeps
    run (as with ``tol=None`` eagerly); compile unrolls the sweeps, so keep ``max_iter`` small there.

    Example:
        >>> import torch
        >>> from camfn.methods.factorization import nmf
        >>> w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
        >>> h0 = torch.tensor([[1.0, 0.0, 3.0, 0.5], [0.0, 2.0, 1.0, 0.0]])
        >>> w, h = nmf(w0 @ h0, 2)
        >>> bool(torch.linalg.norm(w0 @ h0 - w @ h) < 1e-5)
        True
    """
    if v.ndim != 2 or not v.is_floating_point():
        raise OptionError(f"nmf needs a 2-d float matrix, got {tuple(v.shape)} {v.dtype}")
    readable = concrete(v)
    if readable and (bool((v < 0).any()) or not bool(torch.isfinite(v).all())):
        raise OptionError("nmf needs a finite non-negative matrix; subtract each row's minimum first (as dff does)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"n={n!r}: use a positive number of components")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise OptionError(f"max_iter={max_iter!r}: use a positive number of sweeps")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0):
        raise OptionError(f"tol={tol!r}: use a non-negative number, or None for exactly max_iter sweeps")
    m, cols = v.shape
    scale = (v.mean() / n).sqrt()
    draw = gaussian((n * cols + m * n,), 1.0, seed, dtype=v.dtype, device=v.device).abs()
    h = draw[: n * cols].reshape(n, cols) * scale
    w = draw[n * cols :].reshape(m, n) * scale
    tiny = torch.finfo(v.dtype).tiny
    early = readable and tol is not None
    previous = torch.linalg.norm(v - w @ h) if early else None
    for sweep in range(1, max_iter + 1):
        w = _hals(w, v @ h.T, h @ h.T, tiny)
        h = _hals(h.T, v.T @ w, w.T @ w, tiny).T  # the rows of H are the columns of H^T, with V^T ~ H^T W^T
        if early and sweep % 10 == 0:
            error = torch.linalg.norm(v - w @ h)
            if previous - error <= tol * previous:
                break
            previous = error
    return w, h


def _hals(w: Tensor, vh: Tensor, hh: Tensor, tiny: float) -> Tensor:
    """One HALS sweep over the columns of ``w`` for ``V ~ W H`` given ``vh = V H^T`` and ``hh = H H^T``;
    each column's update sees the columns updated before it. Functional (no in-place write), so it runs
    under ``vmap`` and ``torch.compile``."""
    cols = list(w.unbind(1))
    for j in range(len(cols)):
        current = torch.stack(cols, 1)
        cols[j] = (cols[j] + (vh[:, j] - current @ hh[:, j]) / hh[j, j].clamp_min(tiny)).clamp_min(0)
    return torch.stack(cols, 1)


class Factorization(NamedTuple):
    r"""What :func:`dff` returns.

    ``concepts`` ``(K, n)``: each concept's channel vector (grad-cam's convention: ``W`` plus the channel
    offset); ``maps`` ``(B, n, H, W)``: each image's concept maps, min-max per map, resized as ``size``;
    ``classes`` / ``scores`` ``(n, top_k)``: each concept's top classes under ``head`` and their softmax
    probabilities (``None`` without a head); ``error``: the reconstruction error
    :math:`\lVert V - W H \rVert_F`.
    """

    concepts: Tensor
    maps: Tensor
    classes: Tensor | None
    scores: Tensor | None
    error: Tensor


def _activation(at: Layer) -> Tensor:
    return at.a.unsqueeze(2)  # the driver sums axis 2: (B, 1, 1, K, ...) -> the activation (B, 1, K, ...)


_ACTIVATION = Spec("dff", _activation, "activations", {}, fixed_target=False)


def dff(
    model: Model,
    params: Params,
    x: Tensor,
    layer: LayerName | None = None,
    n: int = 5,
    *,
    head: Callable[[Tensor], Tensor] | None = None,
    top_k: int = 2,
    seed: Seed = 0,
    max_iter: int = 500,
    tol: float | None = 1e-5,
    size: Any = "input",
    **options: Any,
) -> Factorization:
    r"""Deep Feature Factorization (Collins et al., ECCV 2018): ``n`` concepts shared by a batch of images.

    With :math:`A` the layer's activation ``(B, K, h, w)`` reshaped to :math:`V_0` ``(K, B h w)`` and
    :math:`o_k = \min V_{0,k}` each channel's minimum, :math:`V = V_0 - o \ge 0` is factorised as
    :math:`V \approx W H` (:func:`nmf`, ``n`` components, seeded). Then, as grad-cam's
    ``DeepFeatureFactorization``: the concepts are :math:`W + o` ``(K, n)``, the maps are the rows of
    :math:`H` reshaped to ``(B, n, h, w)``, each min-max normalised and resized to ``size`` (``"input"``,
    ``None`` or a tuple), and with ``head`` (a callable on ``(n, K)`` concept embeddings returning
    ``(n, C)`` logits, e.g. the model's final linear layer) each concept's ``top_k`` classes by softmax
    probability. This is not a method of :data:`camfn.METHODS` (it returns concepts and per-concept maps,
    not one map per target); ``options`` are the methods' shared ones (``tracer``, ``hooks``, ``layout``...).

    Under ``torch.func.vmap`` over images each image is factorised on its own (a loop of one-image calls),
    over stacked parameter sets each set's activations are; :func:`camfn.compiled` works too
    (``camfn.compiled(dff, model, layer, n=3, max_iter=50)(params, x)``). In both the stopping test
    ``tol`` cannot read values, so exactly ``max_iter`` sweeps run: equal to an eager call with
    ``tol=None``. The init is drawn outside the transform from ``seed`` (an int under compile).

    Example:
        >>> import torch, torchvision, camfn
        >>> from camfn.methods.factorization import dff
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> out = dff(model, camfn.params(model), torch.randn(2, 3, 64, 64), "layer4", n=3, head=model.fc)
        >>> out.concepts.shape, out.maps.shape, out.classes.shape
        (torch.Size([512, 3]), torch.Size([2, 3, 64, 64]), torch.Size([3, 2]))
    """
    if layer is not None and not isinstance(layer, str | torch.nn.Module):
        raise LayerError(f"dff factorises one layer; got {layer!r}: pass one layer name")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise OptionError(f"top_k={top_k!r}: use a positive number of classes per concept")
    raw = {**options, "relu": False, "size": None, "normalize": False}
    a = explain(_ACTIVATION, model, params, x, layer, None, raw).detach()  # (B, K, h, w)
    batch, k, spatial = a.shape[0], a.shape[1], a.shape[2:]
    v0 = a.movedim(1, 0).reshape(k, -1)
    v0 = torch.where(torch.isfinite(v0), v0, torch.zeros_like(v0))
    offset = v0.amin(1, keepdim=True)
    v = v0 - offset
    w, h = nmf(v, n, seed=seed, max_iter=max_iter, tol=tol)
    error = torch.linalg.norm(v - w @ h)
    concepts = w + offset
    maps = h.reshape(n, batch, *spatial).movedim(0, 1)
    maps = finish(maps, x, relu=False, size=size, normalize=True)
    classes = scores = None
    if head is not None:
        try:
            with torch.no_grad():
                logits = head(concepts.T.to(x.dtype))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise OptionError(
                f"head failed on the ({n}, {k}) concept embeddings of layer {layer!r}: {error}; pass a head that "
                f"maps {k} channels to class logits (e.g. the model's final linear layer after this layer)"
            ) from error
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise OptionError(f"head returned {got} for ({n}, {k}) concepts; it must return ({n}, num_classes) logits")
        scores, classes = logits.softmax(1).topk(min(top_k, logits.shape[1]), dim=1)
    return Factorization(concepts, maps, classes, scores, error)
