"""Closed-form checks on hand-built models where the maps are known exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GapNet, LinearHead, Residual, randomize_bn

import camfn
from camfn.postprocess import finish, normalize

RAW = {"relu": False, "size": None, "normalize": False}


@pytest.fixture(scope="module")
def linear_head() -> LinearHead:
    torch.manual_seed(1)
    return LinearHead().double().eval()


def _known(model: LinearHead, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = conv(x) and G = dS_c/dA = fc.weight[c] reshaped: exact for a linear head."""
    a = model.conv(x)
    g = model.fc.weight[c].reshape(a.shape)
    return a, g


def test_linear_head_gradients_are_the_weights(linear_head: LinearHead) -> None:
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    c = torch.tensor([0, 3, 1])
    a, g = _known(linear_head, x, c)
    p = camfn.params(linear_head)
    torch.testing.assert_close(camfn.hirescam(linear_head, p, x, "conv", c, **RAW), (g * a).sum(1))
    torch.testing.assert_close(
        camfn.gradcam(linear_head, p, x, "conv", c, **RAW), (g.mean((2, 3), keepdim=True) * a).sum(1)
    )
    torch.testing.assert_close(camfn.layercam(linear_head, p, x, "conv", c, **RAW), (F.relu(g) * a).sum(1))
    torch.testing.assert_close(camfn.gradcam_elementwise(linear_head, p, x, "conv", c, **RAW), F.relu(g * a).sum(1))
    xw = (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + 1e-7)
    torch.testing.assert_close(camfn.xgradcam(linear_head, p, x, "conv", c, **RAW), (xw * a).sum(1))


def test_gradcampp_closed_form(linear_head: LinearHead) -> None:
    """Grad-CAM++ alpha from the paper's Eq. 19 with the exact gradient, written out element by element."""
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    c = torch.tensor([2, 1])
    a, g = _known(linear_head, x, c)
    expected = torch.zeros(2, 5, 5, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            total = a[b, k].sum()
            alpha = g[b, k] ** 2 / (2 * g[b, k] ** 2 + total * g[b, k] ** 3 + 1e-6)
            expected[b] += (alpha * g[b, k].clamp(min=0)).sum() * a[b, k]
    got = camfn.gradcampp(linear_head, camfn.params(linear_head), x, "conv", c, **RAW)
    torch.testing.assert_close(got, expected)


def test_gap_linear_gradcam_equals_cam() -> None:
    """On GAP + linear, G_k = W[c, k] / HW everywhere, so Grad-CAM and CAM agree after normalisation."""
    torch.manual_seed(2)
    model = randomize_bn(GapNet()).double().eval()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    p = camfn.params(model)
    c = torch.tensor([0, 1, 2, 4])
    grad_maps = camfn.gradcam(model, p, x, "act", c)
    cam_maps = camfn.cam(model, p, x, "act", c)
    assert (grad_maps.amax((1, 2)) == 1).all()
    torch.testing.assert_close(grad_maps, cam_maps)
    raw = camfn.cam(model, p, x, "act", c, **RAW)
    expected = torch.einsum(
        "bk,bkhw->bhw", model.fc.weight[c], model.act(model.conv2(model.relu(model.bn(model.conv1(x)))))
    )
    torch.testing.assert_close(raw, expected)
    grad_raw = camfn.gradcam(model, p, x, "act", c, **RAW)
    torch.testing.assert_close(grad_raw, expected / 144)


def test_residual_preactivation_layer_sees_unclamped_values() -> None:
    """A layer before an in-place ReLU returns the pre-ReLU activation (hooks would see the clamped one)."""
    torch.manual_seed(3)
    model = Residual().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    p = camfn.params(model)
    pre = model.conv(model.stem(x)) + model.stem(x)
    assert (pre < 0).any()
    # hirescam with S = sum_k mean_ij relu(pre_k) @ head: G = head.weight[c, k] / 36 * (pre > 0)
    c = torch.tensor([1, 2])
    g = model.head.weight[c][:, :, None, None] / 36 * (pre > 0)
    got = camfn.hirescam(model, p, x, "add", c, **RAW)
    torch.testing.assert_close(got, (g * pre).sum(1))
    # the map at the ReLU itself uses the post-ReLU activation and the same gradient
    torch.testing.assert_close(camfn.hirescam(model, p, x, "relu", c, **RAW), (g * pre.clamp(min=0)).sum(1))


def test_eigencam_is_first_principal_component() -> None:
    torch.manual_seed(4)
    a = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    proj = camfn.postprocess.first_component(a.unsqueeze(1), ndim=2).squeeze(1)
    for b in range(2):
        xmat = a[b].reshape(6, -1).T
        xmat = xmat - xmat.mean(0)
        _, s, vh = torch.linalg.svd(xmat, full_matrices=False)
        expected = (xmat @ vh[0]).reshape(4, 5)
        sign = torch.sign(((expected - expected.mean()) * (a[b].sum(0) - a[b].sum(0).mean())).sum())
        torch.testing.assert_close(proj[b], sign * expected)
        # the component carries the largest variance: s[0]^2
        torch.testing.assert_close((proj[b] ** 2).sum(), s[0] ** 2)


def test_eigencam_sign_rule_makes_map_follow_activation() -> None:
    """A single dominant blob: the map peaks at the blob whatever sign the SVD picked."""
    a = torch.zeros(1, 1, 8, 7, 7, dtype=torch.float64)
    a[..., 2:4, 4:6] = torch.linspace(1, 2, 8, dtype=torch.float64)[:, None, None]
    a = a + 0.01 * torch.randn_like(a)
    proj = camfn.postprocess.first_component(a, ndim=2)[0, 0]
    assert proj[2:4, 4:6].mean() > proj.mean()


def test_normalize_and_finish() -> None:
    m = torch.tensor([[[0.0, -2.0], [4.0, 2.0]]])
    torch.testing.assert_close(normalize(m), torch.tensor([[[1 / 3, 0.0], [1.0, 2 / 3]]]))
    assert normalize(torch.full((2, 3, 3), 7.0)).eq(0).all()  # flat map -> zeros, not NaN
    tiny = torch.tensor([[[0.0, 4e-4], [1e-4, 2e-4]]])
    assert normalize(tiny).max() == 1.0  # no +eps cap on small ranges
    x = torch.zeros(1, 3, 4, 4)
    out = finish(m, x)
    assert out.shape == (1, 4, 4)
    assert out.min() == 0 and out.max() == 1
    ref = F.interpolate(m.clamp(min=0)[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out, normalize(ref))


def test_fuse_takes_elementwise_max_of_tanh() -> None:
    a = torch.zeros(1, 2, 2)
    a[0, 0, 0] = 1.0
    b = torch.zeros(1, 4, 4)
    b[0, 3, 3] = 1.0
    fused = camfn.fuse([a, b], size=(4, 4))
    manual = torch.maximum(camfn.postprocess.resize(torch.tanh(2 * a), (4, 4)), torch.tanh(2 * b))
    torch.testing.assert_close(fused, normalize(manual))
