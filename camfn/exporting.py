r"""Export a method as a deployable program: ``camfn.export(method, model, layer, example_x, **options)``.

The result is a ``torch.export.ExportedProgram`` of

.. math:: (x, t) \mapsto \big(f_\theta(x),\ \mathrm{method}(f, \theta, x, \mathrm{layer}, t, \ldots)\big)

with the model's parameters and buffers :math:`\theta` lifted as program state (``ep.state_dict``), a
dynamic batch dimension, and nothing of camfn inside: ``torch.export.load`` runs it where camfn is not
installed. ``t`` is a ``(B,)`` long tensor of class indices; a negative index stands for the sample's
top-1 class (``f_\theta(x)`` is returned alongside, so one call gives the prediction and its map).

How: the method runs once eagerly on one sample of ``example_x`` (every value check, the trace and the
graph rewrites, shape propagation, the noise drawn from the int ``seed`` under :func:`camfn.noise.pinned`);
then its pure core is traced for one sample by ``make_fx`` under :func:`camfn.runtime.tracing_for_export`
(no value reads, no fast paths, noise replayed as constants), and ``torch.export`` exports that graph
mapped over the batch, sample by sample (``torch._higher_order_ops.map``; ``vmap`` would pin the batch
size: its convolution rule specialises it). A sample's map never depends on the rest of the batch
(BatchNorm in eval mode, noise shared by the batch), so the program equals the method on any batch.
``package="model.pt2"`` also compiles it ahead of time with AOTInductor
(``torch._inductor.aoti_load_package`` loads it).

Example:
    >>> import torch, camfn
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    >>> program = camfn.export(camfn.gradcam, net, "1", torch.randn(1, 3, 8, 8))
    >>> x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, -1])
    >>> output, maps = program.module()(x, t)
    >>> output.shape, maps.shape
    (torch.Size([3, 2]), torch.Size([3, 8, 8]))
    >>> bool(torch.allclose(maps[:2], camfn.gradcam(net, camfn.params(net), x[:2], "1", t[:2]), atol=1e-6))
    True
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._higher_order_ops.map import map as map_samples
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

from .driver import REGISTRY, Maps
from .errors import InputError, OptionError
from .layer_names import Layer
from .noise import pinned
from .runtime import tracing_for_export
from .targets import pick
from .tracing import Params, apply, params

__all__ = ["add_arguments", "command", "export"]

Method = Callable[..., Maps]


_TRACE_OPTIONS = ("tracer", "hooks", "tracer_options", "model_kwargs")


def _check(method: Method, model: object, example_x: object, options: dict[str, Any]) -> None:
    name = getattr(method, "__name__", None)
    if not isinstance(name, str) or REGISTRY.get(name) is not method:
        got = getattr(method, "__name__", type(method).__name__)
        raise InputError(f"camfn.export needs a method of camfn.METHODS (e.g. camfn.gradcam), got {got!r}")
    if not isinstance(model, nn.Module):
        raise InputError(
            f"camfn.export needs an nn.Module (its parameters become the program's state), got {type(model).__name__}"
        )
    if not isinstance(example_x, Tensor) or example_x.ndim < 3:
        raise InputError(f"example_x must be an input batch (B, C, H, W), got {type(example_x).__name__}")
    if isinstance(options.get("seed"), torch.Generator):
        raise OptionError("camfn.export bakes the noise in from an int seed; pass seed=<int>, not a torch.Generator")
    if options.get("aug_smooth"):
        raise OptionError("aug_smooth is not supported by camfn.export; average exported maps yourself")
    if options.get("progress"):
        raise OptionError("progress=True has no meaning in an exported program; drop it")


def _is_zeros(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        node.target in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default)
        or (node.target is torch.ops.aten.full.default and node.args[1] == 0)
    )


def _shared_forward(graph: fx.GraphModule) -> fx.GraphModule:
    """Drop the zero perturbations (``A + 0 = A``) and merge identical nodes (CSE): the clean forward and
    the method's own forward become one. Exact up to the sign of zero; needs a functional graph."""
    for node in graph.graph.nodes:
        if node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        before, after = getattr(a, "meta", {}).get("val"), node.meta.get("val")
        same = before is not None and after is not None and (before.shape, before.dtype) == (after.shape, after.dtype)
        if same and _is_zeros(b):
            node.replace_all_uses_with(a)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    merged = CSEPass(banned_ops=get_CSE_banned_ops()).call(graph).graph_module
    merged.graph._codegen = graph.graph._codegen  # keeps the pytree calling convention (params dict, x, t)
    merged.recompile()
    return merged


def _top1(output: Any, target: Tensor, selector: Any) -> Tensor:
    """``target`` with negative entries replaced by the top-1 class of ``(B, C)`` logits."""
    logits = pick(output, selector)
    if isinstance(logits, Tensor) and logits.ndim == 2:
        return torch.where(target < 0, logits.argmax(1), target)
    return target


class _Program(nn.Module):
    """The model's parameters and buffers under the model's own keys, and ``forward(x, target)``: the
    traced ``core``, mapped over the batch when it was traced for one sample (``per_sample``)."""

    def __init__(self, model: nn.Module, core: fx.GraphModule, per_sample: bool) -> None:
        super().__init__()
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}  # tied tensors: key -> the key that holds it
        for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
            for key, value in named(remove_duplicate=False):
                if id(value) in first:
                    aliases[key] = first[id(value)]
                    continue
                first[id(value)] = key
                *path, name = key.split(".")
                holder: nn.Module = self
                for part in path:
                    if part not in holder._modules:
                        holder.add_module(part, nn.Module())
                    holder = holder._modules[part]
                if kind == "parameter":
                    holder.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
                else:
                    holder.register_buffer(name, value.detach())
        object.__setattr__(self, "_core", core)  # not a submodule: its tensors (noise) are constants
        object.__setattr__(self, "_aliases", aliases)
        self.per_sample = per_sample

    def forward(self, x: Tensor, target: Tensor) -> Any:
        named = self.state_dict(keep_vars=True)
        keys, aliases = list(named), self._aliases

        def state(tensors: Sequence[Tensor]) -> Params:
            by_key = dict(zip(keys, tensors, strict=True))
            return {**by_key, **{key: by_key[held] for key, held in aliases.items()}}

        if not self.per_sample:
            return self._core(state(list(named.values())), x, target)

        def one(sample: tuple[Tensor, Tensor], *tensors: Tensor) -> Any:
            xi, ti = sample
            output, maps = self._core(state(tensors), xi.unsqueeze(0), ti.unsqueeze(0))
            return torch.utils._pytree.tree_map(lambda t: t.squeeze(0), (output, maps))

        return map_samples(one, (x, target), *named.values())


def export(
    method: Method,
    model: nn.Module,
    layer: Layer | Sequence[Layer] | None,
    example_x: Tensor,
    *,
    package: str | Path | None = None,
    batch: int | None = None,
    **options: Any,
) -> torch.export.ExportedProgram:
    """``method`` on ``model`` at ``layer`` as an ``ExportedProgram`` ``(x, target) -> (output, maps)``.

    ``x``: ``(B, C, H, W)`` with any ``B >= 1`` and the spatial size of ``example_x``; ``target``: ``(B,)``
    long class indices, negative for the top-1 class. ``output`` is the model's output, ``maps`` the
    method's maps, equal to ``method(model, camfn.params(model), x, layer, target, **options)``.
    Parameters and buffers are the program's state (``ep.state_dict``), not constants. Noise
    (``smooth_gradcampp``, ``sscam``) is drawn once from the int ``seed`` and baked in as constants.
    ``batch``: ``None`` (any batch size; the program runs sample by sample) or an int (that batch size
    only, one batched pass: faster on a CPU). ``package``: also write an AOTInductor package there
    (``torch._inductor.aoti_load_package(path)`` returns a callable of ``(x, target)``). Save the program
    with ``torch.export.save(ep, "maps.pt2")``.
    See the module docstring for how the value checks stay out of the program.
    """
    _check(method, model, example_x, options)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise OptionError(f"batch={batch!r}: use None (any batch size) or a positive int (that batch size only)")
    p = params(model)
    example = example_x[:1].detach().expand(batch or 1, *example_x.shape[1:]).contiguous()
    noise: dict[tuple, Tensor] = {}
    with pinned(noise), torch.no_grad():  # every check, trace, rewrite and draw, once, eagerly
        method(model, p, example, layer, None, **options)
    trace_options = {k: options[k] for k in _TRACE_OPTIONS if k in options}

    def core(state: Params, x: Tensor, target: Tensor) -> tuple[Any, Maps]:
        output = apply(model, state, x, **trace_options)
        return output, method(model, state, x, layer, _top1(output, target, options.get("output")), **options)

    example_target = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
    with pinned(noise), tracing_for_export():
        fake = make_fx(torch.func.functionalize(core), tracing_mode="fake", _allow_non_fake_inputs=True)
        graph = fake(p, example, example_target)
    graph = _shared_forward(graph)
    module = _Program(model, graph, per_sample=batch is None)
    if batch is None:
        dim = torch.export.Dim("batch", min=1)
        x2, t2 = example.expand(2, *example.shape[1:]).contiguous(), example_target.expand(2).contiguous()  # not 1
        program = torch.export.export(
            module, (x2, t2), dynamic_shapes={"x": {0: dim}, "target": {0: dim}}, strict=False
        )
    else:
        program = torch.export.export(module, (example, example_target), strict=False)
    if package is not None:
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    program.example_inputs = None  # torch.export.save would pickle them (data/sample_inputs)
    return program


# ------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``camfn export`` (besides ``--model``, ``--weights`` and ``--size``)."""
    parser.add_argument("--method", default="gradcam", help="the method (default gradcam)")
    parser.add_argument("--layer", help="layer to explain (default: the last spatial one)")
    parser.add_argument("--out", default="maps.pt2", help="the program file (default maps.pt2)")
    parser.add_argument("--batch", type=int, help="a fixed batch size: one batched pass (default: any batch size)")
    parser.add_argument("--aoti", action="store_true", help="write an AOTInductor package instead (slow to compile)")


def command(args: argparse.Namespace) -> int:
    """``camfn export``: write the program ``(x, target) -> (output, maps)`` of one method to ``--out``."""
    from .cli import parse_methods
    from .zoo import load_model

    names = parse_methods(args.method)
    if len(names) != 1:
        raise OptionError(f"--method {args.method!r}: camfn export writes one method's program; name one")
    loaded = load_model(args.model, Path(args.weights) if args.weights else None)
    size = args.size or loaded.size
    h, w = (size, size) if isinstance(size, int) else size
    layer = args.layer or loaded.layer
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example_x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))  # for the checks and shapes
    program = export(
        REGISTRY[names[0]],
        loaded.module,
        layer,
        example_x,
        package=out if args.aoti else None,
        batch=args.batch,
        hooks=loaded.hooks,
    )
    if not args.aoti:
        torch.export.save(program, out)
    if not args.quiet:
        kind = "AOTInductor package" if args.aoti else "program"
        where = layer or "the default layer"
        b = args.batch or "B"
        print(f"wrote {out}: {kind} of {names[0]} at {where}: (x ({b}, 3, {h}, {w}), target ({b},)) -> (output, maps)")
    return 0
