r"""Model-parameter randomisation tests (Adebayo et al., NeurIPS 2018): maps of randomised models.

Two forms, whose numbers differ because they randomise differently:

* :func:`sanity_check` / :func:`randomized` (camfn's): cascading from the top over the modules that own
  parameters, in the order the traced forward uses them; each tensor is *redrawn* from a normal with its own
  mean and std; buffers (BatchNorm statistics) are kept; all sets run in one ``vmap``.
* :func:`mprt` (Quantus 0.6 ``MPRT``): cascading over the modules that have ``reset_parameters``, in
  registration order (``named_modules``), each *reset to its default initialisation* (Kaiming-uniform
  convs, BatchNorm weight 1, bias 0 **and running statistics reset**), under ``torch.manual_seed(seed)``.
  Modules without ``reset_parameters`` (a bare class-token ``nn.Parameter``) are never randomised.

Both report per-layer Spearman correlations with the trained model's map, and the share of flat (constant)
randomised maps: a flat map has correlation 0, which flatters a method whose maps collapse.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..checkpoints import maps_over_params
from ..errors import InputError, OptionError
from ..noise import Seed
from ..tracing import Params, trace
from .common import check_model_input, fixed_class, spearman
from .registry import metric

__all__ = ["Sanity", "flat_maps", "mprt", "randomized", "rank_correlation", "sanity_check"]


class Sanity(NamedTuple):
    """Model-randomisation result.

    ``layers[i]``: the layer randomised at cascade step ``i`` (top layer first; step ``i`` has
    ``layers[0..i]`` randomised). ``correlations``: ``(L, B)`` (``(L, B, T)`` for multi-target maps) Spearman
    correlation between the trained model's map and step ``i``'s map. ``maps``: the randomised maps
    ``(L, B, H, W)``. ``flat``: ``(L, B)`` bool, step ``i``'s map of sample ``b`` is constant (its correlation is
    0 by convention). ``flat_share``: ``(L,)`` the share of flat maps at each step, to read beside each
    correlation.
    """

    layers: list[str]
    correlations: Tensor
    maps: Tensor
    flat: Tensor
    flat_share: Tensor


def rank_correlation(a: Tensor, b: Tensor, ndim: int = 2) -> Tensor:
    r"""Spearman rank correlation over the last ``ndim`` axes, batched over the leading ones (broadcast).

    .. math:: \rho = \mathrm{corr}\big(\mathrm{rank}(a), \mathrm{rank}(b)\big)

    with tied values sharing their average rank (as ``scipy.stats.spearmanr``). A constant input has no
    ranking: its correlation is 0 (scipy gives NaN).

    Example:
        >>> import torch
        >>> from camfn.metrics import rank_correlation
        >>> a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> rank_correlation(a, a**3), rank_correlation(a, -a)
        (tensor([1.]), tensor([-1.]))
    """
    if a.ndim < ndim or b.ndim < ndim or a.shape[a.ndim - ndim :] != b.shape[b.ndim - ndim :]:
        raise InputError(
            f"rank_correlation compares maps of the same spatial size; got {tuple(a.shape)} and {tuple(b.shape)} "
            f"with ndim={ndim}"
        )
    a, b = torch.broadcast_tensors(a, b)
    return spearman(a.flatten(a.ndim - ndim), b.flatten(b.ndim - ndim))


def flat_maps(maps: Tensor, ndim: int = 2) -> Tensor:
    """Bool over the leading axes: the map (last ``ndim`` axes) is constant.

    Example:
        >>> import torch
        >>> from camfn.metrics import flat_maps
        >>> flat_maps(torch.stack([torch.zeros(2, 2), torch.eye(2)]))
        tensor([ True, False])
    """
    flat = maps.flatten(maps.ndim - ndim)
    return (flat == flat[..., :1]).all(-1)


def _result(layers: list[str], trained: Tensor, maps: Tensor, ndim: int) -> Sanity:
    flat = flat_maps(maps, ndim)
    share = flat.flatten(1).double().mean(1) if flat.ndim > 1 else flat.double()
    return Sanity(layers, rank_correlation(trained.unsqueeze(0), maps, ndim=ndim), maps, flat, share)


def _layers_in_order(model: nn.Module, params: Params) -> list[tuple[str, list[str]]]:
    """Modules owning parameters, in the order the traced forward first uses them, with their param keys."""
    owners: dict[str, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        keys = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
        if keys:
            owners.setdefault(path, keys)
    traced = trace(model, hooks="ignore")
    order: list[str] = []
    for node in traced.module.graph.nodes:
        if node.op == "get_attr":
            used = [str(node.target).rpartition(".")[0]]
        elif node.op == "call_module":  # a leaf module, and any parametrised modules inside it
            path = str(node.target)
            used = [o for o in owners if o == path or o.startswith(f"{path}.")]
        else:
            continue
        order += [o for o in used if o in owners and o not in order]
    return [(o, [k for k in owners[o] if k in params]) for o in order if any(k in params for k in owners[o])]


def _check_depth(depth: int | None) -> None:
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise OptionError(f"depth={depth!r}: use a positive number of layers to randomise, or None for all")


def randomized(
    model: nn.Module,
    params: Params,
    seed: Seed = 0,
    *,
    depth: int | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    r"""Stacked parameter sets for the cascading model-randomisation test (Adebayo et al., 2018).

    Layers are the modules with parameters of their own, in the order the traced forward uses them. Set
    ``i`` (``i = 0..L-1``) has the last ``i + 1`` layers re-initialised, top layer first; ``L`` is the number of
    layers, or ``depth`` to stop early. Each parameter tensor ``t`` of a randomised layer is redrawn from
    :math:`N(\mathrm{mean}(t), \mathrm{std}(t)^2)` (its own scale; a 1-element tensor keeps its value as
    mean and gets std 0), from ``seed`` (int or ``torch.Generator``): the same draw is used in every set
    that randomises that layer, so consecutive sets differ in one layer only. Buffers (BatchNorm
    statistics) are kept. The model and ``params`` are only read.

    Returns:
        ``(stacked, names)``: ``stacked[k]`` is ``(L, *params[k].shape)`` (unchanged tensors are expanded,
        not copied), ``names[i]`` the module path randomised at step ``i``.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2, 3))
        >>> stacked, names = camfn.metrics.randomized(model, camfn.params(model), seed=0)
        >>> names, stacked["0.weight"].shape
        (['2', '0'], torch.Size([2, 2, 1, 3, 3]))
    """
    if not isinstance(params, dict):
        raise InputError(f"params must be a dict of tensors (camfn.params(model)), got {type(params).__name__}")
    layers = _layers_in_order(model, params)[::-1]
    _check_depth(depth)
    if depth is not None:
        layers = layers[:depth]
    if not layers:
        raise InputError("the model has no parameters to randomise")
    gen = torch.Generator().manual_seed(seed) if isinstance(seed, int) and not isinstance(seed, bool) else seed
    if not isinstance(gen, torch.Generator):
        raise OptionError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    n = len(layers)
    stacked = {k: v.expand(n, *v.shape) for k, v in params.items()}
    for step, (_, keys) in enumerate(layers):
        for key in keys:
            t = params[key]
            if not t.is_floating_point():
                continue
            ref = t.detach().double().cpu()
            mean, std = ref.mean(), ref.std(unbiased=False)
            draw = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean
            fresh = draw.to(dtype=t.dtype, device=t.device)
            stacked[key] = torch.cat([t.expand(step, *t.shape), fresh.expand(n - step, *t.shape)])
    return stacked, [name for name, _ in layers]


@metric(needs=("model", "method"), higher_is_better=False, output="randomisation")
def sanity_check(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Any = None,
    target: Any = None,
    *,
    seed: Seed = 0,
    depth: int | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> Sanity:
    r"""Model-randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading from the top layer.

    .. math:: \rho_{i,b} = \mathrm{spearman}\big(M(\theta)_b,\; M(\theta^{(i)})_b\big)

    with :math:`\theta^{(i)}` the parameters with the top ``i + 1`` layers randomised (:func:`randomized`).
    The maps of all randomised sets come from one ``torch.func.vmap`` over the stacked parameters
    (:func:`camfn.maps_over_params`; ``chunk_size`` sets at a time, ``None``: all at once; memory grows with
    ``L`` copies of the parameters). ``target=None`` is the trained model's top-1 class, explained by every set.
    ``options`` go to ``method``. A method that passes has correlations falling towards 0 as more layers are
    randomised *and few flat maps* (``flat_share``): a flat map counts as correlation 0.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = camfn.metrics.sanity_check(camfn.gradcam, model, camfn.params(model), torch.rand(2, 3, 8, 8), "0")
        >>> result.layers, result.correlations.shape, result.flat_share.shape
        (['4', '0'], torch.Size([2, 2]), torch.Size([2]))
    """
    check_model_input(model, x)
    target = fixed_class(model, params, x, target, options)
    trained = method(model, params, x, layer, target, **options)
    stacked, names = randomized(model, params, seed, depth=depth)
    maps = maps_over_params(method, model, stacked, x, layer, target, chunk_size=chunk_size, **options)
    return _result(names, trained, maps, x.ndim - 2)


def _reset_layers(model: nn.Module, order: str) -> list[str]:
    names = [n for n, m in model.named_modules() if callable(getattr(m, "reset_parameters", None))]
    if order not in ("top_down", "bottom_up", "independent"):
        raise OptionError(
            f"order={order!r}: use 'top_down' (cascading, Quantus's default), 'bottom_up' or 'independent'"
        )
    return names[::-1] if order == "top_down" else names


@metric(needs=("model", "method"), higher_is_better=False, output="randomisation")
def mprt(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Any = None,
    target: Any = None,
    *,
    seed: int = 43,
    order: str = "top_down",
    depth: int | None = None,
    **options: Any,
) -> Sanity:
    r"""Quantus 0.6 ``MPRT``: model-parameter randomisation by each module's ``reset_parameters``.

    A deep copy of ``model`` carrying ``params`` is randomised module by module (those with
    ``reset_parameters``, last registered first for ``order="top_down"``, cascading; ``"bottom_up"`` cascades
    from the first; ``"independent"`` resets one module at a time), each reset under
    ``torch.manual_seed(seed)`` (the global RNG is saved and restored around it; Quantus seeds ``seed + 1``,
    so camfn's default 43 is Quantus's default 42). Step ``i``'s maps are ``method`` on the copy's parameters,
    explaining the trained model's class for ``target=None``; ``correlations[i]`` their Spearman correlation
    with the trained maps. Deviation: Quantus's ``return_average_correlation`` also averages in the
    unrandomised model (its key ``"original"`` is skipped as ``"orig"``); camfn's per-sample value for
    ``camfn eval`` is the mean over randomised layers only. The user's model is not changed.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = camfn.metrics.mprt(camfn.gradcam, model, camfn.params(model), torch.rand(2, 3, 8, 8), "0")
        >>> result.layers, result.correlations.shape
        (['4', '0'], torch.Size([2, 2]))
    """
    check_model_input(model, x)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"seed={seed!r}: use an int (passed to torch.manual_seed before each reset)")
    _check_depth(depth)
    target = fixed_class(model, params, x, target, options)
    trained = method(model, params, x, layer, target, **options)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        state = dict(copied.named_parameters(remove_duplicate=False)) | dict(
            copied.named_buffers(remove_duplicate=False)
        )
        for key, value in params.items():
            if key in state:
                state[key].copy_(value)
    original = {k: v.detach().clone() for k, v in state.items()}
    names = _reset_layers(copied, order)[:depth]
    if not names:
        raise InputError("the model has no module with reset_parameters to randomise")
    modules = dict(copied.named_modules())
    devices = sorted({t.device.index or 0 for t in state.values() if t.device.type == "cuda"})
    maps = []
    for name in names:
        with torch.no_grad():
            if order == "independent":
                for key, value in original.items():
                    state[key].copy_(value)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                modules[name].reset_parameters()
        current = {k: state[k].detach().clone() for k in params if k in state}
        maps.append(method(model, {**params, **current}, x, layer, target, **options))
    return _result(names, trained, torch.stack(maps), x.ndim - 2)
