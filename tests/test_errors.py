"""Every bad input gets a clear exception that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import GapNet
from torch import nn

import camfn


@pytest.fixture(scope="module")
def model() -> GapNet:
    torch.manual_seed(0)
    return GapNet().eval()


@pytest.fixture(scope="module")
def p(model: GapNet) -> dict:
    return camfn.params(model)


X = torch.randn(2, 3, 8, 8)


def test_unknown_layer_lists_nearest_names(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.LayerError) as info:
        camfn.gradcam(model, p, X, "conv3", 0)
    msg = str(info.value)
    assert "'conv3'" in msg and "conv2" in msg and "conv1" in msg and "camfn.layers" in msg


def test_layer_without_spatial_output(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.LayerError, match=r"outputs \(2, 5\).*earlier layer"):
        camfn.gradcam(model, p, X, "fc", 0)


def test_layer_module_not_in_model(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.LayerError, match="not a submodule"):
        camfn.gradcam(model, p, X, nn.Conv2d(3, 3, 1), 0)


def test_target_out_of_range(model: GapNet, p: dict) -> None:
    with pytest.raises(
        camfn.TargetError, match=r"class 5 is out of range: the model has 5 outputs; pass a class in 0..4"
    ):
        camfn.gradcam(model, p, X, "act", 5)
    with pytest.raises(camfn.TargetError, match="class -1 is out of range"):
        camfn.gradcam(model, p, X, "act", torch.tensor([0, -1]))
    with pytest.raises(camfn.TargetError, match="out of range"):
        camfn.cam(model, p, X, "act", torch.tensor([[0, 9], [1, 2]]))


def test_target_batch_mismatch(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.TargetError, match=r"shape \(3,\) but the batch has 2 sample\(s\).*\(2, T\)"):
        camfn.gradcam(model, p, X, "act", torch.tensor([0, 1, 2]))


def test_target_wrong_dtype(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.TargetError, match=r"dtype torch.float32.*target.long\(\)"):
        camfn.gradcam(model, p, X, "act", torch.tensor([0.0, 1.0]))
    with pytest.raises(camfn.TargetError, match="bool"):
        camfn.gradcam(model, p, X, "act", True)


def test_callable_target_wrong_shape(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.TargetError, match=r"returned \(\)"):
        camfn.gradcam(model, p, X, "act", lambda out: out.sum())


def test_batchnorm_in_train_mode(p: dict) -> None:
    model = GapNet().train()
    with pytest.raises(camfn.ModeError, match=r"BatchNorm 'bn' is in train mode.*model.eval\(\)"):
        camfn.gradcam(model, camfn.params(model), X, "act", 0)
    assert model.training and model.bn.training, "camfn switched the mode"


def test_batchnorm_without_running_stats() -> None:
    model = GapNet().eval()
    model.bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(camfn.ModeError, match="track_running_stats=False"):
        camfn.gradcam(model, camfn.params(model), X, "act", 0)


def test_integer_input(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.InputError, match=r"dtype torch.uint8.*x.float\(\) / 255"):
        camfn.gradcam(model, p, (X * 100).to(torch.uint8), "act", 0)


def test_missing_batch_dim(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.InputError, match=r"shape \(3, 8, 8\).*x\[None\]"):
        camfn.gradcam(model, p, X[0], "act", 0)


def test_not_a_tensor(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.InputError, match=r"must be a torch\.Tensor"):
        camfn.gradcam(model, p, X.numpy(), "act", 0)


def test_unknown_option(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.OptionError, match="did you mean 'relu'"):
        camfn.gradcam(model, p, X, "act", 0, reul=False)
    with pytest.raises(camfn.OptionError, match="size="):
        camfn.gradcam(model, p, X, "act", 0, size="big")


def test_params_with_foreign_keys(model: GapNet, p: dict) -> None:
    with pytest.raises(camfn.InputError, match=r"key\(s\) the model does not have.*camfn.params"):
        camfn.gradcam(model, {**p, "head.weight": torch.zeros(1)}, X, "act", 0)


def test_cam_without_classifier() -> None:
    class NoLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    model = NoLinear().eval()
    with pytest.raises(camfn.LayerError, match=r"not produced by an nn.Linear.*gradcam.*fc="):
        camfn.cam(model, camfn.params(model), X, "conv", 0)


def test_cam_refuses_hidden_linear_layers_and_ops_before_pooling() -> None:
    """mobilenet_v3_small: pooling -> linear -> hardswish -> dropout -> linear; CAM does not apply."""
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    with pytest.raises(camfn.LayerError, match=r"stands between the layer and the classifier 'classifier.3'"):
        camfn.cam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "features", 0)
    gap = GapNet().eval()  # "conv2" is followed by a ReLU before pooling
    with pytest.raises(camfn.LayerError, match=r"'act' stands between"):
        camfn.cam(gap, camfn.params(gap), X, "conv2", 0)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_says_how_to_escape() -> None:
    model = Untraceable().eval()
    with pytest.raises(camfn.TraceError) as info:
        camfn.gradcam(model, camfn.params(model), X, "conv", 0)
    assert "leaf_modules" in str(info.value) and "Untraceable" in str(info.value)


def test_escape_hatch_leaf_modules() -> None:
    """The way out named in the message works and gives the right map (Gate doubles positive inputs)."""
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8).abs()
    opts = {"tracer_options": {"leaf_modules": [Gate]}}
    got = camfn.hirescam(model, camfn.params(model), x, "conv", 1, relu=False, size=None, normalize=False, **opts)
    a = model.conv(x)
    factor = torch.where(a.sum((1, 2, 3)) > 0, 2.0, 1.0)[:, None, None, None]
    g = model.fc.weight[1][None, :, None, None] * factor / a[0, 0].numel()
    torch.testing.assert_close(got, (g * a).sum(1))


def test_model_not_a_module(p: dict) -> None:
    with pytest.raises(camfn.InputError, match=r"nn\.Module or a function model_fn"):
        camfn.gradcam(5, p, X, "act", 0)
    with pytest.raises(camfn.TraceError, match="model_fn"):  # a callable that is not model_fn(params, x)
        camfn.gradcam(lambda x: x, p, X, "act", 0)
