"""Layer discovery, layer resolution, several layers at once, output options and dtypes."""

from __future__ import annotations

import torch
from conftest import CNN_METHODS, GapNet
from torch import nn

import camfn


def test_layers_lists_nodes_with_shapes(resnet18: nn.Module) -> None:
    info = camfn.layers(resnet18, (2, 3, 64, 64))
    names = [i.name for i in info]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert len(names) == len(set(names))
    by_name = {i.name: i for i in info}
    assert by_name["layer4.1.relu_1"].shape == (2, 512, 2, 2)
    assert by_name["layer3.0.add"].op == "call_function"
    assert by_name["layer1.0.conv1"].module == "Conv2d"
    assert all(i.shape is None for i in camfn.layers(resnet18))


def test_module_path_resolves_to_last_node_inside(resnet18: nn.Module) -> None:
    p, x = camfn.params(resnet18), torch.randn(1, 3, 64, 64)
    by_path = camfn.gradcam(resnet18, p, x, "layer4", 3)
    torch.testing.assert_close(by_path, camfn.gradcam(resnet18, p, x, "layer4.1.relu_1", 3))
    torch.testing.assert_close(by_path, camfn.gradcam(resnet18, p, x, resnet18.layer4, 3))
    torch.testing.assert_close(by_path, camfn.gradcam(resnet18, p, x, None, 3))
    assert camfn.default_layer(resnet18, x) == "layer4.1.relu_1"


def test_default_layer_skips_spatially_flat_outputs() -> None:
    model = GapNet().eval()  # pool -> (B, K, 1, 1) and fc come after "act"
    assert camfn.default_layer(model, (1, 3, 8, 8)) == "act"


def test_several_layers_give_a_list_equal_to_single_calls(resnet18: nn.Module) -> None:
    p, x, t = camfn.params(resnet18), torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    for method in ("gradcam", "layercam", "eigencam", "cam"):
        fn = camfn.METHODS[method]
        layers = ["layer3", "layer4"] if method != "cam" else ["layer4"]
        maps = fn(resnet18, p, x, layers, t, size=None)
        assert isinstance(maps, list) and len(maps) == len(layers)
        for layer, m in zip(layers, maps, strict=True):
            torch.testing.assert_close(m, fn(resnet18, p, x, layer, t, size=None))
    fused = camfn.fuse(camfn.layercam(resnet18, p, x, ["layer2", "layer3", "layer4"], t, size=None))
    assert fused.shape == (2, 8, 8) and fused.amax((1, 2)).eq(1).all()


def test_size_relu_normalize_options(resnet18: nn.Module) -> None:
    p, x = camfn.params(resnet18), torch.randn(2, 3, 64, 64)
    raw = camfn.gradcam(resnet18, p, x, "layer3", 0, relu=False, size=None, normalize=False)
    assert raw.shape == (2, 4, 4) and (raw < 0).any() and raw.abs().max() != 1
    assert camfn.gradcam(resnet18, p, x, "layer3", 0, size=(10, 12)).shape == (2, 10, 12)
    default = camfn.gradcam(resnet18, p, x, "layer3", 0)
    torch.testing.assert_close(default, camfn.postprocess.finish(raw, x))


def test_maps_follow_input_dtype() -> None:
    model = GapNet().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for fn in CNN_METHODS.values():
        assert fn(model, camfn.params(model), x, "act", 0).dtype == torch.float64


def test_top1_target_by_default() -> None:
    torch.manual_seed(0)
    model = GapNet().eval()
    p, x = camfn.params(model), torch.randn(3, 3, 8, 8)
    top = model(x).argmax(1)
    for method, fn in CNN_METHODS.items():
        kw = {"n": 2} if method in ("sscam", "iscam", "smooth_gradcampp") else {}
        default = fn(model, p, x, "act", **kw)
        assert default.shape == (3, 8, 8), method
        torch.testing.assert_close(default, fn(model, p, x, "act", top, **kw))


def test_callable_target() -> None:
    torch.manual_seed(0)
    model = GapNet().eval()
    p, x = camfn.params(model), torch.randn(2, 3, 8, 8)
    diff = camfn.hirescam(model, p, x, "act", lambda out: out[:, 1] - out[:, 2], relu=False, normalize=False)
    one = camfn.hirescam(model, p, x, "act", 1, relu=False, normalize=False)
    two = camfn.hirescam(model, p, x, "act", 2, relu=False, normalize=False)
    torch.testing.assert_close(diff, one - two)  # hirescam is linear in the score's gradient
    pair = camfn.hirescam(model, p, x, "act", lambda out: out[:, [1, 2]], relu=False, normalize=False)
    torch.testing.assert_close(pair, torch.stack([one, two], 1))


def test_trace_cached_and_refreshed_on_mode_change() -> None:
    model = GapNet().eval()
    first = camfn.tracing.trace(model)
    assert camfn.tracing.trace(model) is first
    model.fc.train()
    assert camfn.tracing.trace(model) is not first
