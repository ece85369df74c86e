"""The metric registry: every metric is declared once with :func:`metric`, which fills :data:`METRICS`.

An entry says what the metric needs (``model``: runs the model on ``x``; ``maps``; ``boxes``: boxes or a
region mask per sample; ``method``: re-explains inputs with a camfn method), whether higher is better, and
what one call returns (``"sample"``: a ``(B,)`` tensor; ``"curve"``: a :class:`Curve`, whose per-sample value
is its ``auc``; ``"randomisation"``: a :class:`Sanity`, whose per-sample value is the mean correlation).
:func:`compute` runs a metric by name and returns its per-sample values ``(B,)`` float64 (``camfn eval``).

The decorator also adds ``skip_nonfinite`` to every metric: non-finite maps, inputs or clean scores raise an
:class:`~camfn.errors.InputError` naming the samples, or with ``skip_nonfinite=True`` those samples come back
NaN (their maps replaced by zeros for the computation) and a :class:`RuntimeWarning` names them.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ..errors import OptionError, nearest
from .common import _BAD, _SKIP, nonfinite_rows, refuse_nonfinite

__all__ = ["METRICS", "Metric", "compute", "metric", "per_sample"]

Need = Literal["model", "maps", "boxes", "method"]
Output = Literal["sample", "curve", "randomisation"]


class Metric(NamedTuple):
    """One registered metric: ``fn`` and how to call it by name."""

    name: str
    fn: Callable[..., Any]
    needs: frozenset[str]
    higher_is_better: bool | None
    output: str


METRICS: dict[str, Metric] = {}
"""Every metric by name, filled at definition by :func:`metric` (import :mod:`camfn.metrics` to fill it)."""

_NEEDS = {"model", "maps", "boxes", "method"}
_MASKED = ("scores", "auc", "correlations")  # the per-sample fields of Curve and Sanity


def _masked(result: Any, bad: Tensor) -> Any:
    """``result`` with the samples in ``bad`` set to NaN (a tensor's rows, or the sample axis of a tuple)."""

    def nan_rows(t: Tensor, axis: int) -> Tensor:
        if not isinstance(t, Tensor) or t.ndim <= axis or t.shape[axis] != bad.numel():
            return t
        t = t.double() if t.dtype == torch.bool else t.clone()
        index = [slice(None)] * axis + [bad.to(t.device)]
        t[tuple(index)] = float("nan")
        return t

    if isinstance(result, Tensor):
        return nan_rows(result, 0)
    if hasattr(result, "_fields"):
        axis = 1 if "correlations" in result._fields else 0
        return type(result)(
            *(nan_rows(v, axis) if k in _MASKED else v for k, v in zip(result._fields, result, strict=True))
        )
    return result


def metric(
    *,
    needs: tuple[Need, ...],
    higher_is_better: bool | None,
    output: Output = "sample",
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a metric function in :data:`METRICS` and give it the ``skip_nonfinite`` option."""
    unknown = set(needs) - _NEEDS
    if unknown:
        raise OptionError(f"needs has {sorted(unknown)}; use some of {sorted(_NEEDS)}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, skip_nonfinite: bool = False, **kwargs: Any) -> Any:
            if not isinstance(skip_nonfinite, bool):
                raise OptionError(f"skip_nonfinite={skip_nonfinite!r}: use True or False")
            bound = signature.bind(*args, **kwargs)
            maps = bound.arguments.get("maps")
            skip_token, bad_token = _SKIP.set(skip_nonfinite), _BAD.set(None)
            try:
                if isinstance(maps, Tensor) and maps.is_floating_point() and maps.ndim >= 1:
                    bad_maps = nonfinite_rows(maps.detach())
                    refuse_nonfinite(bad_maps, "maps", "fix the method's output (a NaN logit or a 0/0 normalisation)")
                    if bool(bad_maps.any()):
                        keep = torch.isfinite(maps)
                        bound.arguments["maps"] = torch.where(keep, maps, torch.zeros_like(maps))
                result = fn(*bound.args, **bound.kwargs)
                bad = _BAD.get()
            finally:
                _SKIP.reset(skip_token)
                _BAD.reset(bad_token)
            if bad is None or not bool(bad.any()):
                return result
            warnings.warn(
                f"{key}: sample(s) {bad.nonzero().flatten().tolist()} have non-finite maps, inputs or scores; "
                "their values are NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            return _masked(result, bad)

        params = list(signature.parameters.values())
        extra = inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        run.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])  # type: ignore[attr-defined]
        METRICS[key] = Metric(key, run, frozenset(needs), higher_is_better, output)
        return run

    return register


def per_sample(entry: Metric, result: Any) -> Tensor:
    """The ``(B,)`` float64 values of one call's ``result``: itself, a curve's ``auc``, or the mean correlation."""
    if entry.output == "curve":
        return result.auc.double()
    if entry.output == "randomisation":
        return result.correlations.double().mean(0)
    return result.double()


def compute(name: str, inputs: Mapping[str, Any], **options: Any) -> Tensor:
    """Per-sample values ``(B,)`` float64 of metric ``name`` on ``inputs``, for ``camfn eval``.

    ``inputs`` holds what the metric may need: ``model``, ``params``, ``x``, ``maps``, ``target`` (the explained
    class, ``(B,)``), ``boxes``, ``method`` (a camfn method), ``layer``, ``hooks``; only the entries the
    metric's signature takes are passed. ``options`` go to the metric (e.g. ``steps=16``).

    Example:
        >>> import torch
        >>> from camfn.metrics import compute
        >>> compute("sparseness", {"maps": torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])})
        tensor([0.7500], dtype=torch.float64)
    """
    if name not in METRICS:
        hint = nearest(name, METRICS, n=3)
        raise OptionError(
            f"unknown metric {name!r}"
            + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else "")
            + f" Metrics: {', '.join(METRICS)}"
        )
    entry = METRICS[name]
    missing = sorted(n for n in entry.needs if inputs.get(n) is None and not (n == "model" and "model" in inputs))
    if "model" in entry.needs and "params" not in inputs:
        missing.append("params")
    if missing:
        raise OptionError(f"metric {name!r} needs {missing}; pass them to compute (camfn eval: {', '.join(missing)})")
    accepted = inspect.signature(entry.fn).parameters
    given = {k: v for k, v in inputs.items() if k in accepted and k not in options}
    return per_sample(entry, entry.fn(**given, **options))
