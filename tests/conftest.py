"""Tiny hand-built models shared by the tests (fast, with known structure)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camfn


class GapNet(nn.Module):
    """conv -> bn -> relu -> conv -> relu -> global average pool -> linear: CAM applies exactly."""

    def __init__(self, classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.relu(self.bn(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class LinearHead(nn.Module):
    """conv -> flatten -> linear: the score is linear in the conv output, so ``G`` is a weight slice."""

    def __init__(self, classes: int = 4, size: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class Residual(nn.Module):
    """A residual block with an in-place ReLU after the addition (skip connection crosses any cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.relu(self.conv(h) + h)
        return self.head(h.mean((2, 3)))


CNN_METHODS = {n: m for n, m in camfn.METHODS.items() if m.spec.requires is None}
"""Every method that explains any spatial layer (legrad needs attention blocks: tested on ViTs)."""


def image(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded float64 batch ``(batch, 3, size, size)``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def double_gapnet(seed: int) -> GapNet:
    """GapNet with random BatchNorm statistics, float64, eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(GapNet(classes=5, width=6)).double().eval()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place; test models only)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_xdist_worker():
    """Two xdist workers with two torch threads each oversubscribe two cores (forwards 100x slower)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
    else:
        yield


@pytest.fixture(scope="module")
def gapnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(GapNet()).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
