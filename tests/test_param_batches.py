"""Parameter batches: vmap over stacked parameters equals a loop over the members."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import GapNet, randomize_bn

import camfn

METHODS = ["gradcam", "layercam", "cam", "eigencam", "smooth_gradcampp", "ablationcam", "scorecam"]


@pytest.fixture(scope="module")
def members() -> list[torch.nn.Module]:
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(randomize_bn(GapNet(classes=5, width=6), seed=seed).double().eval())
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("name", METHODS)
def test_stacked_members_equal_a_loop(name, members, x):
    method = camfn.METHODS[name]
    layer = "act" if name == "cam" else "relu"
    options = {"n": 2} if "n" in inspect.signature(method).parameters else {}
    stacked = camfn.stack_params([camfn.params(m) for m in members])
    got = camfn.maps_over_params(method, members[0], stacked, x, layer, None, **options)
    loop = torch.stack([method(m, camfn.params(m), x, layer, None, **options) for m in members])
    assert got.shape == (3, 2, 12, 12)
    assert torch.allclose(got, loop, atol=1e-10)
    assert (loop[0] - loop[1]).abs().max() > 1e-3  # the members really differ


def test_stack_module_state_and_chunks_and_several_layers(members, x):
    weights, buffers = torch.func.stack_module_state(members)
    stacked = {**weights, **buffers}
    got = camfn.maps_over_params(camfn.gradcam, members[0], stacked, x, ["relu", "act"], 1, chunk_size=2)
    for i, m in enumerate(members):
        each = camfn.gradcam(m, camfn.params(m), x, ["relu", "act"], 1)
        for a, b in zip(got, each, strict=True):
            assert torch.allclose(a[i], b, atol=1e-10)


def test_members_must_match(members):
    p = camfn.params(members[0])
    with pytest.raises(camfn.InputError, match="different keys"):
        camfn.stack_params([p, {k: v for k, v in p.items() if k != "fc.bias"}])
    with pytest.raises(camfn.InputError, match="different shapes"):
        camfn.stack_params([p, {**p, "fc.bias": torch.zeros(7)}])
    with pytest.raises(camfn.InputError, match="leading member axis"):
        camfn.maps_over_params(
            camfn.gradcam,
            members[0],
            {"fc.bias": torch.zeros(2, 5), "fc.weight": torch.zeros(3, 5, 6)},
            torch.zeros(1, 3, 8, 8),
        )
