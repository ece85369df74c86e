"""3D inputs (B, C, D, H, W): the gradient family on a tiny Conv3d net, against slow formulas written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camfn


class VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv3d(4, 5, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.relu(self.bn(self.conv1(x)))))
        return self.fc(h.mean((2, 3, 4)))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = VolumeNet()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(2, 2, 6, 8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _slow_a_and_g(net: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A at the second ReLU and G = dS/dA, by plain autograd on a copy of the forward written out."""
    with torch.enable_grad():
        a = net.act(net.conv2(net.relu(net.bn(net.conv1(x))))).detach().requires_grad_(True)
        score = net.fc(a.mean((2, 3, 4)))[:, target].sum()
        (g,) = torch.autograd.grad(score, a)
    return a.detach(), g


def _finish(raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    up = F.interpolate(F.relu(raw)[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]
    low = up.flatten(1).amin(1).reshape(-1, 1, 1, 1)
    span = up.flatten(1).amax(1).reshape(-1, 1, 1, 1) - low
    return torch.where(span > 0, (up - low) / span.clamp_min(1e-300), torch.zeros_like(up))


def _slow(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    space = (2, 3, 4)
    if method == "gradcam":
        return (g.mean(space, keepdim=True) * a).sum(1)
    if method == "gradcampp":
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum(space, keepdim=True) * g3 + 1e-6)
        alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
        return ((alpha * F.relu(g)).sum(space, keepdim=True) * a).sum(1)
    if method == "xgradcam":
        w = (g * a).sum(space, keepdim=True) / (a.sum(space, keepdim=True) + 1e-7)
        return (w * a).sum(1)
    if method == "layercam":
        return (F.relu(g) * a).sum(1)
    return (g * a).sum(1)  # hirescam


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"])
def test_volume_maps_match_slow_formulas(net, volume, method) -> None:
    ours = camfn.METHODS[method](net, camfn.params(net), volume, "act", 1)
    assert ours.shape == (2, 6, 8, 10)  # (B, D, H, W) at the input size, trilinear
    a, g = _slow_a_and_g(net, volume, 1)
    torch.testing.assert_close(ours, _finish(_slow(method, a, g), (6, 8, 10)), rtol=1e-7, atol=1e-9)


def test_volume_layer_resolution_and_sizes(net, volume) -> None:
    p = camfn.params(net)
    low = camfn.gradcam(net, p, volume, "act", 2, size=None)
    assert low.shape == (2, 3, 4, 5)
    assert camfn.gradcam(net, p, volume, None, 2).shape == (2, 6, 8, 10)  # default layer: last 3D map
    assert camfn.gradcam(net, p, volume, "act", torch.tensor([[0, 2]] * 2), size=(3, 3, 3)).shape == (2, 2, 3, 3, 3)
    raw = camfn.hirescam(net, p, volume, "act", 2, relu=False, normalize=False, size=None)
    a, g = _slow_a_and_g(net, volume, 2)
    torch.testing.assert_close(raw, (g * a).sum(1), rtol=1e-7, atol=1e-12)
