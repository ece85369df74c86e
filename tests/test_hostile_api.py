"""Hostile inputs to the Python API: each case raises the exact CamfnError subclass, its message names the
problem and the fix, and the user's model and tensors are unchanged afterwards.

(Files, the command line, ``camfn eval`` and ``viz`` have their own module: ``test_hostile_files.py``.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import CNN_METHODS, GapNet, double_gapnet, image
from torch import nn

import camfn
from camfn.errors import CamfnError, InputError, LayerError, ModeError, OptionError, TargetError, TraceError
from camfn.targets import contrastive, probability

FIX = re.compile(
    r"\b(pass|use|call|pick|fix|define|convert|clean|return|move|remove|build|explain|select|reshape)\b", re.I
)


@dataclass
class Case:
    name: str
    call: Callable[[nn.Module, dict, torch.Tensor], object]
    error: type[CamfnError]
    match: str
    model: Callable[[], nn.Module] = lambda: double_gapnet(0)


def _snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
        [id(m) for m in model.modules()],
    )


def _same(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _nan_at(sample: int, value: float = float("nan")) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[sample, 0, 1, 1] = value
        return y

    return make


def _with(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    return lambda p: {**p, key: fn(p[key])}


G = camfn.gradcam


def _train_bn() -> nn.Module:
    return double_gapnet(0).train()


def _dropout() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    return net.double().eval().apply(lambda m: m.train() if isinstance(m, nn.Dropout) else None)


def _no_stats() -> nn.Module:
    net = double_gapnet(0)
    net.bn = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    return net


class NoForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = double_gapnet(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CASES = [
    # --- x
    Case("x-list", lambda m, p, x: G(m, p, x.tolist(), "act", 0), InputError, "must be a torch.Tensor"),
    Case("x-numpy", lambda m, p, x: G(m, p, x.numpy(), "act", 0), InputError, "must be a torch.Tensor"),
    Case("x-int", lambda m, p, x: G(m, p, (x * 10).long(), "act", 0), InputError, "float input"),
    Case("x-bool", lambda m, p, x: G(m, p, x > 0, "act", 0), InputError, "float input"),
    Case("x-3d", lambda m, p, x: G(m, p, x[0], "act", 0), InputError, "without a batch dimension"),
    Case("x-2d", lambda m, p, x: G(m, p, x[0, 0], "act", 0), InputError, "expected"),
    Case("x-6d", lambda m, p, x: G(m, p, x[None, None], "act", 0), InputError, "expected"),
    Case("x-empty", lambda m, p, x: G(m, p, x[:0], "act", 0), InputError, "empty batch"),
    Case("x-nan", lambda m, p, x: G(m, p, _nan_at(1)(x), "act", 0), InputError, r"sample\(s\) \[1\]"),
    Case("x-inf", lambda m, p, x: G(m, p, _nan_at(0, float("inf"))(x), "act", 0), InputError, r"\[0\]"),
    Case(
        "x-neginf",
        lambda m, p, x: camfn.scorecam(m, p, _nan_at(1, -float("inf"))(x), "act", 0),
        InputError,
        "NaN or Inf",
    ),
    Case(
        "x-float32",
        lambda m, p, x: G(m, p, x.float(), "act", 0),
        InputError,
        "float32 but the parameters are torch.float64",
    ),
    Case("x-float16", lambda m, p, x: G(m, p, x.half(), "act", 0), InputError, "float16"),
    # --- params
    Case("params-list", lambda m, p, x: G(m, list(p.values()), x, "act", 0), InputError, "dict of tensors"),
    Case("params-none", lambda m, p, x: G(m, None, x, "act", 0), InputError, "dict of tensors"),
    Case(
        "params-numpy",
        lambda m, p, x: G(m, _with("fc.weight", lambda t: t.numpy())(p), x, "act", 0),
        InputError,
        r"params\['fc.weight'\] is a ndarray",
    ),
    Case(
        "params-list-value",
        lambda m, p, x: G(m, _with("fc.bias", lambda t: t.tolist())(p), x, "act", 0),
        InputError,
        "not a tensor",
    ),
    Case(
        "params-shape",
        lambda m, p, x: G(m, _with("fc.weight", lambda t: t[:3])(p), x, "act", 0),
        InputError,
        r"has shape \(3, 6\) but the model's has \(5, 6\)",
    ),
    Case(
        "params-transposed",
        lambda m, p, x: G(m, _with("fc.weight", lambda t: t.T)(p), x, "act", 0),
        InputError,
        "shape",
    ),
    Case(
        "params-unknown",
        lambda m, p, x: G(m, {**p, "fc.weigth": p["fc.weight"]}, x, "act", 0),
        InputError,
        "does not have",
    ),
    Case(
        "params-dtype",
        lambda m, p, x: G(m, {k: v.float() for k, v in p.items()}, x, "act", 0),
        InputError,
        "x is torch.float64 but the parameters are torch.float32",
    ),
    Case(
        "params-nan-weight",
        lambda m, p, x: G(m, _with("conv1.weight", lambda t: t * float("nan"))(p), x, "act", 0),
        InputError,
        r"params\['conv1.weight'\] has NaN",
    ),
    Case(
        "params-inf-bias",
        lambda m, p, x: camfn.scorecam(m, _with("fc.bias", lambda t: t + float("inf"))(p), x, "act", 0),
        InputError,
        "fc.bias",
    ),
    Case(
        "params-negative-var",
        lambda m, p, x: G(m, _with("bn.running_var", lambda t: -t)(p), x, "act", 0),
        InputError,
        "negative variances",
    ),
    Case(
        "params-negative-var-ablation",
        lambda m, p, x: camfn.ablationcam(m, _with("bn.running_var", lambda t: -t)(p), x, "act", 0),
        InputError,
        "negative variances",
    ),
    # --- targets
    Case("target-high", lambda m, p, x: G(m, p, x, "act", 5), TargetError, "out of range"),
    Case("target-negative", lambda m, p, x: G(m, p, x, "act", -1), TargetError, "out of range"),
    Case("target-2**63", lambda m, p, x: G(m, p, x, "act", 2**63), TargetError, "int64"),
    Case("target-bool", lambda m, p, x: G(m, p, x, "act", True), TargetError, "bool"),
    Case("target-float", lambda m, p, x: G(m, p, x, "act", torch.tensor([1.0, 2.0])), TargetError, "integers"),
    Case("target-batch", lambda m, p, x: G(m, p, x, "act", torch.tensor([1, 2, 3])), TargetError, "batch has 2"),
    Case("target-3d", lambda m, p, x: G(m, p, x, "act", torch.zeros(2, 1, 1, dtype=torch.long)), TargetError, "batch"),
    Case(
        "target-empty-T",
        lambda m, p, x: G(m, p, x, "act", torch.zeros(2, 0, dtype=torch.long)),
        TargetError,
        "at least one",
    ),
    Case("target-str", lambda m, p, x: G(m, p, x, "act", "cat"), TargetError, "not understood"),
    Case(
        "target-tensor-range",
        lambda m, p, x: camfn.scorecam(m, p, x, "act", torch.tensor([0, 9])),
        TargetError,
        "out of range",
    ),
    Case("target-callable-scalar", lambda m, p, x: G(m, p, x, "act", lambda o: o.sum()), TargetError, r"returned \(\)"),
    Case("target-callable-int", lambda m, p, x: G(m, p, x, "act", lambda o: o.argmax(1)), TargetError, "float tensor"),
    Case(
        "target-callable-int-score",
        lambda m, p, x: camfn.scorecam(m, p, x, "act", lambda o: o.argmax(1)),
        TargetError,
        "float tensor",
    ),
    Case("target-callable-batch", lambda m, p, x: G(m, p, x, "act", lambda o: o[:1, 0]), TargetError, r"\(2,\)"),
    Case(
        "target-detached", lambda m, p, x: G(m, p, x, "act", lambda o: o[:, 3].detach()), TargetError, "does not depend"
    ),
    Case(
        "target-detached-hires",
        lambda m, p, x: camfn.hirescam(m, p, x, "act", lambda o: o[:, 1].detach() * 2),
        TargetError,
        "detached",
    ),
    Case("target-probability", lambda m, p, x: G(m, p, x, "act", probability(7)), TargetError, "out of range"),
    Case(
        "target-contrastive-others",
        lambda m, p, x: G(m, p, x, "act", contrastive(0, others=[9])),
        TargetError,
        "out of range",
    ),
    Case(
        "target-contrastive-empty", lambda m, p, x: G(m, p, x, "act", contrastive(0, others=[])), TargetError, "empty"
    ),
    Case("target-contrastive-gamma-nan", lambda m, p, x: contrastive(0, gamma=float("nan")), TargetError, "gamma=nan"),
    Case("target-contrastive-gamma-neg", lambda m, p, x: contrastive(0, gamma=-1.0), TargetError, "gamma=-1"),
    Case("target-contrastive-k", lambda m, p, x: contrastive(0, k=0), TargetError, "k=0"),
    Case(
        "target-nan-logits",
        lambda m, p, x: G(m, _with("fc.bias", lambda t: t * float("nan"))(p), x, "act", 0),
        InputError,
        "fc.bias",
    ),
    Case(
        "target-cam-callable",
        lambda m, p, x: camfn.cam(m, p, x, "act", lambda o: o[:, 0]),
        TargetError,
        "class indices",
    ),
    # --- layers
    Case("layer-int", lambda m, p, x: G(m, p, x, 5, 0), LayerError, "not a layer name"),
    Case("layer-none-in-list", lambda m, p, x: G(m, p, x, ["act", None], 0), LayerError, "not a layer name"),
    Case("layer-empty-list", lambda m, p, x: G(m, p, x, [], 0), LayerError, "empty list"),
    Case("layer-empty-str", lambda m, p, x: G(m, p, x, "", 0), LayerError, "not a layer name"),
    Case("layer-unknown", lambda m, p, x: G(m, p, x, "ac", 0), LayerError, "nearest names: act"),
    Case("layer-foreign-module", lambda m, p, x: G(m, p, x, nn.ReLU(), 0), LayerError, "not a submodule"),
    Case("layer-duplicate", lambda m, p, x: G(m, p, x, ["act", "act"], 0), LayerError, "twice"),
    Case(
        "layer-duplicate-ablation", lambda m, p, x: camfn.ablationcam(m, p, x, ["act", "act"], 0), LayerError, "twice"
    ),
    Case("layer-duplicate-alias", lambda m, p, x: G(m, p, x, ["conv2", m.conv2], 0), LayerError, "twice"),
    Case("layer-not-spatial", lambda m, p, x: G(m, p, x, "fc", 0), LayerError, "not a .B, K, .spatial. map"),
    Case("layer-one-by-one", lambda m, p, x: G(m, p, x, "pool", 0), LayerError, "pick 'act'"),
    Case("layer-layout-default", lambda m, p, x: G(m, p, x, None, 0, layout="vit"), LayerError, "explicit layer"),
    Case("layer-layout-bad", lambda m, p, x: G(m, p, x, "act", 0, layout="hwcn"), OptionError, "not understood"),
    # --- options
    Case("opt-unknown", lambda m, p, x: G(m, p, x, "act", 0, rel=False), OptionError, "did you mean 'relu'"),
    Case("opt-size-rank", lambda m, p, x: G(m, p, x, "act", 0, size=(10,)), OptionError, "2 spatial"),
    Case("opt-size-zero", lambda m, p, x: G(m, p, x, "act", 0, size=(0, 0)), OptionError, "positive ints"),
    Case("opt-size-str", lambda m, p, x: G(m, p, x, "act", 0, size="big"), OptionError, "size='big'"),
    Case("opt-size-bool", lambda m, p, x: G(m, p, x, "act", 0, size=(True, 4)), OptionError, "size="),
    Case("opt-size-float", lambda m, p, x: G(m, p, x, "act", 0, size=(4.5, 4)), OptionError, "size="),
    Case("opt-normalize-str", lambda m, p, x: G(m, p, x, "act", 0, normalize="no"), OptionError, "normalize='no'"),
    Case("opt-relu-int", lambda m, p, x: G(m, p, x, "act", 0, relu=1), OptionError, "relu=1"),
    Case("opt-eigen-str", lambda m, p, x: G(m, p, x, "act", 0, eigen_smooth="yes"), OptionError, "eigen_smooth"),
    Case("opt-aug-int", lambda m, p, x: G(m, p, x, "act", 0, aug_smooth=1), OptionError, "aug_smooth=1"),
    Case("opt-progress", lambda m, p, x: camfn.scorecam(m, p, x, "act", 0, progress="no"), OptionError, "progress"),
    Case("opt-hooks", lambda m, p, x: G(m, p, x, "act", 0, hooks="bogus"), OptionError, "hooks='bogus'"),
    Case("opt-tracer", lambda m, p, x: G(m, p, x, "act", 0, tracer="jit"), OptionError, "tracer='jit'"),
    Case("opt-tracer-options", lambda m, p, x: G(m, p, x, "act", 0, tracer_options=[1]), OptionError, "tracer_options"),
    Case("opt-output", lambda m, p, x: G(m, p, x, "act", 0, output=1.5), OptionError, "output=1.5"),
    Case(
        "opt-output-key", lambda m, p, x: G(m, p, x, "act", 0, output="logits"), OptionError, "without that attribute"
    ),
    Case("opt-nonfinite", lambda m, p, x: G(m, p, x, "act", 0, nonfinite="skip"), OptionError, "nonfinite='skip'"),
    Case(
        "opt-chunk-zero", lambda m, p, x: camfn.scorecam(m, p, x, "act", 0, chunk_size=0), OptionError, "chunk_size=0"
    ),
    Case(
        "opt-chunk-bool",
        lambda m, p, x: camfn.scorecam(m, p, x, "act", 0, chunk_size=True),
        OptionError,
        "chunk_size=True",
    ),
    Case(
        "opt-chunk-float",
        lambda m, p, x: camfn.ablationcam(m, p, x, "act", 0, chunk_size=2.5),
        OptionError,
        "chunk_size=2.5",
    ),
    Case(
        "opt-chunk-negative",
        lambda m, p, x: camfn.iscam(m, p, x, "act", 0, chunk_size=-1),
        OptionError,
        "chunk_size=-1",
    ),
    Case(
        "opt-chunk-str",
        lambda m, p, x: camfn.sscam(m, p, x, "act", 0, chunk_size="all"),
        OptionError,
        "chunk_size='all'",
    ),
    Case("opt-n-zero", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, n=0), OptionError, "n=0"),
    Case("opt-n-float", lambda m, p, x: camfn.smooth_gradcampp(m, p, x, "act", 0, n=2.5), OptionError, "n=2.5"),
    Case("opt-n-bool", lambda m, p, x: camfn.iscam(m, p, x, "act", 0, n=True), OptionError, "n=True"),
    Case("opt-std-negative", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, std=-1.0), OptionError, "std=-1"),
    Case(
        "opt-std-inf",
        lambda m, p, x: camfn.smooth_gradcampp(m, p, x, "act", 0, std=float("inf")),
        OptionError,
        "finite",
    ),
    Case("opt-std-nan", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, std=float("nan")), OptionError, "finite"),
    Case("opt-std-str", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, std="1"), OptionError, "std='1'"),
    Case("opt-seed-huge", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, seed=2**70), OptionError, "seed="),
    Case("opt-seed-str", lambda m, p, x: camfn.smooth_gradcampp(m, p, x, "act", 0, seed="a"), OptionError, "seed='a'"),
    Case("opt-seed-float", lambda m, p, x: camfn.sscam(m, p, x, "act", 0, seed=1.5), OptionError, "seed=1.5"),
    Case(
        "opt-ablation",
        lambda m, p, x: camfn.ablationcam(m, p, x, "act", 0, ablation="mean"),
        OptionError,
        "ablation='mean'",
    ),
    Case(
        "opt-relative",
        lambda m, p, x: camfn.ablationcam(m, p, x, "act", 0, relative="yes"),
        OptionError,
        "relative='yes'",
    ),
    Case("opt-fc", lambda m, p, x: camfn.cam(m, p, x, "act", 0, fc=3), OptionError, "fc=3"),
    Case("opt-fc-missing", lambda m, p, x: camfn.cam(m, p, x, "act", 0, fc="head"), LayerError, "fc='path"),
    Case("opt-extra-of-other", lambda m, p, x: G(m, p, x, "act", 0, n=4), OptionError, "unknown option 'n'"),
    # --- models and modes
    Case("model-int", lambda m, p, x: G(5, p, x, "act", 0), InputError, "nn.Module or a function"),
    Case("model-bn-train", lambda m, p, x: G(m, camfn.params(m), x, "act", 0), ModeError, "train mode", _train_bn),
    Case(
        "model-bn-train-score",
        lambda m, p, x: camfn.scorecam(m, camfn.params(m), x, "act", 0),
        ModeError,
        "model.eval",
        _train_bn,
    ),
    Case("model-dropout-train", lambda m, p, x: G(m, camfn.params(m), x, "2", 0), ModeError, "Dropout", _dropout),
    Case(
        "model-no-running-stats",
        lambda m, p, x: G(m, camfn.params(m), x, "act", 0),
        ModeError,
        "track_running_stats",
        _no_stats,
    ),
    Case(
        "model-no-forward",
        lambda m, p, x: G(m, camfn.params(m), x, "net.act", 0),
        InputError,
        "model_fn = lambda",
        NoForward,
    ),
    Case("model-script", lambda m, p, x: G(torch.jit.script(m), p, x, "act", 0), TraceError, "TorchScript"),
    Case("model-fn-bad-arity", lambda m, p, x: G(lambda x: x, p, x, "act", 0), TraceError, "model_fn"),
    Case("model-fn-params", lambda m, p, x: G(lambda q, x: x, [1], x, "act", 0), InputError, "dict of tensors"),
    Case("params-of-fn", lambda m, p, x: camfn.params(lambda q, x: x), InputError, "needs an nn.Module"),
    Case("layers-bad-shape", lambda m, p, x: camfn.layers(m, ("a", 3)), InputError, "pass e.g."),
    Case("guided-fn", lambda m, p, x: camfn.guided_backprop(lambda q, x: x, p, x), InputError, "nn.Module"),
    Case(
        "guided-layer-list", lambda m, p, x: camfn.guided_gradcam(m, p, x, ["act", "conv2"], 0), LayerError, "one layer"
    ),
    Case("fuse-empty", lambda m, p, x: camfn.compiled(m, m), InputError, "camfn method"),
    Case("stack-empty", lambda m, p, x: camfn.stack_params([]), InputError, "at least one"),
    Case(
        "stack-keys",
        lambda m, p, x: camfn.stack_params([p, {"fc.weight": p["fc.weight"]}]),
        InputError,
        "different keys",
    ),
]

# every method on the three commonest mistakes
for _name in CNN_METHODS:
    _m = camfn.METHODS[_name]
    CASES += [
        Case(
            f"{_name}-nan-x", lambda m, p, x, f=_m: f(m, p, _nan_at(0)(x), "act", 0), InputError, r"sample\(s\) \[0\]"
        ),
        Case(f"{_name}-target-range", lambda m, p, x, f=_m: f(m, p, x, "act", 7), TargetError, "out of range")
        if _m.spec.fixed_target and _m.spec.needs != "activations"
        else Case(f"{_name}-layer", lambda m, p, x, f=_m: f(m, p, x, "fcc", 7), LayerError, "nearest names"),
        Case(
            f"{_name}-unknown-option",
            lambda m, p, x, f=_m: f(m, p, x, "act", 0, chunksize=4),
            OptionError,
            "unknown option",
        ),
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input(case: Case) -> None:
    model = case.model()
    p = camfn.params(model)
    x = image(2, 8, seed=3)
    before, x_before = _snapshot(model), x.clone()
    with pytest.raises(CamfnError) as info:
        case.call(model, p, x)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.search(case.match, message), message
    assert FIX.search(message), f"no fix named: {message}"
    assert _same(before, _snapshot(model)), "the model changed"
    assert torch.equal(x, x_before), "x changed"


def test_case_count() -> None:
    assert len(CASES) >= 150


def test_error_classes_subclass_their_builtins() -> None:
    assert issubclass(InputError, ValueError) and issubclass(InputError, TypeError)
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, TypeError)
    assert issubclass(TargetError, ValueError) and issubclass(LayerError, KeyError)
    assert issubclass(ModeError, RuntimeError) and issubclass(TraceError, RuntimeError)


# ------------------------------------------------------------------------------------ valid edge cases
def test_nonfinite_nan_option_keeps_the_other_samples() -> None:
    model, x = double_gapnet(0), image(3, 8, seed=4)
    bad = _nan_at(1)(x)
    maps = camfn.gradcam(model, camfn.params(model), bad, "act", 0, nonfinite="nan")
    assert maps[1].isnan().all() and torch.isfinite(maps[[0, 2]]).all()
    clean = camfn.gradcam(model, camfn.params(model), x[[0, 2]], "act", 0)
    torch.testing.assert_close(maps[[0, 2]], clean)


@pytest.mark.parametrize("form", ["params", "state_dict", "named_parameters", "stacked"])
def test_tied_weights_work_with_every_params_form(form: str) -> None:
    torch.manual_seed(0)
    net = (
        nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1),
            nn.Conv2d(3, 3, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        )
        .double()
        .eval()
    )
    net[1].weight = net[0].weight
    x = image(2, 6, seed=5)
    ref = camfn.gradcam(net, camfn.params(net), x, "2", 1)
    if form == "stacked":
        got = camfn.maps_over_params(camfn.gradcam, net, camfn.stack_params([net.state_dict()] * 2), x, "2", 1)[1]
    else:
        p = {
            "params": camfn.params,
            "state_dict": lambda n: n.state_dict(),
            "named_parameters": lambda n: dict(n.named_parameters()),
        }[form](net)
        got = camfn.gradcam(net, p, x, "2", 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the tie is real: a new value under the first name reaches both convolutions
    p = dict(net.named_parameters())
    p["0.weight"] = p["0.weight"] * 2
    changed = camfn.apply(net, p, x)
    a = torch.relu(
        nn.functional.conv2d(
            nn.functional.conv2d(x, p["0.weight"], net[0].bias, padding=1), p["0.weight"], net[1].bias, padding=1
        )
    )
    torch.testing.assert_close(changed, net[5](a.mean((2, 3))))


def test_layer_inside_an_fx_leaf_module_is_reached_through_export() -> None:
    import torchvision

    model = torchvision.models.mobilenet_v2(num_classes=4).eval()
    x, layer = torch.randn(1, 3, 64, 64), "features.17.conv.0.1"  # the BatchNorm inside a Conv2dNormActivation
    leaves = {"leaf_modules": [torchvision.ops.Conv2dNormActivation]}  # a block a user keeps opaque to fx
    with pytest.raises(LayerError, match="tracer='export' reaches it"):
        camfn.gradcam(model, camfn.params(model), x, layer, 1, tracer="fx", tracer_options=leaves)
    auto = camfn.gradcam(model, camfn.params(model), x, layer, 1)  # torchvision.ops blocks are traced through
    ref = camfn.gradcam(model, camfn.params(model), x, layer, 1, tracer="export")
    torch.testing.assert_close(auto, ref)


def test_layers_of_a_float64_model_from_a_shape() -> None:
    model = GapNet().double().eval()
    assert camfn.layers(model, (1, 3, 8, 8))[-1].shape == (1, 5)
    assert camfn.default_layer(model, (1, 3, 8, 8)) == "act"


def test_list_of_per_sample_dicts_output_in_the_score_family() -> None:
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = double_gapnet(1)

        def forward(self, x: torch.Tensor) -> list[dict]:
            logits = self.body(x)
            return [{"scores": row} for row in logits.unbind(0)]

    model = Detector().eval()
    x = image(2, 8, seed=6)

    def target(out: list[dict]) -> torch.Tensor:
        return torch.stack([o["scores"][1] for o in out])

    ours = camfn.scorecam(model, camfn.params(model), x, "body.act", target)
    ref = camfn.scorecam(model.body, camfn.params(model.body), x, "act", 1)
    torch.testing.assert_close(ours, ref)
    assert np.isfinite(ours.numpy()).all()
