"""Input and model checks shared by every method. Each failure says what is wrong and how to fix it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .tracing import Traced

from .errors import InputError, ModeError

__all__ = ["check_input", "check_model", "check_params"]


def check_input(x: object) -> Tensor:
    """``x`` must be a float tensor ``(B, C, H, W)`` (or ``(B, C, D, H, W)``)."""
    if not isinstance(x, Tensor):
        raise InputError(
            f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}; pass torch.as_tensor(x) "
            "(a numpy image (H, W, 3): camfn.viz.preprocess(image))"
        )
    if not (x.is_floating_point() or x.is_complex()):
        raise InputError(
            f"x has dtype {x.dtype}; camfn needs a float input. Convert and normalise it as the model expects, "
            "e.g. x.float() / 255 followed by the model's mean/std normalisation"
        )
    if x.ndim == 3:
        raise InputError(
            f"x has shape {tuple(x.shape)}, which looks like one image without a batch dimension; "
            "pass x[None] (or x.unsqueeze(0)) for a batch of one"
        )
    if x.ndim not in (4, 5):
        raise InputError(
            f"x has shape {tuple(x.shape)}; expected (B, C, H, W) images or (B, C, D, H, W) volumes: reshape it to one "
            "of these (x[None] adds a batch dimension)"
        )
    if x.shape[0] == 0:
        raise InputError("x has an empty batch (B = 0); pass at least one sample")
    return x


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def check_model(model: nn.Module) -> None:
    """One mode policy: refuse every module whose train mode changes what it computes.

    BatchNorm in train mode (or without running statistics) makes a sample's map depend on the rest of the
    batch and cannot run under ``vmap``; Dropout in train mode makes two calls give two different maps.
    Modules whose train mode computes the same (Linear, Conv, ...) are fine. camfn never switches the mode
    itself: that would change the user's module.
    """
    for path, module in model.named_modules():
        if isinstance(module, _DROPOUT) and module.training and module.p > 0:
            raise ModeError(
                f"{type(module).__name__} {path or '<model>'!r} is in train mode, so every call would drop other "
                "units at random and two calls would give different maps. Call model.eval() before explaining "
                "(camfn never switches modes on your model); copy.deepcopy(model).eval() keeps the original as is"
            )
        if isinstance(module, nn.modules.batchnorm._NormBase) and isinstance(
            module, nn.modules.batchnorm._BatchNorm | nn.SyncBatchNorm
        ):
            if module.training:
                raise ModeError(
                    f"BatchNorm {path or '<model>'!r} is in train mode, so it would normalise with the "
                    "statistics of the batch being explained. Call model.eval() before explaining "
                    "(camfn never switches modes on your model); copy.deepcopy(model).eval() keeps the original as is"
                )
            if not module.track_running_stats or module.running_mean is None:
                raise ModeError(
                    f"BatchNorm {path or '<model>'!r} has no running statistics (track_running_stats=False), "
                    "so even in eval mode it normalises with batch statistics and a map would depend on the "
                    "other samples. Explain one sample at a time, or replace the layer with GroupNorm"
                )


def check_params(params: Any, trace: Traced, x: Tensor) -> None:
    """``params`` must be a dict of tensors whose shapes match the model's and whose dtype fits ``x``."""
    if not isinstance(params, dict):
        raise InputError(f"params must be a dict of tensors, got {type(params).__name__}; pass camfn.params(model)")
    if torch.compiler.is_compiling():  # checked eagerly when camfn.compiled warmed up for this input
        return
    stamp = (x.dtype, x.device, *map(id, params.values()))
    last = trace.checked
    if last is not None and last[0] is params and last[1] == stamp:  # the same dict of the same tensors
        return
    floats = []
    for key, value in params.items():
        if not isinstance(value, Tensor):
            raise InputError(
                f"params[{key!r}] is a {type(value).__name__}, not a tensor; pass torch.as_tensor(value) "
                "(camfn.params(model) builds the dict)"
            )
        ref = trace.defaults.get(key)
        if ref is not None and value.shape != ref.shape:
            raise InputError(
                f"params[{key!r}] has shape {tuple(value.shape)} but the model's has {tuple(ref.shape)}; "
                "pass parameters of this architecture (camfn.params(model), or a state_dict of the same model)"
            )
        if value.is_floating_point() and value.ndim:
            floats.append((key, value))
    if floats and x.is_floating_point() and not any(v.dtype == x.dtype for _, v in floats):
        key, value = floats[0]
        raise InputError(
            f"x is {x.dtype} but the parameters are {value.dtype} (e.g. {key!r}); convert one to match: "
            f"x.to({value.dtype}) or model.to({x.dtype}) and camfn.params(model) again"
        )
    if floats and x.device != floats[0][1].device and not torch.compiler.is_compiling():
        key, value = floats[0]
        raise InputError(
            f"x is on {x.device} but params[{key!r}] is on {value.device}; move both to one device "
            f"(x.to({str(value.device)!r}))"
        )
    trace.checked = (params, stamp)
