"""Properties (hypothesis): batch independence, permutation equivariance, many targets = separate calls,
vmap over samples / targets / parameter sets = loops, differentiability."""

from __future__ import annotations

import pytest
import torch
from conftest import CNN_METHODS, GapNet, Residual, double_gapnet, image, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, stack_module_state, vmap

import camfn

GRADIENT = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "gradcam_elementwise", "eigengradcam"]
ALL = sorted(CNN_METHODS)
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def net() -> GapNet:
    return double_gapnet(0)


def _x(seed: int, batch: int, size: int = 8) -> torch.Tensor:
    return image(batch, size, seed)


def _targets(seed: int, batch: int, t: int | None = None) -> torch.Tensor:
    shape = (batch,) if t is None else (batch, t)
    return torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(seed + 1))


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 5), method=st.sampled_from(ALL))
def test_sample_map_independent_of_batch(net: GapNet, seed: int, batch: int, method: str) -> None:
    x, t = _x(seed, batch), _targets(seed, batch)
    fn = camfn.METHODS[method]
    together = fn(net, camfn.params(net), x, "act", t)
    for i in range(batch):
        alone = fn(net, camfn.params(net), x[i : i + 1], "act", t[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone)


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 5), method=st.sampled_from(ALL))
def test_permuting_the_batch_permutes_the_maps(net: GapNet, seed: int, batch: int, method: str) -> None:
    x, t = _x(seed, batch), _targets(seed, batch)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    fn = camfn.METHODS[method]
    torch.testing.assert_close(
        fn(net, camfn.params(net), x[perm], "act", t[perm]), fn(net, camfn.params(net), x, "act", t)[perm]
    )


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    t=st.integers(1, 4),
    method=st.sampled_from([*GRADIENT, "cam"]),
)
def test_many_targets_equal_separate_calls(net: GapNet, seed: int, batch: int, t: int, method: str) -> None:
    x, targets = _x(seed, batch), _targets(seed, batch, t)
    fn = camfn.METHODS[method]
    many = fn(net, camfn.params(net), x, "act", targets)
    assert many.shape == (batch, t, 8, 8)
    for j in range(t):
        torch.testing.assert_close(many[:, j], fn(net, camfn.params(net), x, "act", targets[:, j]))


@SETTINGS
@given(seed=st.integers(0, 10_000), t=st.integers(1, 4), method=st.sampled_from(GRADIENT))
def test_vmap_over_targets_equals_loop(net: GapNet, seed: int, t: int, method: str) -> None:
    x, targets = _x(seed, 2), _targets(seed, 2, t).T  # (T, B)
    fn = camfn.METHODS[method]
    mapped = vmap(lambda c: fn(net, camfn.params(net), x, "act", c))(targets)
    looped = torch.stack([fn(net, camfn.params(net), x, "act", c) for c in targets])
    torch.testing.assert_close(mapped, looped)


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), method=st.sampled_from(ALL))
def test_vmap_over_samples_equals_batch(net: GapNet, seed: int, batch: int, method: str) -> None:
    x, t = _x(seed, batch), _targets(seed, batch)
    fn = camfn.METHODS[method]
    mapped = vmap(lambda xi, ti: fn(net, camfn.params(net), xi[None], "act", ti[None])[0])(x, t)
    torch.testing.assert_close(mapped, fn(net, camfn.params(net), x, "act", t))


@pytest.mark.parametrize("method", ALL)
def test_vmap_over_parameter_sets_equals_loop(method: str) -> None:
    torch.manual_seed(5)
    models = [randomize_bn(GapNet(), seed=i).double().eval() for i in range(3)]
    params, buffers = stack_module_state(models)
    stacked = {k: v.detach() for k, v in {**params, **buffers}.items()}
    x, t = _x(0, 2), torch.tensor([1, 3])
    fn = camfn.METHODS[method]
    mapped = vmap(lambda p: fn(models[0], p, x, "act", t))(stacked)
    looped = torch.stack([fn(m, camfn.params(m), x, "act", t) for m in models])
    torch.testing.assert_close(mapped, looped)
    if method != "sobel":  # sobel is model-free: the same map for every parameter set
        assert not torch.allclose(looped[0], looped[1]), "parameter sets should give different maps"


@pytest.mark.parametrize("method", [*GRADIENT, "cam", "eigencam"])
def test_raw_map_differentiable_wrt_input(method: str) -> None:
    """torch.func.grad of a scalar of the raw map w.r.t. x matches central finite differences."""
    torch.manual_seed(6)
    model = Residual().double().eval()
    fn = camfn.METHODS[method]
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    weights = torch.randn(5, 5, dtype=torch.float64)

    layer = "relu" if method == "cam" else "conv"  # cam needs pooling right after its layer

    def loss(inp: torch.Tensor) -> torch.Tensor:
        raw = fn(model, camfn.params(model), inp, layer, 1, relu=False, size=None, normalize=False)
        return (raw[0] * weights).sum()

    g = grad(loss)(x)
    direction = torch.randn_like(x)
    h = 1e-6
    numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    torch.testing.assert_close((g * direction).sum(), numeric, rtol=1e-4, atol=1e-6)
    assert g.abs().sum() > 0


def test_raw_map_differentiable_wrt_params() -> None:
    torch.manual_seed(7)
    model = Residual().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    trainable = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict) -> torch.Tensor:
        return camfn.gradcam(model, p, x, "conv", 0, relu=False, size=None, normalize=False).pow(2).sum()

    g = grad(loss)(trainable)
    direction = {k: torch.randn_like(v) for k, v in trainable.items()}
    h = 1e-6
    plus = loss({k: v + h * direction[k] for k, v in trainable.items()})
    minus = loss({k: v - h * direction[k] for k, v in trainable.items()})
    analytic = sum((g[k] * direction[k]).sum() for k in g)
    torch.testing.assert_close(analytic, (plus - minus) / (2 * h), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
