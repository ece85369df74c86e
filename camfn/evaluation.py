r"""Maps and metrics over a whole data set, in shards, on one process or many (``torch.distributed``).

:func:`evaluate` splits the data set into shards of ``shard_size`` consecutive samples; shard ``i`` goes to
rank ``i % world_size``. Each rank computes its shards' maps batch by batch, scores every sample with the
chosen metrics (:mod:`camfn.metrics`) and writes, per shard, atomically (temporary file, then rename):

* ``out_dir/maps/shard_{i:05d}.pt``: ``maps`` ``(n, H, W)`` (float16 by default), ``indices`` ``(n,)`` (the
  samples' positions in the data set), ``targets`` ``(n,)`` (the explained class), ``metrics`` (name ->
  ``(n,)`` float64, per sample) and the configuration's ``key``;
* ``out_dir/maps/shard_{i:05d}.json``: its index entry (file, first/stop index, ``done``).

Rank 0 writes ``out_dir/config.json`` before any shard and, after all ranks are done, the merged
``out_dir/index.json`` and the report ``out_dir/report.json``. Per metric the report holds

.. math:: \mathrm{mean} = \frac{1}{N}\sum_b m_b, \qquad
          \mathrm{std} = \sqrt{\tfrac{1}{N}\textstyle\sum_b m_b^2 - \mathrm{mean}^2}, \qquad N = \mathrm{count}

where the sums and counts are ``all_reduce``\ d across ranks. A rerun with the same configuration skips every
shard whose file is complete (reading its per-sample metrics back), so an interrupted run resumes; an
``out_dir`` holding another configuration (method, layer, model weights, data set, options ...) is refused.

Launch on several processes with ``torchrun`` (``torchrun --nproc_per_node 2 -m camfn eval shapes --out
DIR``): :func:`evaluate` joins the process group that ``torchrun``'s environment describes (``gloo`` on the
CPU, ``nccl`` when the device is a GPU; each rank uses ``cuda:LOCAL_RANK`` in the command line), or uses the
one the caller initialised. Maps do not depend on the number of processes: shards and batches are the same.

Example:
    >>> import tempfile, torch, camfn
    >>> from camfn import shapes
    >>> from camfn.evaluation import evaluate
    >>> batch = shapes.make(6, size=32, seed=shapes.TEST_SEED)
    >>> data = torch.utils.data.TensorDataset(batch.images, batch.labels, batch.boxes)
    >>> with tempfile.TemporaryDirectory() as out:
    ...     report = evaluate("gradcam", shapes.load(), data, shapes.LAYER, out_dir=out, shard_size=4,
    ...                       metrics=("pointing_game", "average_drop"))
    >>> report["samples"], report["shards"], sorted(report["metrics"])
    (6, 2, ['average_drop', 'pointing_game'])
    >>> report["metrics"]["pointing_game"]["count"]
    6
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import metrics as _metrics
from .errors import InputError, OptionError, TargetError, nearest
from .forward import Params, apply
from .forward import params as params_of
from .graph import HookPolicy, default_layer

__all__ = ["BOX_METRICS", "DEFAULT_METRICS", "MODEL_METRICS", "Item", "evaluate", "item", "shard_ranges"]

MODEL_METRICS = tuple(n for n, m in _metrics.METRICS.items() if not m.needs & {"boxes", "method"})
"""Metrics of the maps and the model (curves report their AUC), from :data:`camfn.metrics.METRICS`."""

BOX_METRICS = tuple(n for n, m in _metrics.METRICS.items() if "boxes" in m.needs)
"""Metrics that need a box per sample; skipped (and listed under ``skipped``) when the data set has none."""

DEFAULT_METRICS = (
    "pointing_game",
    "energy_pointing_game",
    "average_drop",
    "increase_in_confidence",
    "deletion",
    "insertion",
)

TargetSpec = int | Literal["label", "top1"]


# ---------------------------------------------------------------------------------------------- items
@dataclasses.dataclass(frozen=True)
class Item:
    """One data-set sample: ``image`` ``(C, H, W)``, optional ``label`` (class index) and ``box`` (``(4,)``
    or ``(N, 4)`` xyxy pixels)."""

    image: Tensor
    label: int | None = None
    box: Tensor | None = None


_IMAGE_KEYS = ("image", "x", "input", "img")
_LABEL_KEYS = ("label", "target", "y", "class")
_BOX_KEYS = ("box", "boxes", "bbox")


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((d[k] for k in keys if k in d), None)


def item(sample: Any, index: int = 0) -> Item:
    """A data-set sample as an :class:`Item`: a tensor, ``(image, label)``, ``(image, label, box)`` or a dict.

    Dict keys: ``image``/``x``, ``label``/``target``, ``box``/``boxes``.

    Example:
        >>> import torch
        >>> from camfn.evaluation import item
        >>> it = item((torch.zeros(3, 8, 8), torch.tensor(2), torch.tensor([0.0, 0, 4, 4])))
        >>> it.label, it.box.tolist()
        (2, [0.0, 0.0, 4.0, 4.0])
    """
    if isinstance(sample, Mapping):
        image, label, box = (_first(sample, k) for k in (_IMAGE_KEYS, _LABEL_KEYS, _BOX_KEYS))
    elif isinstance(sample, tuple | list) and 1 <= len(sample) <= 3:
        image, label, box = (*sample, None, None)[:3]
    else:
        image, label, box = sample, None, None
    if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InputError(
            f"data set item {index}: expected a float image tensor (C, H, W), alone, in a tuple (image, label[, box]) "
            f"or a dict with an 'image' key; got {got}"
        )
    if label is not None:
        label_tensor = torch.as_tensor(label)
        if label_tensor.numel() != 1 or label_tensor.is_floating_point():
            raise InputError(f"data set item {index}: the label must be one class index, got {label!r}")
        label = int(label_tensor)
    if box is not None:
        box = torch.as_tensor(box, dtype=torch.float32)
        if box.shape[-1:] != (4,) or box.ndim not in (1, 2):
            raise InputError(f"data set item {index}: box must be (4,) or (N, 4) xyxy pixels, got {tuple(box.shape)}")
    return Item(image, label, box)


def shard_ranges(length: int, shard_size: int) -> list[range]:
    """Consecutive sample indices of each shard: ``shard i = [i * shard_size, min((i + 1) * shard_size, length))``.

    Example:
        >>> from camfn.evaluation import shard_ranges
        >>> shard_ranges(10, 4)
        [range(0, 4), range(4, 8), range(8, 10)]
    """
    return [range(lo, min(lo + shard_size, length)) for lo in range(0, length, shard_size)]


# --------------------------------------------------------------------------------------------- checks
def _method(method: str | Callable[..., Tensor]) -> tuple[str, Callable[..., Tensor]]:
    from .methods import METHODS

    if isinstance(method, str):
        if method not in METHODS:
            hint = nearest(method, METHODS, n=3)
            raise OptionError(
                f"unknown method {method!r}"
                + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else "")
                + f" Methods: {', '.join(METHODS)}"
            )
        return method, METHODS[method]
    if not callable(method):
        raise OptionError(f"method must be a name in camfn.METHODS or a camfn method, got {type(method).__name__}")
    names = [k for k, v in METHODS.items() if v is method]
    return (names[0] if names else getattr(method, "__qualname__", repr(method))), method


def _check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    known = (*BOX_METRICS, *MODEL_METRICS)
    for name in names:
        if name not in known:
            hint = nearest(str(name), known, n=2)
            raise OptionError(
                f"unknown metric {name!r}"
                + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else "")
                + f" Metrics: {', '.join(known)}"
            )
    if not names:
        raise OptionError(f"metrics is empty; pass one or more of {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def _check_target(target: TargetSpec) -> None:
    if target in ("label", "top1"):
        return
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise TargetError(
            f"target={target!r}: use 'label' (each sample's label, or its top-1 class when the data set has no "
            "labels), 'top1' (the predicted class) or a class index >= 0"
        )


def _check_sizes(shard_size: int, batch_size: int) -> None:
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name}={value!r}: use a positive int (samples)")


# --------------------------------------------------------------------------------------------- config
def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON (tensors by their hash, unknown objects by ``repr``), for config comparison."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "sha1": _digest([value])}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _params_digest(params: Params) -> str:
    keys = sorted(params)
    return hashlib.sha1((",".join(keys) + _digest([params[k] for k in keys])).encode()).hexdigest()


def _key(config: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------- files
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _saved(obj: Any) -> bytes:
    """``torch.save`` bytes that do not depend on the file name (the same shard gives the same file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _shard_path(out: Path, i: int) -> Path:
    return out / "maps" / f"shard_{i:05d}.pt"


def _finished(path: Path, key: str, indices: range) -> dict[str, Any] | None:
    """The shard file's contents when it is complete and was written for this configuration, else None."""
    if not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file is recomputed
        return None
    if shard.get("key") != key or shard.get("indices", torch.empty(0)).tolist() != list(indices):
        return None
    return shard


# --------------------------------------------------------------------------------------------- process group
@dataclasses.dataclass
class _Group:
    rank: int = 0
    world: int = 1
    owned: bool = False  # evaluate() initialised it and must destroy it
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))  # for collectives

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            self.all_sum(torch.zeros(1, dtype=torch.float64))

    def all_sum(self, t: Tensor) -> Tensor:
        if not self.active:
            return t
        buf = t.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()


def _join(device: torch.device) -> _Group:
    """The process group: the caller's, one from ``torchrun``'s environment (``WORLD_SIZE`` > 1), or none."""
    if not dist.is_available():
        return _Group()
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return _Group()
        if device.type == "cuda":  # this rank's GPU (torchrun: cuda:LOCAL_RANK), bound to NCCL
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        owned = True
    comm = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        comm = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return _Group(dist.get_rank(), dist.get_world_size(), owned, comm)


@contextlib.contextmanager
def _group(device: torch.device) -> Iterator[_Group]:
    group = _join(device)
    try:
        yield group
    finally:
        if group.owned:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- scoring
def _score(
    name: str,
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    cls: Tensor,
    boxes: Tensor | None,
    options: Mapping[str, Any],
    hooks: HookPolicy,
) -> Tensor:
    """Per-sample values ``(B,)`` float64 of metric ``name``."""
    inputs = {"model": model, "params": params, "x": x, "maps": maps, "target": cls, "boxes": boxes, "hooks": hooks}
    return _metrics.compute(name, inputs, **options)


def _batch(dataset: Any, indices: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None]:
    items = [item(dataset[i], i) for i in indices]
    shapes = {tuple(it.image.shape) for it in items}
    if len(shapes) > 1:
        raise InputError(
            f"data set items {indices[0]}..{indices[-1]} have different image shapes {sorted(shapes)}; resize them "
            "to one size (the image-folder loader of `camfn eval` does) or use batch_size=1"
        )
    x = torch.stack([it.image for it in items]).to(device)
    has_label, has_box = (
        sum(v is not None for v in vals) for vals in ([it.label for it in items], [it.box for it in items])
    )
    if has_label not in (0, len(items)) or has_box not in (0, len(items)):
        raise InputError(f"data set items {indices[0]}..{indices[-1]}: some have labels or boxes and some do not")
    labels = torch.tensor([it.label for it in items], device=device) if has_label else None
    boxes = None
    if has_box:
        rows = [it.box.reshape(-1, 4) for it in items]  # type: ignore[union-attr]
        if len({r.shape[0] for r in rows}) > 1:
            raise InputError("data set items have different numbers of boxes; pad to one count by repeating a box")
        boxes = torch.stack(rows).to(device)
    return x, labels, boxes


def _classes(model: nn.Module, params: Params, x: Tensor, labels: Tensor | None, target: TargetSpec, hooks: HookPolicy):
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    if target == "label" and labels is not None:
        return labels
    with torch.no_grad():
        return apply(model, params, x, hooks=hooks).argmax(1)


def _shard(
    run: Callable[[Tensor, Tensor], Tensor],
    model: nn.Module,
    params: Params,
    dataset: Any,
    indices: range,
    batch_size: int,
    target: TargetSpec,
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    device: torch.device,
    hooks: HookPolicy,
) -> dict[str, Any]:
    """Maps, explained classes and per-sample metrics of one shard, batch by batch."""
    maps, classes, values = [], [], {n: [] for n in names}
    for lo in range(indices.start, indices.stop, batch_size):
        x, labels, boxes = _batch(dataset, range(lo, min(lo + batch_size, indices.stop)), device)
        cls = _classes(model, params, x, labels, target, hooks)
        m = run(x, cls).detach()
        if m.shape != (x.shape[0], *x.shape[2:]):
            raise OptionError(
                f"the method returned maps of shape {tuple(m.shape)}; evaluation needs one map per sample at the "
                f"input's size {(x.shape[0], *x.shape[2:])} (drop size=... and multi-target options)"
            )
        for n in names:
            values[n].append(_score(n, model, params, x, m, cls, boxes, options.get(n, {}), hooks).cpu())
        maps.append(m.cpu())
        classes.append(cls.cpu())
    return {
        "maps": torch.cat(maps),
        "targets": torch.cat(classes),
        "metrics": {n: torch.cat(v) for n, v in values.items()},
    }


# --------------------------------------------------------------------------------------------- evaluate
def _metric_options(
    names: Sequence[str], given: Mapping[str, Mapping[str, Any]] | None, size: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    given = dict(given or {})
    for key in given:
        if key not in names:
            raise OptionError(f"metric_options has {key!r}, which is not among the metrics {list(names)}")
    out = {n: dict(given.get(n, {})) for n in names}
    if "pointing_game" in out:  # the usual 15 px at 224 px, scaled to the image
        out["pointing_game"].setdefault("tolerance", round(15 * min(size) / 224))
    return out


def evaluate(
    method: str | Callable[..., Tensor],
    model: nn.Module,
    dataset: Any,
    layer: str | None = None,
    *,
    out_dir: str | os.PathLike[str],
    shard_size: int = 64,
    batch_size: int = 16,
    target: TargetSpec = "label",
    metrics: Sequence[str] = DEFAULT_METRICS,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    params: Params | None = None,
    maps_dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    hooks: HookPolicy = "error",
    log: Callable[[str], None] | None = None,
    **method_options: Any,
) -> dict[str, Any]:
    r"""Maps and metrics of ``method`` over ``dataset``, sharded across ``torch.distributed`` ranks; the report.

    ``dataset``: anything with ``len`` and ``dataset[i]`` (a ``torch.utils.data.Dataset``), items a float image
    ``(C, H, W)``, ``(image, label)``, ``(image, label, box)`` or a dict (:func:`item`); images of one batch
    share a shape. ``target``: ``"label"`` (the item's label, else the top-1 class), ``"top1"`` or a class
    index. ``metrics``: names from :data:`MODEL_METRICS` and :data:`BOX_METRICS` (curves give their AUC; box
    metrics are skipped without boxes); ``metric_options`` per metric, e.g. ``{"deletion": {"steps": 16}}``
    (pointing-game tolerance: 15 px at 224 px, scaled). ``method_options`` go to the method.

    Files are described in :mod:`camfn.evaluation`. Returns (and rank 0 writes to ``out_dir/report.json``)::

        {"config": {...}, "samples": N, "shards": S,
         "metrics": {name: {"mean": ..., "std": ..., "count": ...}}, "skipped": {name: reason}}

    with :math:`\mathrm{mean} = \sum_b m_b / N` over all ranks' samples. ``log`` receives one line per shard
    (``"rank 0: shard 3 computed"`` / ``"... skipped (done)"``). The model and ``params`` are not changed;
    ``params`` (default ``camfn.params(model)``) and inputs go to ``device`` (default: where ``params`` are).

    Example:
        >>> import tempfile, torch, camfn
        >>> from camfn.evaluation import evaluate
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> data = [torch.rand(3, 16, 16) for _ in range(5)]
        >>> with tempfile.TemporaryDirectory() as out:
        ...     report = evaluate("gradcam", net, data, "1", out_dir=out, shard_size=2, metrics=["confidence"])
        >>> report["shards"], report["metrics"]["confidence"]["count"], report["skipped"]
        (3, 5, {})
    """
    name, fn = _method(method)
    names = _check_metrics(metrics)
    _check_target(target)
    _check_sizes(shard_size, batch_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        length = len(dataset)
    except TypeError:
        raise InputError(
            f"dataset must have a length and items dataset[i] (a map-style torch Dataset or a list), got "
            f"{type(dataset).__name__}"
        ) from None
    if length == 0:
        raise InputError("the data set is empty")
    params = dict(params) if params is not None else params_of(model)
    home = next(iter(params.values())).device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    params = {k: v.to(device) for k, v in params.items()}
    probe = item(dataset[0], 0)
    has_box = probe.box is not None
    skipped = {n: "the data set has no boxes" for n in names if n in BOX_METRICS and not has_box}
    active = [n for n in names if n not in skipped]
    options = _metric_options(names, metric_options, tuple(probe.image.shape[1:]))
    if layer is None:
        layer = default_layer(model, probe.image[None].to(device), hooks=hooks)
    config = _jsonable(
        {
            "method": name,
            "layer": layer,
            "method_options": method_options,
            "target": target,
            "metrics": list(names),
            "metric_options": options,
            "maps_dtype": str(maps_dtype),
            "shard_size": shard_size,
            "model": _params_digest(params),
            "dataset": {
                "type": type(dataset).__name__,
                "length": length,
                "first": _digest([probe.image]),
                "last": _digest([item(dataset[length - 1], length - 1).image]),
            },
        }
    )
    key = _key(config)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {out} is a file; pass a folder (it is created when missing)")
    if (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        if old != config:
            raise OptionError(
                f"{out} holds results of another configuration (differs in: {', '.join(_differences(old, config))}); "
                "pass another out_dir, or delete it to start over"
            )
    say = log or (lambda line: None)

    def run(x: Tensor, cls: Tensor) -> Tensor:
        return fn(model, params, x, layer, cls, hooks=hooks, **method_options)

    ranges = shard_ranges(length, shard_size)
    with _group(device) as group:
        group.barrier()  # every rank has read config.json before rank 0 writes it
        if group.rank == 0:
            (out / "maps").mkdir(parents=True, exist_ok=True)
            _write_json(out / "config.json", config)
        group.barrier()
        sums = torch.zeros(len(active), 3, dtype=torch.float64)  # sum, sum of squares, count
        for i in range(group.rank, len(ranges), group.world):
            path, indices = _shard_path(out, i), ranges[i]
            shard = _finished(path, key, indices)
            if shard is None:
                shard = _shard(run, model, params, dataset, indices, batch_size, target, active, options, device, hooks)
                shard.update(maps=shard["maps"].to(maps_dtype), indices=torch.tensor(list(indices)), key=key)
                _write_atomic(path, lambda p, s=shard: p.write_bytes(_saved(s)))
                entry = {"shard": i, "file": f"maps/{path.name}", "start": indices.start, "stop": indices.stop}
                _write_json(path.with_suffix(".json"), {**entry, "done": True, "key": key})
                say(f"rank {group.rank}: shard {i} computed ({len(indices)} samples)")
            else:
                say(f"rank {group.rank}: shard {i} skipped (done)")
            for j, n in enumerate(active):
                v = shard["metrics"][n].double()
                sums[j] += torch.stack([v.sum(), v.square().sum(), torch.tensor(float(v.numel()))])
        sums = group.all_sum(sums)
        report = {
            "config": config,
            "samples": length,
            "shards": len(ranges),
            "metrics": {n: _summary(*sums[j].tolist()) for j, n in enumerate(active)},
            "skipped": skipped,
        }
        if group.rank == 0:
            entries = [json.loads(_shard_path(out, i).with_suffix(".json").read_text()) for i in range(len(ranges))]
            _write_json(out / "index.json", {"config": config, "key": key, "shards": entries})
            _write_json(out / "report.json", report)
        group.barrier()  # report.json exists when any rank returns
    return report


def _summary(total: float, squares: float, count: float) -> dict[str, Any]:
    mean = total / count if count else math.nan
    var = max(squares / count - mean * mean, 0.0) if count else math.nan
    return {"mean": mean, "std": math.sqrt(var), "count": int(count)}
