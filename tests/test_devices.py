"""Devices and dtypes: maps come back on the input's device, in the input's dtype.

On the CPU float32 and float64 are the tested precisions; float16 / bfloat16 also run (every method; the
eigen methods solve their SVD in float32) and agree with float32 maps to visualisation precision. GPU
tests run where CUDA exists and are skipped with the reason otherwise.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import CNN_METHODS, GapNet

import camfn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
LOW = [torch.float16, torch.bfloat16]
FAST = ["gradcam", "gradcampp", "layercam", "cam", "eigencam", "ablationcam", "scorecam"]


def _layer(name: str) -> str:
    return "act" if name == "cam" else "relu"


def _options(method) -> dict:
    return {"n": 2} if "n" in inspect.signature(method).parameters else {}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def net(gapnet: torch.nn.Module) -> torch.nn.Module:
    return gapnet  # conftest's GapNet(classes=5, width=6) with random BatchNorm statistics


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _converted(net: torch.nn.Module, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    copy = GapNet(classes=5, width=6).eval()
    copy.load_state_dict(net.state_dict())
    return copy.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", sorted(CNN_METHODS))
def test_half_precision_on_cpu_follows_the_input_dtype(name, dtype, net, x):
    method, layer = camfn.METHODS[name], _layer(name)
    reference = method(net, camfn.params(net), x, layer, 1, **_options(method))
    low = _converted(net, dtype)
    maps = method(low, camfn.params(low), x.to(dtype), layer, 1, **_options(method))
    assert maps.dtype == dtype
    assert maps.device == x.device
    assert bool(torch.isfinite(maps).all()) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert _correlation(maps, reference) > 0.95


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("name", FAST)
def test_gpu_maps_stay_on_the_gpu_and_match_the_cpu(name, dtype, net, x):
    method, layer = camfn.METHODS[name], _layer(name)
    reference = method(net, camfn.params(net), x, layer, 1, **_options(method))
    gpu = _converted(net, dtype, "cuda")
    maps = method(gpu, camfn.params(gpu), x.to("cuda", dtype), layer, 1, **_options(method))
    assert maps.device.type == "cuda" and maps.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(maps.cpu(), reference, atol=1e-4)
    else:
        assert _correlation(maps.cpu(), reference) > 0.95


@CUDA
def test_gpu_autocast_float32_model(net, x):
    gpu = _converted(net, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        maps = camfn.gradcam(gpu, camfn.params(gpu), x.cuda(), "relu", 1)
    reference = camfn.gradcam(net, camfn.params(net), x, "relu", 1)
    assert maps.device.type == "cuda"
    assert _correlation(maps.float().cpu(), reference) > 0.95


@CUDA
def test_gpu_compiled_equals_eager(net, x):
    gpu = _converted(net, torch.float32, "cuda")
    p, xs = camfn.params(gpu), x.cuda()
    fast = camfn.compiled(camfn.gradcam, gpu, "relu", backend="aot_eager")
    assert torch.allclose(fast(p, xs, 1), camfn.gradcam(gpu, p, xs, "relu", 1), atol=1e-5)
