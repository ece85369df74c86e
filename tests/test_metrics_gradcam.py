"""Parity of camfn's grad-cam-style metrics with pytorch-grad-cam 1.5.7 (and master's ARCC formula).

Tiny random-weight RGB CNN, float32, 3 images at 24 px. grad-cam's imputer draws its noise from the global
torch RNG per image, so both sides run with noise 0 (grad-cam's default 0.01 is patched to 0 for the test).
grad-cam 1.5.7 has no ARCC: its master definition (complexity, coherency, ROADCombined) is checked as a
formula loop over grad-cam's installed ROADCombined. Tolerance 1e-4 (float32 sparse solves).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camfn
from camfn import metrics

road = pytest.importorskip("pytorch_grad_cam.metrics.road")
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

TOL = {"atol": 1e-4, "rtol": 1e-4}
# grad-cam hands torch tensors to np.mean/np.percentile (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 24, generator=g)
    maps = torch.rand(3, 24, 24, generator=g)
    y = torch.tensor([0, 2, 1])
    return model, camfn.params(model), x, maps, y, [ClassifierOutputTarget(int(c)) for c in y]


@pytest.fixture
def quiet_imputer(monkeypatch):
    monkeypatch.setattr(road.NoisyLinearImputer.__init__, "__defaults__", (0.0, road.neighbors_weights))


def test_cam_mult_image_confidence_change(setup):
    model, p, x, maps, y, targets = setup
    expected = CamMultImageConfidenceChange()(x, maps.numpy(), targets, model)
    got = metrics.cam_mult_image_confidence_change(model, p, x, maps, y)
    assert torch.allclose(got, torch.as_tensor(expected), **TOL)


@pytest.mark.parametrize("percentiles", [(10, 50, 90), (25, 75)])
def test_road_averages_and_combined(setup, quiet_imputer, percentiles):
    model, p, x, maps, y, targets = setup
    cams = maps.numpy()
    opts = {"percentiles": percentiles, "noise": 0.0}
    morf = road.ROADMostRelevantFirstAverage(list(percentiles))(x, cams, targets, model)
    lerf = road.ROADLeastRelevantFirstAverage(list(percentiles))(x, cams, targets, model)
    combined = road.ROADCombined(list(percentiles))(x, cams, targets, model)
    assert torch.allclose(
        metrics.road_most_relevant_first_average(model, p, x, maps, y, **opts), torch.as_tensor(morf), **TOL
    )
    assert torch.allclose(
        metrics.road_least_relevant_first_average(model, p, x, maps, y, **opts), torch.as_tensor(lerf), **TOL
    )
    assert torch.allclose(metrics.road_combined(model, p, x, maps, y, **opts), torch.as_tensor(combined), **TOL)


def test_arcc_by_grad_cam_masters_formula(setup, quiet_imputer):
    model, p, x, _, y, targets = setup
    maps = camfn.gradcam(model, p, x, "2", y)
    got = metrics.arcc(camfn.gradcam, model, p, x, "2", y, maps=maps, percentiles=(20, 40, 60, 80), noise=0.0)
    cams = maps.numpy().astype(np.float64)
    complexity = np.abs(cams).reshape(3, -1).sum(1) / cams[0].size
    mixed = camfn.gradcam(model, p, x * maps[:, None], "2", y).numpy().astype(np.float64)
    a, b = mixed.reshape(3, -1), cams.reshape(3, -1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    n = a.shape[1] - 1
    rho = (a * b).sum(1) / n / (np.sqrt((a**2).sum(1) / n) * np.sqrt((b**2).sum(1) / n) + 1e-8)
    coherency = (rho + 1) / 2
    combined = road.ROADCombined([20, 40, 60, 80])(x, maps.numpy(), targets, model)
    r = np.clip(2 * combined, 0, 1)
    expected = 3 / (1 / (coherency + 1e-8) + 1 / (1 - complexity + 1e-8) + 1 / (r + 1e-8))
    assert torch.allclose(got, torch.as_tensor(expected), **TOL)
