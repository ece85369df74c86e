"""Architecture matrix: Grad-CAM on torchvision and timm models at small sizes, parity with grad-cam.

Every model is built with random weights (BatchNorm statistics randomised, zero-initialised heads given
weights), in float64 and eval mode. For each: ``gradcam`` runs, maps are finite and in [0, 1], and where
grad-cam supports the model its map agrees within ``TOL``. ``python tests/test_architectures.py`` prints
the README table (model, layer, layout, parity, max difference).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import camfn

try:
    from conftest import randomize_bn
except ImportError:  # run as a script
    sys.path.insert(0, "tests")
    from conftest import randomize_bn

TOL = 1e-4  # float64 on both sides; grad-cam resizes with cv2 (bilinear), camfn with torch (~1e-5 apart)
tv = torchvision.models


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    size: int
    layer: str
    layout: Any = None
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None  # grad-cam's reshape_transform
    parity: bool = True


def _tokens(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:
        side = int((t.shape[1] - prefix) ** 0.5)
        return t[:, prefix:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _head_weights(model: nn.Module, *paths: str) -> nn.Module:
    """Give zero-initialised classifier heads random weights (else every gradient is 0)."""
    for path in paths:
        nn.init.normal_(model.get_submodule(path).weight, std=0.2)
    return model


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


CASES = [
    Case("resnet18", lambda: tv.resnet18(num_classes=10), 64, "layer4"),
    Case("resnet50", lambda: tv.resnet50(num_classes=10), 64, "layer4"),
    Case("vgg11_bn", lambda: tv.vgg11_bn(num_classes=10, init_weights=False), 64, "features.27"),
    Case("densenet121", lambda: tv.densenet121(num_classes=10), 64, "features.denseblock4"),
    Case("mobilenet_v2", lambda: tv.mobilenet_v2(num_classes=10), 64, "features.18"),
    Case("mobilenet_v3_small", lambda: tv.mobilenet_v3_small(num_classes=10), 64, "features.12"),
    Case("efficientnet_b0", lambda: tv.efficientnet_b0(num_classes=10), 64, "features.8"),
    Case("regnet_y_400mf", lambda: tv.regnet_y_400mf(num_classes=10), 64, "trunk_output"),
    Case("convnext_tiny", lambda: tv.convnext_tiny(num_classes=10), 64, "features.7"),
    Case("shufflenet_v2_x0_5", lambda: tv.shufflenet_v2_x0_5(num_classes=10), 64, "conv5"),
    Case("squeezenet1_1", lambda: tv.squeezenet1_1(num_classes=10), 64, "features.12"),
    Case(
        "inception_v3",
        lambda: tv.inception_v3(num_classes=10, aux_logits=False, init_weights=False),
        107,
        "Mixed_7c",
    ),
    Case(
        "googlenet",
        lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=False, transform_input=False),
        64,
        "inception5b",
    ),
    Case(
        "vit_b_16 architecture (2 layers, dim 64, 64 px)",
        lambda: _head_weights(
            tv.VisionTransformer(
                image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
            ),
            "heads.head",
        ),
        64,
        "encoder.layers.encoder_layer_1.ln_1",
        "vit",
        _tokens(1),
    ),
    Case("swin_t", lambda: tv.swin_t(num_classes=10), 64, "norm", "nhwc", _nhwc),
    Case("timm resnet10t", _timm("resnet10t"), 64, "layer4"),
    Case("timm efficientnet_b0", _timm("efficientnet_b0"), 64, "bn2"),
    Case("timm convnext_atto", _timm("convnext_atto"), 64, "stages.3"),
    Case(
        "timm vit_tiny_patch16_224 (64 px)",
        _timm("vit_tiny_patch16_224", img_size=64, depth=2),
        64,
        "blocks.1.norm1",
        "tokens",
        _tokens(1),
    ),
    Case(
        "timm deit_tiny_distilled (64 px)",
        _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=2),
        64,
        "blocks.1.norm1",
        "tokens",
        _tokens(2),
    ),
    Case(
        "timm swin_tiny (64 px, window 2)",
        _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2, depths=(1, 1, 1, 1)),
        64,
        "layers.3",
        "nhwc",
        _nhwc,
    ),
]


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(case.build()).double().eval()


def reference(model: nn.Module, case: Case, x: torch.Tensor) -> np.ndarray:
    """grad-cam's map for the top-1 class (its targets=None)."""
    from pytorch_grad_cam import GradCAM

    module = model.get_submodule(case.layer)
    with GradCAM(model=model, target_layers=[module], reshape_transform=case.reshape) as cam:
        return cam(input_tensor=x, targets=None)


def run(case: Case) -> tuple[torch.Tensor, np.ndarray | None]:
    model = build(case)
    x = torch.randn(1, 3, case.size, case.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps = camfn.gradcam(model, camfn.params(model), x, case.layer, None, layout=case.layout)  # top-1 class
    ref = reference(model, case, x) if case.parity else None
    return maps, ref


@pytest.mark.parametrize("case", CASES, ids=[c.name.split(" (")[0].replace(" ", "_") for c in CASES])
def test_gradcam_runs_and_matches_grad_cam(case: Case) -> None:
    maps, ref = run(case)
    assert maps.shape == (1, case.size, case.size)
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert float(maps.max()) == 1.0  # not a flat (all-zero) map
    if ref is not None:
        np.testing.assert_allclose(maps.numpy(), ref, atol=TOL)


def test_segmentation_deeplabv3_matches_grad_cam() -> None:
    """deeplabv3 (mobilenet_v3 backbone): dict output, a segmentation target (class logits over a mask)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(0)
    model = (
        randomize_bn(tv.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3))
        .double()
        .eval()
    )
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.zeros(64, 64, dtype=torch.float64)
    mask[16:48, 8:40] = 1
    target = camfn.targets.segmentation(1, mask)  # class 1's logits summed over the mask, read from out["out"]
    ours = camfn.gradcam(model, camfn.params(model), x, "backbone.16", target, output="out")

    class Out(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.m(t)["out"]

    with GradCAM(model=Out(model), target_layers=[model.backbone.get_submodule("16")]) as cam:
        ref = cam(input_tensor=x, targets=[SemanticSegmentationTarget(1, mask.numpy())])
    assert float(ours.max()) == 1.0
    np.testing.assert_allclose(ours.numpy(), ref, atol=TOL)


def test_detection_fasterrcnn_through_a_cut() -> None:
    """fasterrcnn_mobilenet_v3_large_fpn: fx cannot trace it, so explain camfn.Cut(head, tail) with the detection
    target of the model's own top box (tail differentiated by autograd: roi_align has no torch.func support)."""
    from camfn.targets import detection

    torch.manual_seed(0)
    det = tv.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0
    ).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        top = det(x)[0]
    target = detection(top["boxes"][:1], top["labels"][:1])

    def head(images: torch.Tensor) -> torch.Tensor:
        batch, _ = det.transform(list(images))
        return det.backbone.body(batch.tensors)["1"]

    def tail(a: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        batch, _ = det.transform(list(images))
        features = det.backbone.fpn({"0": det.backbone.body(batch.tensors)["0"], "1": a})
        proposals, _ = det.rpn(batch, features)
        return target(det.roi_heads(features, proposals, batch.image_sizes)[0])

    cut = camfn.Cut(head, tail, tail_takes_input=True, autograd_tail=True)
    with torch.no_grad():
        maps = camfn.gradcam(cut, {}, x, "head", lambda s: s)
    assert maps.shape == (1, 64, 64)
    assert bool(torch.isfinite(maps).all())
    assert float(maps.max()) == 1.0


if __name__ == "__main__":  # the README table
    print("| model | layer | layout | grad-cam parity | max abs diff | CPU s (camfn + grad-cam) |")
    print("|---|---|---|---|---|---|")
    import pytorch_grad_cam  # noqa: F401  (import time not counted)

    for case in CASES:
        start = time.process_time()
        maps, ref = run(case)
        diff = f"{np.abs(maps.numpy() - ref).max():.1e}" if ref is not None else "-"
        diff += " (flat map)" if float(maps.max()) < 1 else ""
        layout = f"`{case.layout!r}`" if case.layout else "-"
        print(
            f"| {case.name} | `{case.layer}` | {layout} | {'yes' if ref is not None else 'no'} | {diff} | "
            f"{time.process_time() - start:.1f} |"
        )
