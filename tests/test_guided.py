"""Guided backpropagation and Guided Grad-CAM (:mod:`camfn.methods.guided`).

* Closed form on a 1x1-conv -> ReLU -> global-average-pool -> linear network, written with each ReLU
  spelling (``nn.ReLU(inplace=True)``, ``F.relu(inplace=True)``, ``torch.relu``, ``Tensor.relu_``), where
  ``dS/dx = W1^T (1[h > 0] * relu(W2[c] / HW))`` per pixel (float64, 1e-12).
* Parity with grad-cam 1.5.7's ``GuidedBackpropReLUModel`` on torchvision ``resnet18`` and ``vgg11_bn``
  (random weights and BatchNorm statistics, float64, 32 px, a copy of the model given to grad-cam, which
  swaps its ReLU modules): max abs difference <= 1e-6 x the reference's max abs value, per image.
* The user's model is unchanged afterwards: same ReLU objects with the same ``inplace`` flags, same
  state, no ``.grad``, same modes.
* Batches and many targets: a batch equals its samples one by one, ``(B, T)`` targets equal ``T`` calls,
  and ``vmap`` over samples gives the same result (the guided ReLU has a vmap rule).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import image, randomize_bn
from torch import nn
from torch.func import vmap

import camfn
from camfn.errors import LayerError, OptionError
from camfn.methods.guided import guided_relu


# ------------------------------------------------------------------------------------- guided ReLU
def test_guided_relu_backward_under_transforms() -> None:
    z = torch.tensor([[-1.0, 2.0, 3.0, 0.0], [4.0, -5.0, 6.0, 7.0]], dtype=torch.float64)
    g = torch.tensor([[5.0, 5.0, -5.0, 5.0], [-1.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    want = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    value, pull = torch.func.vjp(guided_relu, z)
    assert torch.equal(value, z.relu())
    assert torch.equal(pull(g)[0], want)
    per_row = vmap(lambda zi, gi: torch.func.vjp(guided_relu, zi)[1](gi)[0])(z, g)
    assert torch.equal(per_row, want)
    assert torch.equal(torch.func.grad(lambda zi: guided_relu(zi).sum())(z), (z > 0).double())


# ------------------------------------------------------------------------------------ closed form
class PixelNet(nn.Module):
    """``h = conv1x1(x)``, ``r = relu(h)`` (spelled ``how``), ``y = fc(mean_ij r)``; ``"twice"`` reads ``h``
    again after an in-place ReLU (so it reads ``relu(h)``): ``y = fc(mean_ij (h + r))``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.how == "module":
            r = self.relu(h)
        elif self.how == "functional":
            r = F.relu(h, inplace=True)
        elif self.how == "torch":
            r = torch.relu(h)
        elif self.how == "method_":
            r = h.relu_()
        else:  # "twice"
            r = F.relu(h, inplace=True) + h
        return self.fc(r.mean((2, 3)))


def _closed_form(net: PixelNet, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    w1, w2 = net.conv.weight[:, :, 0, 0], net.fc.weight  # (K, 3), (C, K)
    h = torch.einsum("kc,bcij->bkij", w1, x) + net.conv.bias[:, None, None]
    scale = 2 if net.how == "twice" else 1  # two paths from the guided ReLU's output to the score
    upstream = (scale * w2[c] / (x.shape[2] * x.shape[3]))[:, :, None, None]  # dS/dr, (B, K, 1, 1)
    return torch.einsum("kc,bkij->bcij", w1, (h > 0) * upstream.clamp_min(0))


@pytest.mark.parametrize("how", ["module", "functional", "torch", "method_", "twice"])
def test_guided_backprop_closed_form(how: str) -> None:
    torch.manual_seed(1)
    net = PixelNet(how).double().eval()
    x, c = image(3, 8, seed=2), torch.tensor([0, 3, 1])
    with torch.no_grad():
        want = _closed_form(net, x, c)
    got = camfn.guided_backprop(net, camfn.params(net), x, c)
    assert want.abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-12)
    program = camfn.methods.guided.guided_program(camfn.tracing.trace(net))
    assert torch.allclose(program(camfn.params(net), x), net(x.clone()), atol=1e-12)  # same forward


# --------------------------------------------------------------------------------- grad-cam parity
def _vgg11_bn() -> nn.Module:
    """vgg11_bn with a narrow classifier: its ReLUs and dropouts are kept, its 120M parameters are not."""
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):  # nothing of the stock classifier is allocated
        model = torchvision.models.vgg11_bn(num_classes=10)
    model.features = make_layers(cfgs["A"], batch_norm=True)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
        nn.Linear(32, 10),
    )  # fmt: skip
    return model


@pytest.fixture(scope="module", params=["resnet18", "vgg11_bn"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10) if request.param == "resnet18" else _vgg11_bn()
    return randomize_bn(net).double().eval()


def test_guided_backprop_matches_grad_cam(model: nn.Module) -> None:
    from pytorch_grad_cam import GuidedBackpropReLUModel

    x, c = image(2, 32, seed=3), torch.tensor([4, 7])
    ours = camfn.guided_backprop(model, camfn.params(model), x, c)
    for b in range(2):
        ref_model = copy.deepcopy(model).requires_grad_(False)  # grad-cam swaps the ReLU modules
        ref = GuidedBackpropReLUModel(ref_model, device="cpu")(x[b : b + 1].clone(), int(c[b]))
        ref = torch.from_numpy(ref).permute(2, 0, 1)
        assert ref.abs().max() > 0
        assert (ours[b] - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_model_is_unchanged(model: nn.Module) -> None:
    relus = [(m, m.inplace) for m in model.modules() if isinstance(m, nn.ReLU)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = image(2, 32, seed=4)
    camfn.guided_backprop(model, camfn.params(model), x, 1)
    camfn.guided_gradcam(model, camfn.params(model), x, None, 1)
    assert [(m, m.inplace) for m in model.modules() if isinstance(m, nn.ReLU)] == relus
    assert any(inplace for _, inplace in relus)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert not x.requires_grad


# --------------------------------------------------------------------------- batches and targets
@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=6)).double().eval()


def test_batches_targets_and_vmap(resnet: nn.Module) -> None:
    p, x = camfn.params(resnet), image(3, 32, seed=5)
    many = torch.tensor([[0, 1], [2, 3], [4, 5]])
    both = camfn.guided_backprop(resnet, p, x, many)
    assert both.shape == (3, 2, 3, 32, 32)
    one = camfn.guided_backprop(resnet, p, x, many[:, 1])
    assert torch.allclose(both[:, 1], one, atol=1e-12)
    for b in range(3):
        alone = camfn.guided_backprop(resnet, p, x[b : b + 1], int(many[b, 1]))
        assert torch.allclose(one[b], alone[0], atol=1e-12)
    mapped = vmap(lambda xi, ti: camfn.guided_backprop(resnet, p, xi[None], ti[None])[0])(x, many[:, 0])
    assert torch.allclose(mapped, both[:, 0], atol=1e-12)
    top1 = camfn.apply(resnet, p, x).argmax(1)
    assert torch.equal(camfn.guided_backprop(resnet, p, x), camfn.guided_backprop(resnet, p, x, top1))


def test_guided_gradcam_is_guided_gradients_times_the_map(resnet: nn.Module) -> None:
    p, x = camfn.params(resnet), image(2, 32, seed=6)
    for target in (3, torch.tensor([[1, 2], [3, 4]])):
        cam = camfn.gradcam(resnet, p, x, "layer3", target)
        want = camfn.guided_backprop(resnet, p, x, target) * cam.unsqueeze(-3)
        got = camfn.guided_gradcam(resnet, p, x, "layer3", target)
        assert cam.amax() == 1
        assert torch.equal(got, want)
    with pytest.raises(LayerError, match="one layer"):
        camfn.guided_gradcam(resnet, p, x, ["layer2", "layer3"], 1)
    with pytest.raises(OptionError, match="input size"):
        camfn.guided_gradcam(resnet, p, x, "layer3", 1, size=None)


def test_relus_inside_leaf_modules_are_guided() -> None:
    """A block kept as an fx leaf: its ReLUs are guided in a copy, the user's block is kept."""
    from torchvision.ops import Conv2dNormActivation

    torch.manual_seed(3)
    block = Conv2dNormActivation(3, 4, 3, norm_layer=None, activation_layer=nn.ReLU)
    leaf = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    plain = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), *list(leaf)[1:]).double().eval()
    plain.load_state_dict(leaf.state_dict())
    leaves = {"leaf_modules": [Conv2dNormActivation]}
    assert any(n.target == "0" for n in camfn.tracing.trace(leaf, tracer_options=leaves).module.graph.nodes)
    x, c = image(2, 8, seed=7), torch.tensor([0, 2])
    want = camfn.guided_backprop(plain, camfn.params(plain), x, c)
    assert not torch.allclose(want, torch.func.grad(lambda xi: leaf(xi)[torch.arange(2), c].sum())(x))
    got = camfn.guided_backprop(leaf, camfn.params(leaf), x, c, tracer_options=leaves)
    assert torch.allclose(got, want, atol=1e-12)
    assert type(block[1]) is nn.ReLU
