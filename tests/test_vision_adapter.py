"""torchvision and timm vision transformers with ``layer=None`` (tiny, random weights, 64 px): the adapter's
layer and layout (class, distillation and register tokens; Swin's channels-last grid) give the same map as the
explicit form, and match pytorch-grad-cam's ViT tutorial recipe (a reshape_transform dropping the class token)
in float64 to 1e-6."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torchvision

import camfn

timm = pytest.importorskip("timm")
pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SIZE = 64
TINY_VIT = {"pretrained": False, "img_size": SIZE, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}


@functools.cache
def _build(name: str) -> torch.nn.Module:
    """The tiny model ``name`` (built once; tests deep-copy it before changing it)."""
    torch.manual_seed(0)
    if name == "tv_vit":
        vit = torchvision.models.VisionTransformer(
            image_size=SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ).eval()
        torch.nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts the head at zero: flat maps
        return vit
    if name == "tv_swin":
        return torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=5
        ).eval()
    if name == "timm_vit":
        return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    if name == "timm_deit":
        return timm.create_model("deit_tiny_distilled_patch16_224", **TINY_VIT).eval()
    if name == "timm_registers":
        return timm.create_model("vit_small_patch16_224", reg_tokens=2, **TINY_VIT).eval()
    if name == "timm_swin":
        return timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE, embed_dim=16, depths=(1, 1),
            num_heads=(2, 2), window_size=4, num_classes=5,
        ).eval()  # fmt: skip
    raise KeyError(name)


EXPECTED = {  # name -> (layer, layout the adapter infers)
    "tv_vit": ("encoder.layers.encoder_layer_1.ln_1", camfn.layout.Tokens(prefix=1)),
    "timm_vit": ("blocks.1.norm1", camfn.layout.Tokens(prefix=1)),
    "timm_deit": ("blocks.1.norm1", camfn.layout.Tokens(prefix=2)),  # class and distillation tokens
    "timm_registers": ("blocks.1.norm1", camfn.layout.Tokens(prefix=3)),  # class token and 2 registers
    "tv_swin": ("norm", "nhwc"),
    "timm_swin": ("norm", "nhwc"),
}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_default_layer_and_layout(x, name):
    """layer=None picks the last block's first norm (ViTs) or the last stage's norm (Swin) and its layout: the
    map equals the explicit layer and layout, and is a real map (not the patch embedding's)."""
    model = _build(name)
    layer, layout = EXPECTED[name]
    assert camfn.default_layer(model, x) == layer
    maps = camfn.gradcam(model, camfn.params(model), x, None, torch.tensor([1, 3]))
    explicit = camfn.gradcam(model, camfn.params(model), x, layer, torch.tensor([1, 3]), layout=layout)
    torch.testing.assert_close(maps, explicit, atol=0, rtol=0)
    assert maps.shape == (2, SIZE, SIZE) and float(maps.std()) > 0
    named = camfn.gradcam(model, camfn.params(model), x, layer, torch.tensor([1, 3]))  # the layout comes along
    torch.testing.assert_close(named, explicit, atol=0, rtol=0)


def _vit_reshape(prefix: int, side: int):
    """pytorch-grad-cam's ViT tutorial reshape_transform (with the number of leading tokens to drop)."""

    def reshape_transform(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


@pytest.mark.parametrize(("name", "prefix"), [("tv_vit", 1), ("timm_vit", 1), ("timm_deit", 2)])
def test_parity_with_grad_cam_vit_recipe_float64(x, name, prefix):
    """The no-option map equals pytorch-grad-cam's GradCAM on the same norm with the tutorial's reshape."""
    model = copy.deepcopy(_build(name)).double()
    xd = x.double()
    classes = [4, 7]
    maps = camfn.gradcam(model, camfn.params(model), xd, None, torch.tensor(classes))
    norm = model.get_submodule(EXPECTED[name][0])
    with GradCAM(model=model, target_layers=[norm], reshape_transform=_vit_reshape(prefix, 4)) as cam:
        ref = cam(input_tensor=xd, targets=[ClassifierOutputTarget(c) for c in classes])
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-6)


def test_cnns_keep_the_generic_default(x):
    """A torchvision CNN is no transformer: the adapter leaves camfn's generic default."""
    assert camfn.default_layer(torchvision.models.resnet18().eval(), x) == "layer4.1.relu_1"
