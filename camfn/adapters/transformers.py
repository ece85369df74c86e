r"""Hugging Face ``transformers`` models: the layer, layout, ``output=`` and target their class implies.

Imported by :mod:`camfn.adapters` only when a model of the ``transformers`` package is explained.
Inferred from the traced model and its config, never from a table of class names:

=========================  ====================================================================================
``layer``                  models with ``stages`` giving channel-first maps (ResNet, ConvNeXt, Segformer, DETR's
                           backbone): the last stage; ViT-likes with prefix tokens (ViT, DeiT, BEiT, Dinov2,
                           CLIP): the last block's first norm; token models without prefix tokens (Swin): the
                           last hidden state (the last norm); else camfn's generic default
``layout``                 ``Tokens(prefix=p)`` for ``(B, N, D)`` layers, with ``p = N - (H / P)(W / P)`` from
                           the config's patch size ``P`` (CLS, distillation and register tokens)
``output``                 the first output field of ``logits``, ``logits_per_image``, ``image_embeds``,
                           ``pooler_output``
``target``                 embedding outputs (``image_embeds``, ``pooler_output``): the embedding's length along
                           its clean direction, :math:`S_b = \langle e_b, r_b \rangle / \lVert r_b \rVert` with
                           :math:`r_b` the clean embedding; detectors (``logits`` ``(B, Q, C + 1)`` beside
                           ``pred_boxes`` ``(B, Q, 4)``, DETR-likes): the most confident query's most likely
                           real class logit, and an int class ``c`` means class ``c``'s best query
                           (:func:`camfn.targets.best_query`)
=========================  ====================================================================================

Example:
    >>> import torch, transformers, camfn
    >>> config = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=16, num_labels=3)
    >>> vit = transformers.ViTForImageClassification(config).eval()
    >>> camfn.gradcam(vit, camfn.params(vit), torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 32, 32])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer_names import channel_first, input_nodes, spatial, token_layer
from ..layout import Tokens
from ..targets import Anchored, best_query
from . import Defaults, register

__all__ = ["defaults", "toward"]

OUTPUTS = ("logits", "logits_per_image", "image_embeds", "pooler_output")
EMBEDDINGS = ("image_embeds", "pooler_output")


def toward(reference: Tensor) -> Any:
    r"""Target for embeddings: the length of ``e_b`` along ``r_b``,
    :math:`\langle e_b, r_b \rangle / \lVert r_b \rVert`.

    Unlike the cosine similarity its gradient does not vanish at ``e_b = r_b``, so it explains an image's own
    embedding. A batch that repeats the ``B`` samples (``aug_smooth``) reuses their references.

    Example:
        >>> import torch
        >>> toward(torch.tensor([[3.0, 4.0]]))(torch.tensor([[1.0, 1.0]]))
        tensor([1.4000])
    """
    direction = F.normalize(reference.detach().flatten(1), dim=1)

    def score(output: Tensor) -> Tensor:
        e = output.flatten(1)
        r = direction.to(e.dtype)
        if e.shape[0] != r.shape[0] and e.shape[0] % r.shape[0] == 0:
            r = r.repeat(e.shape[0] // r.shape[0], 1)
        return (e * r).sum(1)

    return score


def _output(info: Any) -> str | None:
    if isinstance(info, Mapping):
        return next((key for key in OUTPUTS if key in info), None)
    return None


def _patch(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    return patch if isinstance(patch, int) else None


def _tokens(model: nn.Module, shape: tuple[int, ...], x: Tensor) -> Tokens:
    """The token layout of a ``(B, N, D)`` layer: prefix ``N - (H / P)(W / P)`` when the patch grid fits."""
    patch = _patch(model)
    if patch and x.ndim == 4:
        grid = (x.shape[2] // patch, x.shape[3] // patch)
        prefix = shape[1] - grid[0] * grid[1]
        if 0 <= prefix <= 8:
            return Tokens(prefix=prefix, grid=grid)
    return Tokens()


def _last_norm(trace: Any, x: Tensor) -> str | None:
    """The last ``(B, N, D)`` norm computed from ``x`` (the last hidden state of Swin-likes)."""
    shapes, live = trace.node_shapes(x), input_nodes(trace)
    nodes = {n.name: n for n in trace.module.graph.nodes}
    for node in reversed(list(trace.qualname)):
        info, name = shapes.get(node), trace.qualname[node]
        if info is None or len(info[0]) != 3 or node not in live or name not in trace.modules:
            continue
        if "norm" in str(nodes[node].target).lower():
            return name
    return None


def _stage(model: nn.Module, trace: Any, x: Tensor) -> str | None:
    """The last element of a ``stages`` list (ResNet, ConvNeXt, RegNet...) when it outputs channel-first maps."""
    paths = [p for p, m in model.named_modules() if p.endswith("stages") and isinstance(m, nn.ModuleList) and len(m)]
    if not paths:
        return None
    path = f"{paths[0]}.{len(model.get_submodule(paths[0])) - 1}"
    info = trace.node_shapes(x).get(trace.resolve(path))
    ok = info is not None and len(info[0]) == x.ndim and spatial(tuple(info[0]))
    return path if ok and channel_first(tuple(info[0]), tuple(x.shape)) else None


def _detector(info: Any) -> bool:
    """DETR-like outputs: ``logits`` ``(B, Q, C + 1)`` and ``pred_boxes`` ``(B, Q, 4)`` for the same queries."""
    if not isinstance(info, Mapping) or not {"logits", "pred_boxes"} <= set(info):
        return False
    logits, boxes = info["logits"], info["pred_boxes"]
    shapes = [v[0] if isinstance(v, tuple) and v else None for v in (logits, boxes)]
    if not all(isinstance(shape, torch.Size) and len(shape) == 3 for shape in shapes):
        return False
    return shapes[0][:2] == shapes[1][:2] and shapes[1][2] == 4 and shapes[0][2] >= 2


def defaults(model: nn.Module, params: dict[str, Tensor], trace: Any, x: Tensor) -> Defaults | None:
    """The :class:`~camfn.adapters.Defaults` of a transformers model (see the module docstring); structure and
    input shape only (the embedding target anchors on each call's own clean output), so it is registered
    ``structural`` and kept with the trace."""
    if trace is None or x.ndim != 4:
        return None
    return _defaults(model, trace, x)


def _defaults(model: nn.Module, trace: Any, x: Tensor) -> Defaults:
    shapes = trace.node_shapes(x)
    output = _output(shapes["output"])
    layer, layout = _stage(model, trace, x), None
    block = token_layer(trace, x) if layer is None else None
    if block is not None:
        layout = _tokens(model, tuple(shapes[trace.resolve(block)][0]), x)
        layer = block if layout.prefix else (_last_norm(trace, x) or block)
    target = Anchored(toward) if output in EMBEDDINGS else None
    if _detector(shapes["output"]):
        return Defaults(layer=layer, layout=layout, output=output, target=best_query(), classes=best_query)
    return Defaults(layer=layer, layout=layout, output=output, target=target)


register("transformers", defaults, structural=True)
