r"""Attention methods: LeGrad, on a rewrite of the traced graph that exposes each block's attention.

Fused attention hides the post-softmax probabilities :math:`P = \mathrm{softmax}(q k^\top s)`: torchvision's
ViT calls ``nn.MultiheadAttention`` (a leaf module, with ``need_weights=False``) and timm's calls
``F.scaled_dot_product_attention`` (Hugging Face ``attn_implementation="sdpa"``: the exported
``aten.scaled_dot_product_attention``). :func:`explicit_attention` rewrites the traced graph (never the model)
so each attention is computed explicitly from the same weights, with :math:`P` a node of its own that the
usual zero-perturbation injection can differentiate; the rewritten graph computes the same output. An explicit
``softmax(...) @ v`` (Hugging Face ``"eager"``) is used as it is. Windowed attention (Swin) counts only where a
stage is one window.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from ..adapters import defaults
from ..driver import num_classes
from ..errors import LayerError, OptionError
from ..layout import Tokens, grid_of, resolve_tokens
from ..options import Option, choice, validate
from ..postprocess import finish
from ..rewrite import Program, program
from ..runtime import eager
from ..targets import Target, scores
from ..tracing import Model, Params, Traced
from .composite import composite, trace_with

__all__ = ["explicit_attention", "legrad", "mha_output", "mha_probabilities", "sdpa_probabilities"]


# --------------------------------------------------------------------------------- explicit attention
def _heads(t: Tensor, heads: int) -> Tensor:
    """``(B, N, E)`` -> ``(B, heads, N, E / heads)``."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def mha_probabilities(query: Tensor, key: Tensor, in_w: Tensor, in_b: Tensor | None, heads: int) -> Tensor:
    r"""``nn.MultiheadAttention``'s (batch first) attention probabilities ``(B, heads, N, M)``.

    .. math:: P = \mathrm{softmax}\big(q k^\top / \sqrt{d}\big), \quad q = x W_q^\top + b_q,\; k = x W_k^\top + b_k
    """
    e = query.shape[-1]
    w_q, w_k, _ = in_w.split(e)
    b_q, b_k = (None, None) if in_b is None else in_b.split(e)[:2]
    q, k = _heads(F.linear(query, w_q, b_q), heads), _heads(F.linear(key, w_k, b_k), heads)
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)


def mha_output(
    p: Tensor, value: Tensor, in_w: Tensor, in_b: Tensor | None, out_w: Tensor, out_b: Tensor | None, heads: int
) -> tuple[Tensor, None]:
    """``nn.MultiheadAttention``'s output ``(attn_output, None)`` from the probabilities ``p``."""
    e = value.shape[-1]
    w_v, b_v = in_w.split(e)[2], None if in_b is None else in_b.split(e)[2]
    v = _heads(F.linear(value, w_v, b_v), heads)
    return F.linear((p @ v).transpose(-3, -2).flatten(-2), out_w, out_b), None


def sdpa_probabilities(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> Tensor:
    r"""The probabilities inside ``F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale)``.

    .. math:: P = \mathrm{softmax}\big(q k^\top s + M\big), \quad s = 1 / \sqrt{d} \text{ by default}

    (a bool mask keeps the ``True`` entries; a float mask is added; ``is_causal`` keeps the lower triangle),
    so ``P @ v`` is the fused result.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from camfn.methods.attention import sdpa_probabilities
        >>> q, k, v = torch.randn(3, 1, 2, 5, 4, dtype=torch.float64).unbind(0)
        >>> bool(torch.allclose(sdpa_probabilities(q, k) @ v, F.scaled_dot_product_attention(q, k, v)))
        True
    """
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-2, -1) * s
    n, m = logits.shape[-2:]
    if is_causal:
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -torch.inf)
        else:
            logits = logits + attn_mask
    return logits.softmax(-1)


@dataclass(frozen=True)
class Explicit:
    """The traced graph with every attention explicit: ``graph`` (module form, same output), ``env`` (old
    node -> new node) and per attention block its path, its probability node and its output node."""

    graph: fx.Graph
    env: dict[fx.Node, fx.Node]
    blocks: tuple[str, ...]
    probs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]
    old_outputs: tuple[fx.Node, ...]


_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SOFTMAX = (torch.softmax, F.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
_MATMUL = (torch.matmul, operator.matmul, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
_PASS = (  # ops between an attention softmax and its ``P @ v`` that keep P's values (dtype casts, eval dropout)
    torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.dropout.default,
    torch.ops.aten.clone.default, F.dropout, "to", "type_as", "float", "dropout", "contiguous",
)  # fmt: skip


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA


def _keeps_values(user: fx.Node, root: nn.Module) -> bool:
    """A cast, an eval-mode dropout or an identity: ``P`` passes unchanged."""
    if user.op == "call_module":
        sub = root.get_submodule(str(user.target))
        return isinstance(sub, nn.Identity) or (isinstance(sub, nn.Dropout) and (not sub.training or sub.p == 0))
    return user.target in _PASS


def _softmax_probabilities(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """For a softmax over the last axis whose result, through casts and eval dropout, is the left factor of a
    matmul (an explicit attention ``softmax(q k^T s + M) @ v``, Hugging Face ``attn_implementation="eager"``):
    that left factor (the probabilities in the dtype they are used in); else ``None``."""
    fn = node.op == "call_function" and node.target in _SOFTMAX
    if not (fn or (node.op == "call_method" and node.target == "softmax")):
        return None
    if _argument(node, 1, "dim", None) not in (-1, 3):
        return None
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.target in _MATMUL and user.args and user.args[0] is n:
                return n
            if _keeps_values(user, root):
                frontier.append(user)
    return None


def _mha_node(node: fx.Node, root: nn.Module) -> nn.MultiheadAttention | None:
    if node.op != "call_module":
        return None
    sub = root.get_submodule(node.target)
    return sub if isinstance(sub, nn.MultiheadAttention) else None


def _argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _rewrite_mha(graph: fx.Graph, new: fx.Node, old: fx.Node, mha: nn.MultiheadAttention) -> fx.Node:
    path = str(old.target)
    for name, index in (("key_padding_mask", 3), ("attn_mask", 5)):
        if _argument(old, index, name) is not None:
            raise LayerError(f"legrad: {path} is called with {name}; masked nn.MultiheadAttention is not supported")
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise LayerError(
            f"legrad: {path} is an nn.MultiheadAttention with batch_first={mha.batch_first}, separate q/k/v "
            "weights or extra key biases; only the standard batch-first self-attention is supported"
        )
    if mha.training and mha.dropout > 0:
        raise LayerError(f"legrad: {path} is in training mode with dropout; call model.eval()")
    q, k, v = (new.args[i] if len(new.args) > i else new.kwargs[n] for i, n in enumerate(("query", "key", "value")))
    with graph.inserting_before(new):
        in_w = graph.get_attr(f"{path}.in_proj_weight")
        in_b = graph.get_attr(f"{path}.in_proj_bias") if mha.in_proj_bias is not None else None
        out_w = graph.get_attr(f"{path}.out_proj.weight")
        out_b = graph.get_attr(f"{path}.out_proj.bias") if mha.out_proj.bias is not None else None
        p = graph.call_function(mha_probabilities, (q, k, in_w, in_b, mha.num_heads))
        out = graph.call_function(mha_output, (p, v, in_w, in_b, out_w, out_b, mha.num_heads))
    new.replace_all_uses_with(out)
    graph.erase_node(new)
    return p


def _rewrite_sdpa(graph: fx.Graph, new: fx.Node) -> fx.Node:
    q, k, v = new.args[:3]
    mask = _argument(new, 3, "attn_mask")
    dropout = _argument(new, 4, "dropout_p", 0.0)
    causal = _argument(new, 5, "is_causal", False)
    scale = new.kwargs.get("scale")
    if (isinstance(dropout, float | int) and dropout != 0) or new.kwargs.get("enable_gqa"):
        raise LayerError("legrad: scaled_dot_product_attention with dropout or enable_gqa; call model.eval()")
    with graph.inserting_before(new):
        p = graph.call_function(sdpa_probabilities, (q, k, mask, causal, scale))
        out = graph.call_function(torch.matmul, (p, v))
    new.replace_all_uses_with(out)
    graph.erase_node(new)
    return p


def _block_of(trace: Traced, node: fx.Node) -> str:
    """The block an attention node belongs to: the parent of the attention module."""
    name = trace.qualname.get(node.name, node.name)
    module = name if node.op == "call_module" else name.rsplit(".", 1)[0]
    return module.rsplit(".", 1)[0] if "." in module else module


def explicit_attention(trace: Traced) -> Explicit:
    """Rewrite every fused attention of the traced graph (torch.fx or torch.export) into an explicit softmax.

    ``nn.MultiheadAttention`` calls become :func:`mha_probabilities` and :func:`mha_output`;
    ``F.scaled_dot_product_attention`` (and its aten op) becomes :func:`sdpa_probabilities` followed by
    ``P @ v``; an explicit ``softmax(...) @ v`` keeps its softmax as ``P``.

    Example:
        >>> import torch, camfn
        >>> from torchvision.models.vision_transformer import VisionTransformer
        >>> from camfn.methods.attention import explicit_attention
        >>> from camfn.rewrite import program
        >>> from camfn.tracing import traced
        >>> vit = VisionTransformer(64, 16, 1, 2, 32, 64, num_classes=3).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> t = traced(vit, camfn.params(vit), x)
        >>> rewritten = explicit_attention(t)
        >>> rewritten.blocks
        ('encoder.layers.encoder_layer_0',)
        >>> bool(torch.allclose(program(t, rewritten.graph)(camfn.params(vit), x), vit(x), atol=1e-5))
        True
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(trace.module.graph, env))
    blocks, probs = [], []
    for old in list(trace.module.graph.nodes):
        mha, softmax = _mha_node(old, trace.module), _softmax_probabilities(old, trace.module)
        if mha is None and softmax is None and not _is_sdpa(old):
            continue
        new = env[old]
        if mha is not None:
            p = _rewrite_mha(graph, new, old, mha)
        else:
            p = _rewrite_sdpa(graph, new) if softmax is None else env[softmax]
        blocks.append(_block_of(trace, old))
        probs.append(p)
    if not blocks:
        raise LayerError(
            "legrad needs a transformer: the traced graph has no nn.MultiheadAttention, no "
            "scaled_dot_product_attention and no softmax(...) @ v (for a CNN use a gradient method such as "
            "camfn.gradcam)"
        )
    order = list(trace.module.graph.nodes)
    olds = [[n for n in order if trace.qualname.get(n.name, "").startswith(b + ".")][-1] for b in blocks]
    return Explicit(graph, env, tuple(blocks), tuple(probs), tuple(env[o] for o in olds), tuple(olds))


# ------------------------------------------------------------------------------------------ LeGrad
def _legrad_program(trace: Traced, pool: str, x: Tensor) -> tuple[Program, tuple[str, ...]]:
    """``(params, x, *deltas) -> (per-block logits, per-block P)``: each block's tokens through the model's
    own tail (the nodes after the last block), ``delta_l`` injected at block ``l``'s probabilities. Blocks whose
    tokens have another shape than the last block's (earlier Swin stages) get ``None`` logits."""
    key = (pool, tuple(x.shape[1:]))
    cached = trace.cache.attention.get(key)
    if cached is not None:
        return cached
    ex = explicit_attention(trace)
    graph = ex.graph
    order = list(trace.module.graph.nodes)
    last = ex.old_outputs[-1]
    shapes = trace.node_shapes(x)
    same = [shapes[o.name] is not None and shapes[o.name][0][1:] == shapes[last.name][0][1:] for o in ex.old_outputs]
    tail = [n for n in order[order.index(last) + 1 :] if n.op != "output"]
    old_to_new = ex.env
    out_node = next(n for n in graph.nodes if n.op == "output")
    anchor = next(n for n in graph.nodes if n.op == "placeholder")
    deltas = []
    for i in range(len(ex.probs)):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"camfn_delta_{i}")
            deltas.append(anchor)
    for p, delta in zip(ex.probs, deltas, strict=True):
        with graph.inserting_after(p):
            perturbed = graph.call_function(operator.add, (p, delta))
        p.replace_all_uses_with(perturbed, delete_user_cb=lambda user, q=perturbed: user is not q)
    logits: list[Any] = []
    for tokens, usable in zip(ex.outputs, same, strict=True):
        if not usable:
            logits.append(None)
            continue
        with graph.inserting_before(out_node):
            if pool == "mean":
                mean = graph.call_method("mean", (tokens, 1), {"keepdim": True})
                tokens = graph.call_method("expand_as", (mean, tokens))
            local: dict[fx.Node, fx.Node] = {last: tokens}
            for n in tail:
                local[n] = graph.node_copy(n, lambda a, m=local: m.get(a, old_to_new.get(a)))
            old_out = next(n for n in order if n.op == "output").args[0]
            logits.append(fx.map_arg(old_out, lambda a, m=local: m.get(a, old_to_new.get(a))))
    graph.erase_node(out_node)
    graph.output((tuple(logits), tuple(ex.probs)))
    result = (program(trace, graph), ex.blocks)
    trace.cache.attention[key] = result
    return result


def _keys_layout(n: int, x: Tensor, prefix: int | None, trace: Traced, hint: Any) -> Tokens:
    """How the ``n`` attention keys split into prefix tokens and the patch grid: ``prefix`` when given, else the
    model's ``num_prefix_tokens`` (timm), else the model family's adapter (Hugging Face config), else the
    smallest prefix leaving a grid of the input's aspect ratio."""
    known = trace.prefix_tokens
    if known is None and isinstance(hint, Tokens) and hint.prefix is not None and grid_of(n - hint.prefix, x.shape[2:]):
        known = hint.prefix
    try:
        return resolve_tokens(Tokens(prefix=prefix), (x.shape[0], n, 1), tuple(x.shape[2:]), known)
    except LayerError:
        raise LayerError(
            f"legrad: the {n} attention keys do not split into prefix tokens and a patch grid of the input's "
            f"aspect {tuple(x.shape[2:])}; set prefix_tokens= (the number of leading non-patch keys)"
        ) from None


def _global_blocks(probs: Sequence[Tensor], logits: Sequence[Any], blocks: Sequence[str], batch: int) -> list[int]:
    """Indices of the blocks whose attention spans the whole token set (one window) and whose tokens reach the
    model's head; raises a LayerError naming the working blocks when none does."""
    ok = [i for i, (p, s) in enumerate(zip(probs, logits, strict=True)) if p.shape[0] == batch and s is not None]
    if not ok:
        raise LayerError(
            f"legrad: every attention block of this model is windowed attention (Swin-style: each window attends "
            f"only within itself, probabilities {tuple(probs[-1].shape)} for a batch of {batch}), so there is no "
            "attention over the whole image to read. Use an input size for which the last stage is one window "
            "(its resolution <= window_size), or a gradient method such as camfn.gradcam"
        )
    return ok


def _prefix(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise OptionError(f"{name}={value!r}: use None (inferred from the model and the keys) or an int >= 0")


def _block_gradients(f: Any, zeros: list[Tensor], wanted: list[int], x: Tensor, params: Params) -> list[Tensor]:
    """``d s^l / d P^l`` ``(T, B, heads, N, N)`` for each wanted block ``l``, with ``f(*deltas) -> L x (B, T)``
    the block scores for perturbations of every block's attention. Outside transforms: plain autograd from
    each block's own score (never through a stack of all of them, which would send zeros through every later
    block) to its own attention, so the blocks before and after it are not traversed; inside transforms one
    ``vjp`` pulled back for every (block, target) pair."""
    if eager():
        graph = torch.is_grad_enabled() and (x.requires_grad or any(v.requires_grad for v in params.values()))
        with torch.enable_grad():
            deltas = [z.requires_grad_() for z in zeros]
            s = f(*deltas)
            out = []
            for j, i in enumerate(wanted):  # one backward per target (batched backward has no fast vmap rules)
                g = [
                    torch.autograd.grad(s[j][:, t].sum(), deltas[i], retain_graph=True, create_graph=graph)[0]
                    for t in range(s[j].shape[1])
                ]
                out.append(torch.stack(g) if graph else torch.stack(g).detach())
            return out
    s, pull = vjp(lambda *d: torch.stack(f(*d)), *zeros)
    n_l, batch, n_t = s.shape
    eye = torch.eye(n_l * n_t, dtype=s.dtype, device=s.device).reshape(n_l * n_t, n_l, 1, n_t)
    grads = vmap(pull)(eye.expand(-1, -1, batch, -1))  # per block: (L * T, B, heads, N, N)
    return [grads[i].unflatten(0, (n_l, n_t))[j] for j, i in enumerate(wanted)]


@composite({"pool": Option("mean", choice("mean", "model")), "prefix_tokens": Option(None, _prefix)}, "attention")
def legrad(model: Model, params: Params, x: Tensor, layer: Any, target: Target, own: dict, rest: dict) -> Tensor:
    r"""LeGrad (Bousselham et al., 2024): positive gradients of block scores w.r.t. their attention.

    Paper: arXiv 2404.03214. Each block's class score is differentiated w.r.t. the block's post-softmax
    attention; the positive part is averaged over heads, queries and blocks.

    For block :math:`l` with tokens :math:`z^l` and attention :math:`P^l` (``heads x N x N``), the block's
    score is the model's own head applied to its tokens, :math:`s^l = S(\mathrm{tail}(\bar z^l))` with
    :math:`\bar z^l` the token mean broadcast to every token (``pool="mean"``: torchvision's
    ``heads(ln(z.mean(1)))``, torchcam's rule) or the tokens as they are (``pool="model"``: the model's own
    pooling, e.g. the class token); ``tail`` is the graph after the last block. Then

    .. math:: E^l = \frac{1}{h N} \sum_{h, i} \mathrm{ReLU}\Big(\frac{\partial s^l}{\partial P^l_{h, i, :}}\Big),
              \qquad L = \frac{1}{|\mathcal L|} \sum_{l \in \mathcal L} E^l_{\mathrm{patches}}

    with the ``prefix_tokens`` keys dropped (``None``: timm's ``num_prefix_tokens``, else the model family's
    adapter, else the smallest count leaving a grid) and the rest reshaped to the patch grid. Swin-style windowed
    attention is used only in stages that are one window; other blocks raise a :class:`LayerError`.
    ``layer``: ``None`` (every attention block that works) or blocks, by name
    (``"encoder.layers.encoder_layer_1"``, ``"blocks.11"``) or module. Attention is read from a rewrite of the
    traced graph (:func:`explicit_attention`), so fused attention works.

    Example:
        >>> import torch, camfn
        >>> from torchvision.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(64, 16, 2, 2, 32, 64, num_classes=5).eval()
        >>> camfn.legrad(vit, camfn.params(vit), torch.randn(2, 3, 64, 64), None, 3).shape
        torch.Size([2, 64, 64])
    """
    final = validate({k: rest.pop(k) for k in ("relu", "size", "normalize") if k in rest}, {})
    trace, shared = trace_with(model, params, x, rest)
    for flag in ("eigen_smooth", "aug_smooth"):
        if shared[flag]:
            raise OptionError(f"legrad: {flag}=True is not supported (LeGrad has no channel weights to smooth)")
    if shared["layout"] not in (None, "tokens", "vit", "deit"):
        raise OptionError(
            f"legrad: layout={shared['layout']!r}; legrad reads the patch grid from the attention keys itself "
            "(prefix_tokens= sets how many leading keys are not patches): pass layout=None or 'tokens'"
        )
    prog, blocks = _legrad_program(trace, own["pool"], x)
    batch = x.shape[0]
    key = (own["pool"], tuple(x.shape), x.dtype, x.device.type)
    if key not in trace.cache.probes:  # which blocks work and their attention's shape: structure only
        with torch.no_grad():
            probe_logits, probe = prog(params, x, *([x.new_zeros(())] * len(blocks)))
        trace.cache.probes[key] = (_global_blocks(probe, probe_logits, blocks, batch), [p.shape for p in probe])
    usable, probe_shapes = trace.cache.probes[key]
    wanted = usable
    if layer is not None:
        names = [layer] if isinstance(layer, str | nn.Module) else list(layer) if isinstance(layer, Sequence) else None
        if names is not None and isinstance(model, nn.Module):
            paths = {id(m): path for path, m in model.named_modules()}
            names = [paths.get(id(n), repr(n)) if isinstance(n, nn.Module) else n for n in names]
        working = [blocks[i] for i in usable]
        if names is None or not all(isinstance(n, str) for n in names) or any(n not in blocks for n in names):
            raise LayerError(f"legrad: layer={layer!r}; pass None or attention block names from {working}")
        windowed = [n for n in names if blocks.index(n) not in usable]
        if windowed:
            raise LayerError(
                f"legrad: {windowed} use windowed attention (each window attends only within itself) or their "
                f"tokens do not reach the model's head; pick blocks with attention over the whole image: {working}"
            )
        wanted = [blocks.index(n) for n in names]
    hint = defaults(model, params, trace, x) if isinstance(model, nn.Module) else None
    if target is None and hint is not None and hint.target is not None:
        target = hint.target  # embedding models (Dinov2, CLIP): the embedding's length along its clean direction
    score = scores(target, batch, num_classes(trace, x, shared["output"]), shared["output"])

    shape_of_score: list[int] = []

    def f(*deltas: Tensor) -> list[Tensor]:
        logits, _ = prog(params, x, *deltas)
        picked = [score(logits[i]) for i in wanted]
        shape_of_score.append(picked[0].ndim)
        return [s.reshape(batch, -1) for s in picked]  # L x (B, T)

    per_block = _block_gradients(f, [x.new_zeros(shape) for shape in probe_shapes], wanted, x, params)
    squeeze = bool(shape_of_score) and shape_of_score[0] == 1
    keys = _keys_layout(probe_shapes[wanted[0]][-1], x, own["prefix_tokens"], trace, hint and hint.layout)
    maps = []
    for g in per_block:  # (T, B, heads, N, N)
        relevance = F.relu(g).mean((2, 3))[..., keys.prefix :].movedim(0, 1)  # (B, T, patches)
        maps.append(relevance.unflatten(-1, keys.grid))
    cam = finish(torch.stack(maps).mean(0), x, **{k: final[k] for k in ("relu", "size", "normalize")})
    return cam.squeeze(1) if squeeze else cam
