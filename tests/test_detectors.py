"""Models from other libraries people bring: an Ultralytics YOLO detector built from its yaml (no weights)
with eigencam as in pytorch-grad-cam's YOLO tutorial and a detection score target, timm ``features_only``
backbones (list outputs picked with ``output=``), a dict-input model (a clear error with the wrapper), and
the default layer of non-HF models under ``torch.export`` (channel-first module outputs only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camfn
from camfn.errors import InputError, TraceError
from camfn.layer_names import channel_first

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

SIZE = 64


class _First(torch.nn.Module):
    """The tutorial's habit: the model's first output (YOLO's raw predictions, a feature list's item) as a tensor."""

    def __init__(self, model, index=0):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x):
        return self.model(x)[self.index]


# ------------------------------------------------------------------------------------------ YOLO
@pytest.fixture(scope="module")
def yolo():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval().double()
    return model


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _state(model):
    """What ultralytics' Detect head caches on itself in forward (camfn's traced copy must not write it)."""
    head = model.model[-1]
    return {k: vars(head).get(k) for k in ("shape", "anchors", "strides")}


def test_yolo_eigencam_matches_grad_cam_tutorial(yolo, image):
    """eigencam at the neck's last C2f (model.model[-2], as in pytorch-grad-cam's YOLO tutorial): the signed
    projection equals grad-cam's get_2d_projection up to the sign of the principal component, and the map
    equals grad-cam's EigenCAM for that sign (1e-6 relative on the projection in float64; 1e-5 on the map, which
    grad-cam resizes in float32). Explaining leaves the model's later outputs
    and its Detect head's cached state unchanged."""
    with torch.no_grad():
        before = yolo(image)[0].clone()
    state = _state(yolo)
    maps = camfn.eigencam(yolo, camfn.params(yolo), image, "model.21", tracer="export")
    raw = camfn.eigencam(yolo, camfn.params(yolo), image, "model.21", tracer="export", relu=False, normalize=False)
    with EigenCAM(_First(yolo), target_layers=[yolo.model[-2]]) as cam:
        ref = cam(input_tensor=image, targets=None)
        cam.activations_and_grads(image)
        acts = cam.activations_and_grads.activations[0].numpy()
    projection = get_2d_projection(acts)
    low = camfn.eigencam(
        yolo, camfn.params(yolo), image, "model.21", tracer="export", relu=False, normalize=False, size=None
    )
    sign = 1.0 if np.abs(low.numpy() - projection).max() < np.abs(low.numpy() + projection).max() else -1.0
    np.testing.assert_allclose(sign * low.numpy(), projection, atol=1e-6 * np.abs(projection).max())
    assert maps.shape == (1, SIZE, SIZE) and float(maps.std()) > 0 and raw.shape == (1, SIZE, SIZE)
    # grad-cam keeps the SVD's arbitrary sign (camfn orients it along sum_k A_k) and resizes in float32 (cv2)
    signed = camfn.postprocess.finish(sign * low.unsqueeze(1), image, relu=True, size="input", normalize=True)
    np.testing.assert_allclose(signed.squeeze(1).numpy(), ref, atol=1e-5)
    if sign > 0:
        torch.testing.assert_close(maps, signed.squeeze(1), atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(yolo(image)[0], before, atol=0, rtol=0)
    after = _state(yolo)
    assert all(after[k] is state[k] for k in state)  # the same objects: nothing was written on the model


def test_yolo_detection_score_target(yolo, image):
    """A detection target on YOLO's raw predictions (B, 4 + classes, anchors): the best anchor's class score,
    with output=0; equal to grad-cam's GradCAM with the same per-sample target."""
    c = 1
    maps = camfn.gradcam(
        yolo, camfn.params(yolo), image, "model.21", lambda y: y[:, 4 + c].amax(1), output=0, tracer="export"
    )
    with GradCAM(_First(yolo), target_layers=[yolo.model[-2]]) as cam:
        ref = cam(input_tensor=image, targets=[lambda y: y[4 + c].amax()])
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------ timm
def test_timm_features_only_list_output():
    """timm features_only=True returns a list of feature maps: output=-1 picks the last, and the map equals
    grad-cam's on a wrapper returning that item (float64); the default layer is a channel-first map."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", features_only=True, pretrained=False).eval().double()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert isinstance(net(x), list)
    maps = camfn.gradcam(net, camfn.params(net), x, "layer3", lambda f: f.sum((1, 2, 3)), output=-1)
    with GradCAM(_First(net, -1), target_layers=[net.layer3]) as cam:
        ref = cam(input_tensor=x, targets=[lambda f: f.sum()] * 2)
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-6)
    with pytest.raises(camfn.errors.OptionError, match="of 5 items"):
        camfn.gradcam(net, camfn.params(net), x, "layer3", lambda f: f.sum((1, 2, 3)), output=7)
    assert camfn.default_layer(net, x) == "layer4.1.act2"


# ------------------------------------------------------------------------------------------ default layer under export
def test_default_layer_under_export_is_a_channel_first_module_output():
    """Under torch.export the default layer is a module output in (B, K, h, w) layout computed from x: never a
    channels-last view (torchvision Swin, ConvNeXt internals) nor a position bias built from weights."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    models = {
        "swin": SwinTransformer([4, 4], 16, [1, 1], [1, 2], [4, 4], num_classes=5).eval(),
        "convnext": ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5).eval(),
    }
    for key, model in models.items():
        name = camfn.default_layer(model, x, tracer="export")
        if key == "swin":  # camfn.adapters.vision: the final norm, read in its channels-last layout
            assert name == "norm"
            maps = camfn.gradcam(model, camfn.params(model), x, None, 1, tracer="export")
            explicit = camfn.gradcam(model, camfn.params(model), x, "norm", 1, layout="nhwc", tracer="export")
            torch.testing.assert_close(maps, explicit, atol=0, rtol=0)
            continue
        shape = next(i.shape for i in camfn.layers(model, x, tracer="export") if i.name == name)
        assert channel_first(shape, tuple(x.shape)) and len(shape) == 4
        assert name.split(".")[0] == "features" or name == "permute"
        maps = camfn.gradcam(model, camfn.params(model), x, None, 1, tracer="export")
        assert float(maps.std()) > 0


def test_channel_first_rejects_channels_last():
    assert channel_first((1, 32, 8, 8), (1, 3, 64, 64))
    assert channel_first((1, 32, 4, 7), (1, 3, 64, 112))
    assert not channel_first((1, 8, 8, 32), (1, 3, 64, 64))
    assert not channel_first((1, 4, 7, 32), (1, 3, 64, 112))


# ------------------------------------------------------------------------------------------ dict input
def test_dict_input_names_the_wrapper():
    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, batch):
            return self.fc(self.conv(batch["image"]).mean((2, 3)))

    model = DictNet().eval()
    for tracer in ("auto", "export"):
        with pytest.raises((InputError, TraceError), match=r"(?s)takes a dict.*self\.model\(\{'image': x\}\)"):
            camfn.gradcam(model, camfn.params(model), torch.randn(1, 3, 16, 16), "conv", 0, tracer=tracer)

    class ImageOnly(torch.nn.Module):  # the wrapper the message gives works
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model({"image": x})

    wrapped = ImageOnly(model)
    assert camfn.gradcam(wrapped, camfn.params(wrapped), torch.randn(1, 3, 16, 16), "model.conv", 0).shape == (
        1, 16, 16,
    )  # fmt: skip


def test_layout_without_layer_names_the_concrete_layer():
    """layout= without a layer on a torchvision ViT: the error names the last block's first norm, which works."""
    import torchvision

    vit = torchvision.models.VisionTransformer(32, 16, 2, 2, 16, 32, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    wrapped = torch.nn.Sequential(vit)  # no adapter knows it (the ViT itself gets its default layer)
    with pytest.raises(camfn.errors.LayerError, match=r"layer='0\.encoder\.layers\.encoder_layer_1\.ln_1'"):
        camfn.gradcam(wrapped, camfn.params(wrapped), x, None, 0, layout="vit")
    by_default = camfn.gradcam(vit, camfn.params(vit), x, None, 0, layout="vit")
    explicit = camfn.gradcam(vit, camfn.params(vit), x, "encoder.layers.encoder_layer_1.ln_1", 0, layout="vit")
    torch.testing.assert_close(by_default, explicit, atol=0, rtol=0)
    assert camfn.gradcam(vit, camfn.params(vit), x, "encoder.layers.encoder_layer_1.ln_1", 0, layout="vit").shape == (
        1, 32, 32,
    )  # fmt: skip
