"""The fast inference program (BatchNorm folded, ReLU/residual fused, weights packed) equals the plain graph."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import GapNet, Residual, randomize_bn
from torch import nn

import camfn
from camfn.inference import available, bind, inference


def _models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    return {
        "resnet18": (torchvision.models.resnet18(num_classes=10), 20),
        "vgg11_bn": (torchvision.models.vgg11_bn(num_classes=10), 8),
        "squeezenet1_1": (torchvision.models.squeezenet1_1(num_classes=10), 26),  # conv -> ReLU, no BatchNorm
        # convolutions inside torchvision.ops leaf modules (Conv2dNormActivation) stay as they are
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(num_classes=10), 0),  # oneDNN refuses: plain
        "gapnet": (GapNet(), 2),
        "residual": (Residual(), 2),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_fast_program_equals_plain(name: str) -> None:
    model, convs = _models()[name]
    model = randomize_bn(model).eval()
    p = camfn.params(model)
    before = {k: v.clone() for k, v in p.items()}
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    traced = camfn.tracing.trace(model)
    bind(traced, p, x)(x)  # the first run checks that oneDNN takes every fusion
    assert inference(traced, x).fused == convs  # every Conv2d rewritten
    want = traced.program()(p, x)
    for inputs in (x, x[:1], x.contiguous(memory_format=torch.channels_last)):  # any batch, any layout
        got = bind(traced, p, x)(inputs)
        torch.testing.assert_close(got, traced.program()(p, inputs), rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for k, v in p.items():
        assert torch.equal(v, before[k]), k


def test_other_params_other_output(gapnet: nn.Module) -> None:
    """Weights are read from the params passed to bind, not frozen into the program."""
    traced = camfn.tracing.trace(gapnet)
    x = torch.randn(2, 3, 16, 16)
    p = {k: v * 1.5 if v.is_floating_point() else v for k, v in camfn.params(gapnet).items()}
    torch.testing.assert_close(bind(traced, p, x)(x), traced.program()(p, x), rtol=1e-4, atol=1e-5)


def test_fallbacks() -> None:
    x = torch.randn(1, 3, 8, 8)
    assert available(x)
    assert not available(x.double())
    assert not available(torch.randn(1, 3, 8, 8, 8))
    assert torch.func.vmap(lambda t: torch.tensor(available(t)))(x.unsqueeze(0)).item() is False


def test_scorecam_fast_path_same_maps(resnet18: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 Score-CAM through the fused program equals Score-CAM through the plain graph."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    p = camfn.params(resnet18)
    fast = camfn.scorecam(resnet18, p, x, "layer3", 1)
    monkeypatch.setattr(camfn.inference, "available", lambda x: False)
    plain = camfn.scorecam(resnet18, p, x, "layer3", 1)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)


def test_gradients_never_flow_through_the_fused_ops(gapnet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's fused ops have no autograd formula: a differentiable call takes the plain graph."""
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    p = camfn.params(gapnet)
    traced = camfn.tracing.trace(gapnet)
    assert not available(x)
    trainable = {k: v.detach().requires_grad_("running" not in k and v.is_floating_point()) for k, v in p.items()}
    out = bind(traced, trainable, x.detach())(x.detach())
    assert out.grad_fn is not None and "mkldnn" not in str(out.grad_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "an autograd kernel was not registered" would be raised here
        (gx,) = torch.autograd.grad(camfn.scorecam(gapnet, p, x, "conv2", 1).sum(), x)
    monkeypatch.setattr(camfn.inference, "available", lambda x: False)
    (want,) = torch.autograd.grad(camfn.scorecam(gapnet, p, x, "conv2", 1).sum(), x)
    torch.testing.assert_close(gx, want)
