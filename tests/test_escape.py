"""Escape hatches for models torch.fx cannot trace: leaf modules, a user-supplied (head, tail) cut, torch.export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import image, randomize_bn
from torch import nn

import camfn


class DataDependent(nn.Module):
    """Python control flow on tensor *values*: defeats torch.fx (and torch.export)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class ShapeDependent(nn.Module):
    """Python control flow on a *shape*: defeats torch.fx (a Proxy cannot be bool-ed), not torch.export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            return x[..., ::2, ::2]
        return x


class Untraceable(nn.Module):
    def __init__(self, odd: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.odd = odd
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(self.odd(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def _hook_gradcam(model: nn.Module, module: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Slow reference: plain autograd with a forward hook on a *copy* (Grad-CAM's formula, our post-processing)."""
    import copy

    model = copy.deepcopy(model)
    module = dict(model.named_modules())[next(n for n, m in MODEL_PATHS.items() if m is module)]
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    x = x.clone().requires_grad_(False)
    out = model(x)
    handle.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(out[:, target].sum(), a)
    raw = (g.mean((2, 3), keepdim=True) * a).sum(1)
    return camfn.postprocess.finish(raw.detach(), x)


MODEL_PATHS: dict[str, nn.Module] = {}


@pytest.fixture(scope="module")
def data_dependent() -> nn.Module:
    torch.manual_seed(0)
    return Untraceable(DataDependent()).double().eval()


def test_trace_error_names_all_three_ways_out(data_dependent) -> None:
    with pytest.raises(camfn.TraceError) as err:
        camfn.gradcam(data_dependent, camfn.params(data_dependent), image(1, 16), "conv", 1)
    message = str(err.value)
    assert "leaf_modules" in message
    assert "tracer='export'" in message
    assert "camfn.Cut(head, tail)" in message
    with pytest.raises(camfn.TraceError, match="leaf_modules"):  # value-dependent flow defeats torch.export too
        camfn.gradcam(data_dependent, camfn.params(data_dependent), image(1, 16), "conv", 1, tracer="export")


def test_leaf_modules_trace_around_data_dependent_code(data_dependent) -> None:
    x = image(2, 16, seed=1)
    options = {"tracer_options": {"leaf_modules": [DataDependent]}}
    ours = camfn.gradcam(data_dependent, camfn.params(data_dependent), x, "relu", 2, **options)
    MODEL_PATHS.clear()
    MODEL_PATHS.update(dict(data_dependent.named_modules()))
    ref = _hook_gradcam(data_dependent, data_dependent.relu, x, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
    assert "odd" in [info.name for info in camfn.layers(data_dependent, **options)]


def test_export_traces_shape_dependent_code_and_keeps_module_paths() -> None:
    torch.manual_seed(1)
    model = Untraceable(ShapeDependent()).double().eval()
    x = image(2, 16, seed=2)
    with pytest.raises(camfn.TraceError, match="tracer='export'"):
        camfn.gradcam(model, camfn.params(model), x, "conv", 1, tracer="fx")
    with pytest.warns(UserWarning, match="torch.export because torch.fx failed"):  # the default falls back
        auto = camfn.gradcam(model, camfn.params(model), x, "relu", 1)
    ours = camfn.gradcam(model, camfn.params(model), x, "relu", 1, tracer="export")
    torch.testing.assert_close(auto, ours, rtol=0, atol=0)
    MODEL_PATHS.clear()
    MODEL_PATHS.update(dict(model.named_modules()))
    torch.testing.assert_close(ours, _hook_gradcam(model, model.relu, x, 1), rtol=1e-7, atol=1e-9)
    # a batch of another size and a perturbation method run on the same export
    assert camfn.scorecam(model, camfn.params(model), x[:1], "relu", 1, tracer="export").shape == (1, 16, 16)


def test_export_equals_fx_on_resnet18(resnet18) -> None:
    model = resnet18.double()
    x = image(2, 64, seed=3)
    p = camfn.params(model)
    for layer in ("layer4", "layer3.1.bn2", "layer2.0.relu_1"):
        fx_maps = camfn.gradcam(model, p, x, layer, 3)
        torch.testing.assert_close(camfn.gradcam(model, p, x, layer, 3, tracer="export"), fx_maps, rtol=0, atol=1e-12)
    # the exported tail starts with an in-place aten.add_ on the activation: it must not write the head's value
    ablation = camfn.ablationcam(model, p, x[:1], "layer4.1.bn2", 3, chunk_size=128)
    exported = camfn.ablationcam(model, p, x[:1], "layer4.1.bn2", 3, chunk_size=128, tracer="export")
    torch.testing.assert_close(exported, ablation, rtol=0, atol=1e-12)
    with pytest.raises(camfn.OptionError, match="tracer='jit'"):
        camfn.gradcam(model, p, x, "layer4", 3, tracer="jit")
    with pytest.raises(camfn.LayerError, match="layer4"):
        camfn.gradcam(model, p, x, "layer44", 3, tracer="export")
    model.float()


def test_cut_explains_a_model_fx_cannot_trace(data_dependent) -> None:
    """head(x) -> A, tail(A) -> output written by hand; gradients by the pullback of the tail at A."""
    m = data_dependent
    cut = camfn.Cut(lambda x: m.relu(m.conv(m.odd(m.stem(x)))), lambda a: m.fc(a.mean((2, 3))))
    x = image(2, 16, seed=4)
    ours = camfn.gradcam(cut, camfn.params(cut), x, "head", 4)
    MODEL_PATHS.clear()
    MODEL_PATHS.update(dict(m.named_modules()))
    torch.testing.assert_close(ours, _hook_gradcam(m, m.relu, x, 4), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(camfn.gradcam(cut, {}, x, None, 4), ours)  # default layer of a Cut: the head
    abl = camfn.ablationcam(cut, {}, x, "head", 4)
    assert abl.shape == (2, 16, 16)
    assert bool(torch.isfinite(abl).all())


def test_cut_with_module_head_reads_params() -> None:
    """A module head registers its parameters under 'head.': a changed params dict changes the map."""
    torch.manual_seed(2)
    net = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()
    head = nn.Sequential(*list(net.children())[:-2])
    cut = camfn.Cut(head, lambda a: net.fc(a.mean((2, 3))))
    x = image(1, 64, seed=5)
    p = camfn.params(cut)
    assert all(k.startswith("head.") for k in p)
    ours = camfn.gradcam(cut, p, x, "head", 7)
    torch.testing.assert_close(ours, camfn.gradcam(net, camfn.params(net), x, "layer4", 7), rtol=1e-7, atol=1e-9)
    scaled = {k: v * 1.5 if k.endswith("conv1.weight") else v for k, v in p.items()}
    assert not torch.allclose(camfn.gradcam(cut, scaled, x, "head", 7), ours)
