"""torchvision and timm vision transformers: the layer and layout their class implies.

Imported by :mod:`camfn.adapters` only when a torchvision or timm model is explained. Inferred from the
model's class and attributes, checked against the traced shapes (anything else keeps camfn's generic
default, e.g. every CNN):

==================================  ==============================================================================
model                               ``layer`` and ``layout``
==================================  ==============================================================================
torchvision ``VisionTransformer``   the last encoder block's first norm (``ln_1``), ``Tokens(prefix=1)`` (the
                                    class token)
timm ViT-likes (``blocks`` and      the last block's first norm (``norm1``), ``Tokens(prefix=num_prefix_tokens)``
``num_prefix_tokens``: ViT, DeiT,   (class, distillation and register tokens)
Eva, ...)
torchvision / timm Swin             the final norm of the last stage, channels-last ``(B, h, w, C)``:
                                    ``layout="nhwc"``
==================================  ==============================================================================

Example:
    >>> import torch, torchvision, camfn
    >>> vit = torchvision.models.VisionTransformer(64, 16, 2, 2, 32, 64, num_classes=3).eval()
    >>> camfn.default_layer(vit, (1, 3, 64, 64))
    'encoder.layers.encoder_layer_1.ln_1'
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from ..layout import Tokens, grid_of
from . import Defaults, register

__all__ = ["defaults"]


def _first_norm(block: nn.Module) -> str | None:
    """The path (inside ``block``) of its first LayerNorm: a pre-norm block's input norm."""
    return next((path for path, m in block.named_modules() if isinstance(m, nn.LayerNorm)), None)


def _isinstance(model: nn.Module, module: str, names: tuple[str, ...]) -> bool:
    """``model`` is an instance of one of the classes ``names`` of the already imported ``module``."""
    found = sys.modules.get(module)
    classes = tuple(c for c in (getattr(found, n, None) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(model, classes)


def _vit(model: nn.Module) -> tuple[str, int] | None:
    """``(path of the last block, prefix tokens)`` of a torchvision or timm ViT-like, else ``None``."""
    if _isinstance(model, "torchvision.models.vision_transformer", ("VisionTransformer",)):
        return f"encoder.layers.{list(dict(model.encoder.layers.named_children()))[-1]}", 1
    prefix, blocks = getattr(model, "num_prefix_tokens", None), getattr(model, "blocks", None)
    if isinstance(prefix, int) and not isinstance(prefix, bool) and isinstance(blocks, nn.Sequential | nn.ModuleList):
        return (f"blocks.{len(blocks) - 1}", prefix) if len(blocks) else None
    return None


def _swin(model: nn.Module) -> bool:
    return _isinstance(model, "torchvision.models.swin_transformer", ("SwinTransformer",)) or _isinstance(
        model, "timm.models.swin_transformer", ("SwinTransformer",)
    )


def _shape(trace: Any, path: str, x: Tensor) -> tuple[int, ...] | None:
    info = trace.node_shapes(x).get(trace.resolve(path)) if path in trace.modules else None
    return tuple(info[0]) if info is not None else None


def defaults(model: nn.Module, params: dict[str, Tensor], trace: Any, x: Tensor) -> Defaults | None:
    """The :class:`~camfn.adapters.Defaults` of a torchvision or timm vision transformer (module docstring);
    structure and input shape only (registered ``structural``: kept with the trace)."""
    if trace is None or x.ndim != 4:
        return None
    return _defaults(model, trace, x)


def _defaults(model: nn.Module, trace: Any, x: Tensor) -> Defaults | None:
    vit = _vit(model)
    if vit is not None:
        block, prefix = vit
        norm = _first_norm(model.get_submodule(block))
        path = f"{block}.{norm}" if norm else block
        shape = _shape(trace, path, x)
        if shape is None or len(shape) != 3 or grid_of(shape[1] - prefix, x.shape[2:]) is None:
            return None
        return Defaults(layer=path, layout=Tokens(prefix=prefix))
    norm = getattr(model, "norm", None)
    if _swin(model) and isinstance(norm, nn.LayerNorm):
        shape = _shape(trace, "norm", x)
        channels_last = shape is not None and len(shape) == 4 and shape[3] == norm.normalized_shape[-1]
        return Defaults(layer="norm", layout="nhwc") if channels_last else None
    return None


register("torchvision", defaults, structural=True)
register("timm", defaults, structural=True)
