"""Third-party adapters (``camfn.adapters.register``): a structural adapter runs once per trace and item shape,
any other once per call with the call's params; the defaults they give are the explicit call's."""

from __future__ import annotations

import pytest
import torch
from conftest import GapNet

import camfn
from camfn.adapters import ADAPTERS, Defaults, register


class Lib(GapNet):
    """A model class of a package camfn knows nothing about."""


Lib.__module__ = "camfn_test_lib.models"


@pytest.fixture
def calls():
    seen: list[float] = []
    yield seen
    ADAPTERS.pop("camfn_test_lib", None)


@pytest.mark.parametrize("structural", [True, False])
def test_registered_adapter_supplies_the_layer(calls: list, structural: bool) -> None:
    def adapter(model, params, trace, x):
        calls.append(float(params["conv2.bias"].sum()))
        return Defaults(layer="act")

    register("camfn_test_lib", adapter, structural=structural)
    torch.manual_seed(0)
    net = Lib().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    p = camfn.params(net)
    other = {k: v * 2 if k == "conv2.bias" else v for k, v in p.items()}
    for params in (p, other, p):
        got = camfn.gradcam(net, params, x, None, 1)
        torch.testing.assert_close(got, camfn.gradcam(net, params, x, "act", 1), rtol=0, atol=0)
    camfn.gradcam(net, p, torch.randn(1, 3, 12, 12, dtype=torch.float64), None, 1)  # another item shape
    sums = [float(p["conv2.bias"].sum()), float(other["conv2.bias"].sum())]
    if structural:  # once for the 8 x 8 item shape, once for 12 x 12
        assert calls == [sums[0], sums[0]]
    else:  # every call (also those that name the layer: the adapter may give the output or target), own params
        assert calls == [sums[0], sums[0], sums[1], sums[1], sums[0], sums[0], sums[0]]
