"""Hooks on the user's model: which ones camfn keeps, and the structural copy it traces.

camfn never touches the user's hooks. Weight-defining hooks (pruning masks, weight and spectral norm) are
part of the model's definition and always run; others are refused unless the caller says what they are
(``hooks="ignore"`` for observers, ``hooks="keep"`` for pure functions of their inputs). Hugging Face
transformers' output-capturing hooks are part of the model too and are kept.

Example:
    >>> import torch
    >>> from camfn.hooks import foreign_hooks
    >>> net = torch.nn.Linear(2, 2)
    >>> handle = net.register_forward_hook(lambda m, i, o: None)
    >>> [kind for _, kind, _ in foreign_hooks(net)]
    ['forward hook']
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Literal

from torch import nn

from .errors import HookError, OptionError

__all__ = ["HOOK_DICTS", "HookPolicy", "check_hooks", "foreign_hooks", "part_of_model", "skeleton"]

HookPolicy = Literal["error", "ignore", "keep"]

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_HOOK_SIDE_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


# --------------------------------------------------------------------------------------------- hooks
def _weight_hooks() -> tuple[type, ...]:
    """Hook types that *define* weights (pruning masks, weight/spectral norm): always kept."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def part_of_model(hook: Any) -> bool:
    """A hook that belongs to the model's definition: weight-defining hooks (pruning, weight and spectral
    norm) and Hugging Face transformers' own output-capturing hooks. camfn always runs these."""
    if isinstance(hook, _weight_hooks()):
        return True
    owner = getattr(hook, "__self__", hook)
    module = getattr(hook, "__module__", None) or type(owner).__module__
    return isinstance(module, str) and module.split(".")[0] == "transformers"


def _hook_name(hook: Any) -> str:
    owner = getattr(hook, "__self__", None)
    if owner is not None:
        return f"{type(owner).__module__}.{type(owner).__qualname__}.{hook.__name__}"
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{getattr(hook, '__module__', type(hook).__module__)}.{name}"


def foreign_hooks(model: nn.Module) -> list[tuple[str, str, str]]:
    """Hooks on ``model`` that camfn would have to run or drop: ``(module path, kind, hook name)``.

    Weight-defining hooks (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) are not listed:
    they are part of the model's definition and are always kept.
    """
    found = []
    for path, module in model.named_modules():
        for kind in HOOK_DICTS:
            for hook in getattr(module, kind, {}).values():
                if not part_of_model(hook):
                    found.append((path or "<model>", kind.strip("_").replace("_", " ")[:-1], _hook_name(hook)))
    from torch.nn.modules import module as _m

    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        for hook in getattr(_m, kind, {}).values():
            found.append(("<every module>", kind.strip("_").replace("_", " ")[:-1], _hook_name(hook)))
    return found


def check_hooks(model: nn.Module, policy: HookPolicy) -> None:
    if policy not in ("error", "ignore", "keep"):
        raise OptionError(f"hooks={policy!r}: use 'error' (default), 'ignore' (trace without them) or 'keep'")
    found = foreign_hooks(model)
    global_ = [f for f in found if f[0] == "<every module>"]
    if global_ and policy != "keep":
        raise HookError(
            "global module hooks are registered (torch.nn.modules.module.register_module_forward_hook): "
            + ", ".join(f"{k} {n}" for _, k, n in global_)
            + ". They would run inside camfn's traced copy too; remove them (handle.remove()) or pass "
            "hooks='keep' if they only read."
        )
    if found and policy == "error":
        lines = "\n".join(f"  {path}: {kind} {name}" for path, kind, name in found[:10])
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise HookError(
            f"the model carries {len(found)} hook(s) camfn did not register:\n{lines}{more}\n"
            "camfn traces a copy of the model and never touches these hooks. Choose what the copy does:\n"
            "  hooks='ignore'  trace without them (right for observers: loggers, grad-cam/torchcam extractors);\n"
            "  hooks='keep'    run them inside the copy (only for hooks that are pure functions of their inputs);\n"
            "or remove them from the model (handle.remove(), or the extractor's remove_hooks()/__exit__)."
        )


# ------------------------------------------------------------------------------------------ skeleton
def skeleton(module: nn.Module, policy: HookPolicy, memo: dict[int, nn.Module]) -> nn.Module:
    """A structural copy of ``module`` that shares tensors but no mutable container with it."""
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    kept_ids: set[int] = set()
    for name in HOOK_DICTS:
        hooks = getattr(module, name, None)
        if hooks is not None:
            kept = OrderedDict((k, v) for k, v in hooks.items() if policy == "keep" or part_of_model(v))
            kept_ids |= set(kept)
            object.__setattr__(clone, name, kept)
    for name in _HOOK_SIDE_DICTS:  # bookkeeping keyed by hook id
        hooks = getattr(module, name, None)
        if hooks is not None:
            object.__setattr__(clone, name, OrderedDict((k, v) for k, v in hooks.items() if k in kept_ids))
    clone._modules = {k: None if m is None else skeleton(m, policy, memo) for k, m in module._modules.items()}
    return clone
