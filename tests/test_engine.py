"""The engine is pure at call time: threads, staleness, writes inside the forward, and model_fn.

- Threads: calls from many threads on one model with different ``params`` equal the sequential calls bit
  for bit (float64), for every method, eager and through ``camfn.compiled``; the model's own forward is
  unchanged afterwards.
- Never stale: after a change of anything the trace reads (a stride, a Python attribute used in
  ``forward``, a replaced submodule or parameter), the next call explains the changed model.
- Writes inside the user's forward land on camfn's copies; the caller's tensors are unchanged.
- ``model_fn(params, x)`` gives the maps of the module it wraps.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import CNN_METHODS, image
from torch import nn

import camfn

EXTRA = {"n": 2, "fc": "fc", "num_scales": 2}  # fc: the classifier for cam (these forwards scale or shift the logits)


def _options(name: str) -> dict:
    params = camfn.METHODS[name].spec.options
    return {k: v for k, v in EXTRA.items() if k in params}


class Block(nn.Module):
    """conv-BN-ReLU(inplace) twice with a residual add: what resnets do."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Block(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)
        self.temperature = 1.0
        self.scales = [1.0]  # a list read in forward: edited in place, it must count as a change
        self.options = {"gain": 1.0}  # ... and a dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block(F.relu(self.stem(x)))
        return self.fc(self.pool(a).flatten(1)) * self.temperature * self.scales[0] * self.options["gain"]


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net().double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def model() -> Net:
    return _net(0)


def _param_sets(n: int) -> list[dict]:
    return [camfn.params(_net(seed)) for seed in range(1, n + 1)]


def _run_threads(fn, items: list) -> list:
    results: list = [None] * len(items)
    errors: list = []
    start = threading.Barrier(len(items))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):  # several rounds so the calls interleave
                results[i] = fn(items[i])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("name", list(CNN_METHODS))
def test_threads_equal_sequential_bit_for_bit(model: Net, name: str) -> None:
    method, x, sets = camfn.METHODS[name], image(2, 12, seed=3), _param_sets(4)
    sequential = [method(model, p, x, "block", 2, **_options(name)) for p in sets]
    parallel = _run_threads(lambda p: method(model, p, x, "block", 2, **_options(name)), sets)
    for seq, par in zip(sequential, parallel, strict=True):
        assert torch.equal(seq, par)
    if name != "sobel":  # sobel is model-free: its map does not depend on the parameters
        assert not torch.equal(sequential[0], sequential[1])  # the parameter sets really differ
    torch.testing.assert_close(camfn.apply(model, camfn.params(model), x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CNN_METHODS))
def test_compiled_threads_equal_sequential(model: Net, name: str) -> None:
    x, sets = image(2, 12, seed=4), _param_sets(4)
    fast = camfn.compiled(camfn.METHODS[name], model, "block", backend="eager", **_options(name))
    sequential = [fast(p, x, 1) for p in sets]
    parallel = _run_threads(lambda p: fast(p, x, 1), sets)
    for seq, par in zip(sequential, parallel, strict=True):
        assert torch.equal(seq, par)
    torch.testing.assert_close(camfn.apply(model, camfn.params(model), x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- never stale
def _changes():
    def stride(net: Net) -> None:
        net.stem.stride = (2, 2)

    def temperature(net: Net) -> None:
        net.temperature = -3.0

    def padding(net: Net) -> None:
        net.block.conv2.padding = (2, 2)
        net.block.conv2.dilation = (2, 2)

    def eps(net: Net) -> None:
        net.block.bn1.eps = 10.0

    def submodule(net: Net) -> None:
        net.block.relu = nn.LeakyReLU(0.3)

    def parameter(net: Net) -> None:
        net.fc.weight = nn.Parameter(torch.randn_like(net.fc.weight))

    def assign(net: Net) -> None:
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        state = {k: v.abs() + 0.5 if "running_var" in k else v for k, v in state.items()}
        net.load_state_dict(state, assign=True)

    def mode(net: Net) -> None:
        net.block.relu.inplace = False
        net.pool = nn.AdaptiveMaxPool2d(1)

    def list_item(net: Net) -> None:
        net.scales[0] = -2.0

    def dict_item(net: Net) -> None:
        net.options["gain"] = -2.0

    def deleted(net: Net) -> None:  # a parameter removed (the graph reads no bias any more)
        del net.stem.bias
        net.stem.bias = None

    return [stride, temperature, padding, eps, submodule, parameter, assign, mode, list_item, dict_item, deleted]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["gradcam", "scorecam", "ablationcam"])
def test_next_call_explains_the_changed_model(change, name: str) -> None:
    _explains_the_changed_model(change, name)


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_changes_are_seen_without_dict_version_tags(change, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where this Python has no per-dict version tags, the fingerprint's value comparison alone decides."""
    monkeypatch.setattr(camfn.tracing, "_DICT_VERSION", None)
    _explains_the_changed_model(change, "gradcam")


def _explains_the_changed_model(change, name: str) -> None:
    net, x = _net(5), image(2, 12, seed=6)
    method = camfn.METHODS[name]
    before = net(x)
    method(net, camfn.params(net), x, "block", 1, relu=False, normalize=False)  # traced and cached
    change(net)
    after = method(net, camfn.params(net), x, "block", 1, relu=False, normalize=False)
    fresh = copy.deepcopy(net)  # traced for the first time
    expected = method(fresh, camfn.params(fresh), x, "block", 1, relu=False, normalize=False)
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(before, net(x))  # the change matters
    torch.testing.assert_close(camfn.apply(net, camfn.params(net), x), net(x), rtol=1e-12, atol=1e-12)


def test_hooks_added_and_removed_are_seen(model: Net) -> None:
    x = image(2, 12, seed=6)
    net = copy.deepcopy(model)
    clean = camfn.gradcam(net, camfn.params(net), x, "block", 1)
    handle = net.block.register_forward_hook(lambda m, i, o: o * 2 - 1)
    with pytest.raises(camfn.errors.HookError):
        camfn.gradcam(net, camfn.params(net), x, "block", 1)
    kept = camfn.gradcam(net, camfn.params(net), x, "block", 1, hooks="keep")
    assert not torch.allclose(kept, clean)  # the hook runs, so the kept trace is not the clean one
    handle.remove()
    torch.testing.assert_close(camfn.gradcam(net, camfn.params(net), x, "block", 1), clean, rtol=0, atol=0)


def test_unchanged_model_reuses_its_trace(model: Net) -> None:
    first = camfn.tracing.trace(model)
    assert camfn.tracing.trace(model) is first
    model.fc.weight.data.mul_(1.0)  # values change in place: the same graph
    assert camfn.tracing.trace(model) is first
    model.eval()  # rewrites every module's mode with the value it has
    model.block.bn1.eps = float(str(model.block.bn1.eps))  # a new object, equal: the dict's version moves
    model.options["gain"] = model.options["gain"] + 0.0
    assert camfn.tracing.trace(model) is first
    assert camfn.tracing.trace(model) is first  # and the new versions are remembered


# ---------------------------------------------------------------------------- writes in the forward
class Writes(nn.Module):
    """A forward that writes a buffer and its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        x.mul_(2)
        x[:, 0].add_(1)
        a = torch.relu(self.conv(x))
        return self.fc(a.mean((2, 3))) + self.count


def _reference(net: Writes, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at ``relu`` by plain autograd on copies (what the forward computes once)."""
    x2 = x.clone() * 2
    x2[:, 0] += 1
    a = torch.relu(net.conv(x2)).detach().requires_grad_(True)
    score = (net.fc(a.mean((2, 3))) + net.count + 1)[:, 1].sum()
    (g,) = torch.autograd.grad(score, a)
    return F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()


@pytest.mark.parametrize("name", list(CNN_METHODS))
def test_writes_inside_the_forward_stay_inside_camfn(name: str) -> None:
    torch.manual_seed(0)
    net = Writes().double().eval()
    x = image(2, 8, seed=1)
    x_before, count_before = x.clone(), net.count.clone()
    maps = camfn.METHODS[name](net, camfn.params(net), x, "relu", 1, size=None, normalize=False, **_options(name))
    assert torch.equal(x, x_before)
    assert torch.equal(net.count, count_before)
    assert torch.isfinite(maps).all()
    if name == "gradcam":
        torch.testing.assert_close(maps, _reference(net, x), rtol=1e-9, atol=1e-12)


def test_writes_to_a_parameter_inside_a_leaf_module_stay_private() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.add_(1)
            return x * 1.0

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), Counter(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    net = net.double().eval()
    options = {"tracer": "fx", "tracer_options": {"leaf_modules": [Counter]}}
    camfn.gradcam(net, camfn.params(net), image(1, 8), "2", 0, **options)
    assert float(net[1].seen) == 0.0


# -------------------------------------------------------------------------------------- model_fn
def test_model_fn_equals_the_module_for_every_method(model: Net) -> None:
    fn = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    p, x = camfn.params(model), image(2, 12, seed=7)
    names = [i.name for i in camfn.layers(fn, x, params=p)]
    node = [n for n in names if n.startswith("relu")][-1]  # the block's last ReLU
    for name, method in CNN_METHODS.items():
        if name == "cam":  # the classifier is found as a module
            continue
        ours = method(fn, p, x, node, 2, **_options(name))
        ref = method(model, p, x, "block", 2, **_options(name))
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10, msg=name)


def test_model_fn_by_hand_closed_form() -> None:
    def model_fn(p: dict, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, p["w"], padding=1)).mean((2, 3)) @ p["fc"]

    torch.manual_seed(2)
    p = {"w": torch.randn(4, 3, 3, 3, dtype=torch.float64), "fc": torch.randn(4, 3, dtype=torch.float64)}
    x = image(2, 6, seed=2)
    maps = camfn.gradcam(model_fn, p, x, "relu", 2, relu=False, size=None, normalize=False)
    a = F.relu(F.conv2d(x, p["w"], padding=1))
    expected = (p["fc"][:, 2][None, :, None, None] / a[0, 0].numel() * a).sum(1)  # w_k = fc[k, c] / Z
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    assert camfn.default_layer(model_fn, x, params=p) == "relu"
    other = {k: v * 2 for k, v in p.items()}  # the maps follow the params given, not the trace-time ones
    assert not torch.allclose(camfn.gradcam(model_fn, other, x, "relu", 2, normalize=False), maps)


def test_model_fn_errors() -> None:
    with pytest.raises(camfn.InputError, match="dict of tensors"):
        camfn.gradcam(lambda p, x: x, [1, 2], image(1, 4), None, 0)
    p = {"w": torch.randn(2, 3, 3, 3)}
    with pytest.raises(camfn.InputError, match=r"camfn\.params needs an nn\.Module"):
        camfn.params(lambda p, x: x)
    with pytest.raises(camfn.LayerError, match="nearest names"):
        camfn.gradcam(lambda q, x: F.conv2d(x, q["w"]).mean((2, 3)), p, image(1, 6).float(), "conv", 0)
