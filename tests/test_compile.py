"""torch.compile: every method compiles with fullgraph=True and zero graph breaks; compiled == eager.

Backends: every method runs through ``backend="eager"`` (dynamo's graph capture with ``fullgraph=True``
raises on any graph break, so a compiled call that returns proves zero breaks); :func:`camfn.graph_breaks`
(``torch._dynamo.explain``, which re-traces the method) counts breaks for one method of each family
(gradient, activation, perturbation, noisy); one method runs through ``inductor`` (generated C++ kernels)
and one through ``aot_eager`` with gradients to the parameters. Tiny model, 16 px: inductor on a ResNet
takes minutes on a CPU (see benchmarks/compile.py).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import CNN_METHODS

import camfn

LAYER = "relu"  # conv2 and a ReLU follow it, so gradients (and noise) matter
TOL = 1e-5


def _layer(name: str) -> str:
    return "act" if name == "cam" else LAYER  # cam needs global pooling and the classifier right after


SMALL = {"n": 2, "num_scales": 2}  # noisy methods: 2 samples; sess: 2 scales


def _options(method) -> dict:
    params = inspect.signature(method).parameters
    return {k: v for k, v in SMALL.items() if k in params}


@pytest.fixture(scope="module")
def net(gapnet: torch.nn.Module) -> torch.nn.Module:
    return gapnet  # conftest's GapNet(classes=5, width=6) with random BatchNorm statistics


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


TARGET = torch.tensor([1, 3])


@pytest.mark.parametrize("name", sorted(CNN_METHODS))
def test_every_method_compiles_with_fullgraph_and_equals_eager(name, net, x):
    method, layer = camfn.METHODS[name], _layer(name)
    p = camfn.params(net)
    options = _options(method)
    eager = method(net, p, x, layer, TARGET, **options)
    fast = camfn.compiled(method, net, layer, backend="eager", **options)
    got = fast(p, x, TARGET)  # fullgraph=True: any graph break raises here
    assert (got - eager).abs().max().item() <= TOL


REPRESENTATIVES = [
    "gradcam",
    "eigencam",
    "ablationcam",
    "smooth_gradcampp",
]  # gradient, activation, perturbation, noisy


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_explain_counts_no_graph_break(name, net, x):
    method = camfn.METHODS[name]
    p = camfn.params(net)
    assert camfn.graph_breaks(method, net, p, x, _layer(name), TARGET, **_options(method)) == 0


def test_compiled_follows_new_shapes_targets_and_params(net, x):
    fast = camfn.compiled(camfn.gradcampp, net, LAYER, backend="eager", size=None)
    other = {k: v * 1.5 if v.is_floating_point() and k.endswith("weight") else v for k, v in camfn.params(net).items()}
    small = x[:1, :, :12, :12]
    for p, inputs, target in [(camfn.params(net), x, None), (other, x, 4), (other, small, None)]:
        expected = camfn.gradcampp(net, p, inputs, LAYER, target, size=None)
        assert torch.allclose(fast(p, inputs, target), expected, atol=TOL)


def test_noisy_methods_replay_the_seeded_noise(net, x):
    """Two compiled copies with different seeds each replay their own draw (no noise baked into a shared cache).

    smooth_gradcampp compiles ~2x faster than sscam; both share the seeded-noise path, and sscam's compiled
    default-seed map is checked against eager above.
    """
    p = camfn.params(net)
    maps = {}
    for seed in (0, 7):
        fast = camfn.compiled(camfn.smooth_gradcampp, net, LAYER, backend="eager", n=2, seed=seed)
        maps[seed] = camfn.smooth_gradcampp(net, p, x, LAYER, TARGET, n=2, seed=seed)
        assert torch.allclose(fast(p, x, TARGET), maps[seed], atol=TOL)
    assert (maps[0] - maps[7]).abs().max() > 1e-3  # the seed matters, so replaying the right draw is a real check


def test_inductor_equals_eager(net, x):
    """Generated kernels (C++ on the CPU): the slowest test here, ~20-40 s cold on 2 cores."""
    p = camfn.params(net)
    fast = camfn.compiled(camfn.gradcam, net, LAYER, backend="inductor")
    assert (fast(p, x, TARGET) - camfn.gradcam(net, p, x, LAYER, TARGET)).abs().max().item() <= TOL


def test_gradients_flow_through_a_compiled_map(net, x):
    """d/dtheta of a loss on the raw map: a second-order derivative through the vjp inside the method."""
    weights = dict(net.named_parameters())
    p = camfn.params(net)
    frozen = {k: v for k, v in p.items() if k not in weights}

    def loss(trainable):
        return camfn.gradcam(net, {**frozen, **trainable}, x, LAYER, TARGET, normalize=False).pow(2).sum()

    expected = torch.func.grad(loss)({k: p[k] for k in weights})
    fast = camfn.compiled(camfn.gradcam, net, LAYER, backend="aot_eager", normalize=False)
    leaves = {k: p[k].clone().requires_grad_() for k in weights}
    out = fast({**frozen, **leaves}, x, TARGET).pow(2).sum()
    got = torch.autograd.grad(out, list(leaves.values()), allow_unused=True, materialize_grads=True)
    assert any(g.abs().max() > 0 for g in got)
    for key, g in zip(leaves, got, strict=True):
        assert torch.allclose(g, expected[key], atol=1e-6, rtol=1e-5), key


def test_aug_smooth_is_refused_with_a_reason(net):
    with pytest.raises(camfn.OptionError, match="aug_smooth"):
        camfn.compiled(camfn.gradcam, net, LAYER, aug_smooth=True)
