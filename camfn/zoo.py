"""The models ``camfn`` (the command line, and apps built on it) can load by name or file: :func:`load_model`.

``"shapes"`` (the shipped model), a torchvision classification architecture by name (random weights,
``weights=FILE`` a state dict, or ``pretrained=True``), a timm model name when timm is installed, or a ``.pt2``
file written by ``torch.export.save``. Every file goes through :mod:`camfn.files`: state dicts with
``torch.load(weights_only=True)``, ``.pt2`` archives inspected before ``torch.export.load`` (nothing in a file
can run code). Random weights are the same on every run (seed 0, the global RNG untouched).

Example:
    >>> from camfn.zoo import load_model
    >>> loaded = load_model("shapes")
    >>> loaded.name, loaded.size, loaded.layer is not None
    ('shapes', 64, True)
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import InputError, OptionError, nearest
from .files import load_exported, load_tensors
from .viz import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Model", "load_model"]


@dataclasses.dataclass
class Model:
    """A loaded model and how to feed it: normalisation, default input size and layer, class names."""

    module: nn.Module
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size: int | tuple[int, int] = 224  # shorter side, or exact (h, w)
    layer: str | None = None  # None: camfn picks the last spatial layer
    classes: Sequence[str] | None = None
    hooks: str = "error"  # "ignore" for exported programs (their hooks only check and unflatten inputs)
    note: str | None = None  # printed once (e.g. "random weights")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def _read_state(path: Path) -> dict[str, Tensor]:
    state = load_tensors(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict (a dict of tensors); save model.state_dict()")
    return state


def _num_classes(state: dict[str, Tensor]) -> int | None:
    """Outputs of the last linear layer in a classifier's state dict (its last 2-d weight)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def _load_state(module: nn.Module, state: dict[str, Tensor], name: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise InputError(f"the weights in {path} do not fit {name}: {detail}. Check --model") from None


def _shapes_model() -> Model:
    from . import shapes

    return Model(
        shapes.load(),
        "shapes",
        mean=(shapes.MEAN,) * 3,
        std=(shapes.STD,) * 3,
        size=64,
        layer=shapes.LAYER,
        classes=shapes.CLASSES,
    )


def _torchvision_model(name: str, weights: Path | None, pretrained: bool) -> Model:
    import torchvision

    if pretrained:
        try:
            module = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as e:
            raise InputError(
                f"could not download the pretrained weights of {name} ({type(e).__name__}: {e}). "
                "Check the internet connection, or download the weights elsewhere and pass --weights FILE"
            ) from None
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        return Model(module.eval(), name, classes=meta.get("categories"))
    state = _read_state(weights) if weights else None
    classes = _num_classes(state) if state else None
    with torch.random.fork_rng(devices=[]):  # the same random weights on every run, global RNG untouched
        torch.manual_seed(0)
        module = torchvision.models.get_model(name, **({"num_classes": classes} if classes else {}))
    if state is not None:
        _load_state(module, state, name, weights)  # type: ignore[arg-type]
        return Model(module.eval(), name)
    return Model(module.eval(), name, note=f"{name} has random weights: the map shows the network, not the object")


def _timm_model(name: str, weights: Path | None, pretrained: bool) -> Model:
    import timm

    state = _read_state(weights) if weights else None
    kwargs = {"num_classes": _num_classes(state)} if state and _num_classes(state) else {}
    try:
        with torch.random.fork_rng(devices=[]):  # the same random weights on every run, global RNG untouched
            torch.manual_seed(0)
            module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        raise InputError(
            f"could not download the pretrained weights of {name} ({type(e).__name__}: {e}). "
            "Check the internet connection, or pass --weights FILE"
        ) from None
    if state is not None:
        _load_state(module, state, name, weights)  # type: ignore[arg-type]
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[1:]
    note = None if (pretrained or state) else f"{name} has random weights: the map shows the network, not the object"
    return Model(
        module.eval(),
        name,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        size=int(min(size)),
        note=note,
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/__torch__/" in n for n in archive.namelist()
        )


def _exported_model(path: Path) -> Model:
    program = load_exported(path)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = set(program.graph_signature.user_inputs)
    shapes = [tuple(n.meta["val"].shape) for n in placeholders if n.name in user and "val" in n.meta]
    size: int | tuple[int, int] = 224
    if len(shapes) == 1 and len(shapes[0]) == 4 and all(isinstance(s, int) for s in shapes[0][2:]):
        size = (int(shapes[0][2]), int(shapes[0][3]))
    return Model(program.module(), path.name, size=size, hooks="ignore")


def _file_model(path: Path, weights: Path | None) -> Model:
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if weights is not None:
        raise OptionError("--weights goes with an architecture name (--model resnet18 --weights FILE), not a file")
    if path.suffix == ".pt2":
        return _exported_model(path)
    if _is_torchscript(path):
        raise InputError(
            f"{path} is a TorchScript model, which torch.fx cannot trace. Export the model instead: "
            "torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2'), and pass the .pt2 file"
        )
    raise InputError(
        f"{path} is neither a torch.export program (.pt2) nor TorchScript. For a state dict pass the "
        f"architecture and the file: --model resnet18 --weights {path}"
    )


def load_model(spec: str, weights: Path | None = None, pretrained: bool = False) -> Model:
    """Load ``spec``: ``"shapes"``, a torchvision or timm model name, or a ``.pt2`` file; in eval mode.

    Unknown names raise :class:`~camfn.errors.InputError` listing the nearest known names.

    Example:
        >>> from camfn.zoo import load_model
        >>> loaded = load_model("resnet18")
        >>> loaded.module.training, loaded.size, loaded.note
        (False, 224, 'resnet18 has random weights: the map shows the network, not the object')
    """
    if pretrained and weights is not None:
        raise OptionError("pass either --pretrained or --weights FILE, not both")
    if spec == "shapes":
        if weights is not None or pretrained:
            raise OptionError("the shapes model ships with its weights; drop --weights/--pretrained")
        return _shapes_model()
    path = Path(spec)
    if path.suffix in (".pt2", ".pt", ".pth", ".ts", ".zip") or path.exists():
        return _file_model(path, weights)
    if spec in _torchvision_names():
        return _torchvision_model(spec, weights, pretrained)
    timm_names = _timm_names()
    if spec in timm_names:
        return _timm_model(spec, weights, pretrained)
    hint = nearest(spec, ["shapes", *_torchvision_names(), *timm_names], n=5)
    raise InputError(
        f"unknown model {spec!r}. Nearest names: {', '.join(hint) or '(none)'}. Use 'shapes', a torchvision "
        "classification model (torchvision.models.list_models()), a timm model name, or a .pt2 file"
    )
