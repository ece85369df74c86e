r"""Maps and metrics over a whole data set, in shards, on one process or many (``torch.distributed``).

:func:`evaluate` splits the data set into shards of ``shard_size`` consecutive samples; shard ``i`` goes to
rank ``i % world_size``. Each rank computes its shards' maps batch by batch, scores every sample with the
chosen metrics (:mod:`camfn.metrics`) and writes, per shard, atomically (temporary file, then rename):

* ``out_dir/maps/shard_{i:05d}.pt``: ``maps`` ``(n, H, W)`` (float16 by default), ``indices`` ``(n,)`` (the
  samples' positions in the data set), ``targets`` ``(n,)`` (the explained class), ``metrics`` (name ->
  ``(n,)`` float64, per sample), ``failed`` ``(n,)`` bool (samples whose image, score, map or a metric value
  is NaN or Inf: reported, never scored; their maps are NaN), the configuration's ``key`` and the shard's
  ``items`` fingerprint (a hash of every image, label and box in it);
* ``out_dir/maps/shard_{i:05d}.json``: its index entry (file, first/stop index, ``done``, the key, the items
  fingerprint and the ``sha256`` of the ``.pt`` file).

Rank 0 writes ``out_dir/config.json`` once the inputs are validated and its first shard is done (a run that
fails on a bad option leaves nothing that blocks the corrected rerun) and, after all ranks are done, the
merged ``out_dir/index.json`` and the report ``out_dir/report.json``. The configuration holds the method, layer,
options, seeds (by value: a ``torch.Generator`` by its seed and state hash), a hash of the parameters and a
fingerprint of the model's forward (:func:`_graph_fingerprint`: the traced graph's code and every module's
settings). Per metric the report holds

.. math:: \mathrm{mean} = \frac{1}{N}\sum_b m_b, \qquad
          \mathrm{std} = \sqrt{\tfrac{1}{N}\textstyle\sum_b m_b^2 - \mathrm{mean}^2}, \qquad N = \mathrm{count}

over the samples that did not fail, where the sums and counts are ``all_reduce``\ d across ranks. A rerun
with the same configuration skips every shard whose file is complete (reading its per-sample metrics back),
so an interrupted run resumes; an ``out_dir`` holding another configuration (method, layer, model weights or
forward, data set length, options ...) is refused. Every file read back is verified: a shard whose checksum,
contents or items fingerprint does not match is recomputed with a warning (a changed data item in the middle of
the set, a flipped byte, a truncated file, a file holding another object); a damaged ``config.json`` or
``index.json`` is rewritten with a warning. Files are read with :mod:`camfn.files` (``weights_only=True``
tensors, JSON) and written atomically (temporary file, then ``os.replace``: a symlink is replaced, never
followed).

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
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import metrics as _metrics
from . import targets as _targets
from .errors import CamfnError, DamagedFileError, InputError, OptionError, TargetError, nearest
from .files import check_folder, load_tensors, read_json, write_bytes, write_json
from .hooks import HookPolicy
from .layer_names import default_layer
from .tracing import Params, apply
from .tracing import params as params_of

__all__ = ["BOX_METRICS", "DEFAULT_METRICS", "MODEL_METRICS", "Item", "evaluate", "item", "shard_ranges"]

MODEL_METRICS = tuple(n for n, m in _metrics.METRICS.items() if "boxes" not in m.needs)
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
def _jsonable(value: Any, where: str = "option") -> Any:
    """``value`` as plain JSON, by value, for config comparison: tensors by their hash, a ``torch.Generator``
    by its seed and state hash, a function by its name and code hash; anything whose only description is a
    ``repr`` with a memory address raises :class:`OptionError`."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, tuple | list):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "sha1": _digest([value])}
    if isinstance(value, torch.Generator):
        return {
            "generator": str(value.device),
            "initial_seed": value.initial_seed(),
            "state_sha1": _digest([value.get_state()]),
        }
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, types.FunctionType):
        code = value.__code__
        body = code.co_code + repr((code.co_consts, code.co_names)).encode()
        return {"callable": f"{value.__module__}.{value.__qualname__}", "code_sha1": hashlib.sha1(body).hexdigest()}
    text = repr(value)
    if " at 0x" in text or text.startswith("<"):
        raise OptionError(
            f"{where} is a {type(value).__name__}, which camfn cannot record by value in config.json (its repr "
            f"{text[:60]!r} changes every run, so a resume would be refused); pass numbers, strings, tensors, a "
            "torch.Generator or a plain function"
        )
    return text


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


def _graph_fingerprint(model: nn.Module, hooks: HookPolicy = "error") -> str:
    """A hash of what the model's forward computes apart from its tensors: the code of the traced graph
    (``camfn.tracing.trace(model).module.code``: Python constants used in ``forward`` appear in it) and every
    module's type, settings (``extra_repr``: stride, padding, eps ...) and plain Python attributes (numbers,
    strings, tuples, ``training``), which covers a changed attribute even where a trace cache is stale. A model
    fx cannot trace is fingerprinted by its modules only. The one place that knows the tracing API."""
    from .tracing import trace

    h = hashlib.sha1()
    try:
        h.update(trace(model, hooks=hooks).module.code.encode())
    except CamfnError:
        h.update(b"untraceable")
    for name, module in model.named_modules():
        plain = sorted(
            (k, repr(v))
            for k, v in vars(module).items()
            if not k.startswith("_") and (v is None or isinstance(v, bool | int | float | str | tuple))
        )
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        h.update(f"{name}:{kind}({module.extra_repr()}){plain}".encode())
    return h.hexdigest()


def _hash_item(h: Any, it: Item) -> None:
    """Feed one item (image, label, box) to the running hash ``h`` of a shard's items."""
    h.update(_digest([it.image]).encode())
    h.update(repr(it.label).encode())
    h.update(_digest([it.box]).encode() if it.box is not None else b"-")


def _items_digest(dataset: Any, indices: range) -> str:
    """A hash of every item of a shard: a changed image, label or box changes it."""
    h = hashlib.sha1()
    for i in indices:
        _hash_item(h, item(dataset[i], i))
    return h.hexdigest()


def _key(config: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------- files
def _saved(obj: Any) -> bytes:
    """``torch.save`` bytes that do not depend on the file name (the same shard gives the same file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _shard_path(out: Path, i: int) -> Path:
    return out / "maps" / f"shard_{i:05d}.pt"


def _is_object(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")


def _check_entry(entry: Any) -> None:
    _is_object(entry)
    for name, kind in (("start", int), ("stop", int), ("sha256", str), ("key", str), ("items", str)):
        if not isinstance(entry.get(name), kind):
            raise ValueError(f"the entry has no {kind.__name__} {name!r}")


def _check_shard(shard: Any, indices: range, names: Sequence[str]) -> None:
    """Raise ValueError unless ``shard`` is a complete shard of ``indices`` with metrics ``names``."""
    if not isinstance(shard, dict):
        raise ValueError(f"it holds a {type(shard).__name__}, not a shard")
    n = len(indices)
    tensors = {k: shard.get(k) for k in ("maps", "indices", "targets", "failed")}
    for k, v in tensors.items():
        if not isinstance(v, Tensor) or v.shape[:1] != (n,):
            raise ValueError(f"its {k!r} is not a tensor of {n} rows")
    if shard["indices"].tolist() != list(indices):
        raise ValueError("its indices are not the shard's")
    metrics = shard.get("metrics")
    if not isinstance(metrics, dict) or set(metrics) != set(names):
        raise ValueError("its metrics are not this run's")
    if not all(isinstance(v, Tensor) and v.shape == (n,) for v in metrics.values()):
        raise ValueError("its per-sample metrics are not one value per sample")


def _finished(
    path: Path,
    key: str,
    indices: range,
    items_digest: Callable[[], str],
    names: Sequence[str],
    warn: Callable[[str], None],
) -> dict[str, Any] | None:
    """The shard's contents when it is complete, intact and was written for this configuration and these data
    items (``items_digest()``, computed only when a file is there), else None (with a warning when a file is
    there but damaged or stale)."""
    entry_path = path.with_suffix(".json")
    if not path.is_file() or not entry_path.is_file():
        return None
    try:
        entry = read_json(entry_path, "shard index entry", _check_entry)
    except (DamagedFileError, InputError) as e:
        warn(f"{e}; recomputing shard {path.name}")
        return None
    if entry["key"] != key:
        return None  # written by an interrupted run of another configuration
    items = items_digest()
    if entry["items"] != items:
        warn(f"the data items of {path.name} changed since it was written; recomputing it")
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        warn(f"{path} does not match its checksum (damaged or changed); recomputing it")
        return None
    try:
        shard = load_tensors(path, "shard file")
        _check_shard(shard, indices, names)
        if shard.get("key") != key or shard.get("items") != items:
            raise ValueError("it was written for another configuration")
    except (InputError, ValueError) as e:
        warn(f"{path} is not a valid shard ({e}); recomputing it")
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
    explainer: tuple[Callable[..., Tensor], Any],
) -> Tensor:
    """Per-sample values ``(B,)`` float64 of metric ``name``; ``explainer``: the method (options bound), its layer."""
    method, layer = explainer
    inputs = {"model": model, "params": params, "x": x, "maps": maps, "target": cls, "boxes": boxes, "hooks": hooks}
    inputs.update(method=method, layer=layer)
    return _metrics.compute(name, inputs, **options)


def _batch(
    items: Sequence[Item], indices: Sequence[int], device: torch.device
) -> tuple[Tensor, Tensor | None, Tensor | None]:
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


def _classes(logits: Tensor, labels: Tensor | None, target: TargetSpec) -> Tensor:
    """The class each sample is explained for (``(B,)``), through :func:`camfn.targets.classes`."""
    if target == "label" and labels is not None:
        return labels
    chosen = None if target in ("label", "top1") else target
    index, _ = _targets.classes(chosen, logits.shape[0], logits.shape[1] if logits.ndim == 2 else None)
    return index(logits)[:, 0]


def _finite(t: Tensor) -> Tensor:
    """``(B,)`` True where the sample's values (all but the first axis) are all finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1).float()).all(1) if t.numel() else torch.ones(t.shape[0], dtype=bool)


def _shard(
    explainer: tuple[Callable[..., Tensor], Any],
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
    """Maps, explained classes, per-sample metrics and failures of one shard, batch by batch.

    A sample fails when its image or the model's output for it is not finite (it is left out of the method's
    batch), or when its map or one of its metric values is not finite; failed samples keep a NaN map and NaN
    metric values and are never scored.
    """
    maps, classes, failures, values = [], [], [], {n: [] for n in names}
    digest = hashlib.sha1()
    for lo in range(indices.start, indices.stop, batch_size):
        batch = range(lo, min(lo + batch_size, indices.stop))
        items = [item(dataset[i], i) for i in batch]
        for it in items:
            _hash_item(digest, it)
        x, labels, boxes = _batch(items, batch, device)
        with torch.no_grad():
            logits = apply(model, params, x, hooks=hooks)
        ok = _finite(x) & (_finite(logits) if isinstance(logits, Tensor) else torch.ones_like(_finite(x)))
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        m = torch.full((x.shape[0], *x.shape[2:]), math.nan, dtype=x.dtype, device=x.device)
        scores = {n: torch.full((x.shape[0],), math.nan, dtype=torch.float64) for n in names}
        keep = ok.nonzero().flatten().to(x.device)
        if keep.numel():
            xs, bs = x[keep], boxes[keep] if boxes is not None else None
            cs = _classes(logits[keep], labels[keep] if labels is not None else None, target)
            method, layer = explainer
            ms = method(model, params, xs, layer, cs).detach()
            if ms.shape != (xs.shape[0], *x.shape[2:]):
                raise OptionError(
                    f"the method returned maps of shape {tuple(ms.shape)}; evaluation needs one map per sample at the "
                    f"input's size {(xs.shape[0], *x.shape[2:])} (drop size=... and multi-target options)"
                )
            cls[keep], m[keep] = cs, ms.to(m.dtype)
            good = _finite(ms).cpu()
            for n in names:
                v = _score(n, model, params, xs, ms, cs, bs, options.get(n, {}), hooks, explainer).cpu()
                scores[n][keep.cpu()] = v
                good &= torch.isfinite(v)
            ok[keep] = good.to(ok.device)
        for n in names:
            values[n].append(torch.where(ok.cpu(), scores[n], math.nan))
        m[~ok] = math.nan
        maps.append(m.cpu())
        classes.append(cls.cpu())
        failures.append(~ok.cpu())
    return {
        "maps": torch.cat(maps),
        "targets": torch.cat(classes),
        "failed": torch.cat(failures),
        "metrics": {n: torch.cat(v) for n, v in values.items()},
        "items": digest.hexdigest(),
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
         "metrics": {name: {"mean": ..., "std": ..., "count": ...}}, "skipped": {name: reason},
         "failed": [{"index": i, "reason": ...}, ...]}

    with :math:`\mathrm{mean} = \sum_b m_b / N` over all ranks' samples that did not fail (a sample fails when its
    image, the model's output, its map or a metric value is NaN or Inf: it is listed under ``failed`` by its
    index, never scored). ``log`` receives one line per shard
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
    with torch.no_grad():
        logits = apply(model, params, probe.image[None].to(device), hooks=hooks)
    if isinstance(target, int) and isinstance(logits, Tensor):  # a bad class fails here, before any file is written
        _targets.classes(target, 1, logits.shape[1] if logits.ndim == 2 else None)
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
            "forward": _graph_fingerprint(model, hooks),
            "dataset": {"type": type(dataset).__name__, "length": length},
        }
    )
    key = _key(config)
    out = Path(out_dir)
    check_folder(out, "out_dir")
    if (out / "maps").is_symlink():
        raise InputError(f"{out / 'maps'} is a symlink; camfn writes shards only into a real folder. Remove it")
    say = log or (lambda line: None)

    def warn(text: str) -> None:
        warnings.warn(text, stacklevel=2)
        say(f"warning: {text}")

    if (out / "config.json").is_file():
        try:
            old = read_json(out / "config.json", "config.json", _is_object)
        except DamagedFileError as e:
            warn(f"{e}; it is rewritten (every shard is verified by its own key and checksum)")
            old = config
        if old != config:
            raise OptionError(
                f"{out} holds results of another configuration (differs in: {', '.join(_differences(old, config))}); "
                "pass another out_dir, or delete it to start over"
            )

    def method(m: nn.Module, p: Params, x: Tensor, where: Any, cls: Any, **more: Any) -> Tensor:
        return fn(m, p, x, where, cls, **{"hooks": hooks, **method_options, **more})

    ranges = shard_ranges(length, shard_size)
    with _group(device) as group:
        group.barrier()  # every rank has read config.json before rank 0 writes it
        if group.rank == 0:
            (out / "maps").mkdir(parents=True, exist_ok=True)
        group.barrier()
        config_written = False

        def write_config() -> None:
            nonlocal config_written
            if group.rank == 0 and not config_written:
                write_json(out / "config.json", config)
                config_written = True

        sums = torch.zeros(len(active), 3, dtype=torch.float64)  # sum, sum of squares, count
        failed: list[int] = []
        for i in range(group.rank, len(ranges), group.world):
            path, indices = _shard_path(out, i), ranges[i]
            shard = _finished(path, key, indices, lambda r=indices: _items_digest(dataset, r), active, warn)
            if shard is None:
                shard = _shard(
                    (method, layer), model, params, dataset, indices, batch_size, target, active, options, device, hooks
                )
                shard.update(maps=shard["maps"].to(maps_dtype), indices=torch.tensor(list(indices)), key=key)
                items = shard["items"]
                data = _saved(shard)
                write_bytes(path, data)
                entry = {"shard": i, "file": f"maps/{path.name}", "start": indices.start, "stop": indices.stop}
                entry.update(done=True, key=key, items=items, sha256=hashlib.sha256(data).hexdigest())
                write_json(path.with_suffix(".json"), entry)
                write_config()
                say(f"rank {group.rank}: shard {i} computed ({len(indices)} samples)")
            else:
                say(f"rank {group.rank}: shard {i} skipped (done)")
            bad = shard["failed"].bool()
            failed += [indices[j] for j in bad.nonzero().flatten().tolist()]
            for j, n in enumerate(active):
                v = shard["metrics"][n].double()[~bad]
                sums[j] += torch.stack([v.sum(), v.square().sum(), torch.tensor(float(v.numel()))])
        sums = group.all_sum(sums)
        failed = _gather_failed(group, failed, length)
        report = {
            "config": config,
            "samples": length,
            "shards": len(ranges),
            "metrics": {n: _summary(*sums[j].tolist()) for j, n in enumerate(active)},
            "skipped": skipped,
            "failed": [{"index": k, "reason": "non-finite image, score, map or metric value"} for k in failed],
        }
        if group.rank == 0:
            write_config()
            entries = [
                read_json(_shard_path(out, i).with_suffix(".json"), "shard index entry", _check_entry)
                for i in range(len(ranges))
            ]
            write_json(out / "index.json", {"config": config, "key": key, "shards": entries})
            write_json(out / "report.json", report)
        group.barrier()  # report.json exists when any rank returns
    return report


def _gather_failed(group: _Group, failed: list[int], length: int) -> list[int]:
    """The failed sample indices of every rank, sorted (a 0/1 mask summed over ranks)."""
    mask = torch.zeros(length, dtype=torch.float64)
    mask[failed] = 1
    return group.all_sum(mask).nonzero().flatten().tolist()


def _summary(total: float, squares: float, count: float) -> dict[str, Any]:
    """Mean and std of a metric from its sums; ``None`` for both when no sample was scored (all failed)."""
    if not count:
        return {"mean": None, "std": None, "count": 0}
    mean = total / count
    return {"mean": mean, "std": math.sqrt(max(squares / count - mean * mean, 0.0)), "count": int(count)}
