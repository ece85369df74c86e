"""Token and channels-last layouts: ViT, DeiT-style prefixes, Swin; parity with grad-cam's reshape_transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import image
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import camfn
from camfn.layout import Tokens, grid_of, layout_fn, patch_gradient_vanishes, pull_back, tokens_to_maps

TOL = 1e-4  # grad-cam parity, float64 models (both sides normalise; cv2 vs torch bilinear resize ~1e-5)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """A 2-block torchvision ViT at 64 px (8 x 8 patch grid); the zero-initialised head is randomised."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.double().eval()


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    """torchvision's Swin (swin_t's class) in a small config; swin_t itself is in test_architectures."""
    torch.manual_seed(0)
    return (
        torchvision.models.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=[2, 2],
            num_classes=10,
        )
        .double()
        .eval()
    )


def _gradcam_reference(model: nn.Module, module: nn.Module, x: torch.Tensor, target: int, reshape) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as ref:
        return ref(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0])


def _vit_reshape(t: torch.Tensor) -> torch.Tensor:  # the reshape_transform grad-cam's docs give for ViT
    b, n, d = t.shape
    side = int((n - 1) ** 0.5)
    return t[:, 1:, :].reshape(b, side, side, d).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["vit", "tokens", "b (h w) d -> b d h w"])
def test_vit_matches_grad_cam(vit, layout) -> None:
    x = image(2, 64, seed=1)
    module = vit.encoder.layers.encoder_layer_1.ln_1
    ref = _gradcam_reference(vit, module, x, 3, _vit_reshape)
    if layout.startswith("b ("):  # an einops pattern keeps the class token: drop it with a callable first
        layout = lambda t: tokens_to_maps(t, 1, (8, 8))  # noqa: E731
    ours = camfn.gradcam(vit, camfn.params(vit), x, module, 3, layout=layout)
    assert ours.shape == (2, 64, 64)
    assert float(ours.std()) > 0.05  # not a flat map
    np.testing.assert_allclose(ours.numpy(), ref, atol=TOL)


def test_swin_nhwc_matches_grad_cam(swin) -> None:
    x = image(1, 64, seed=2)
    ref = _gradcam_reference(swin, swin.norm, x, 5, lambda t: t.permute(0, 3, 1, 2))
    ours = camfn.gradcam(swin, camfn.params(swin), x, "norm", 5, layout="nhwc")
    np.testing.assert_allclose(ours.numpy(), ref, atol=TOL)
    pattern = camfn.gradcam(swin, camfn.params(swin), x, "norm", 5, layout="b h w c -> b c h w")
    torch.testing.assert_close(pattern, ours, rtol=0, atol=0)


def test_last_vit_block_names_a_better_layer(vit) -> None:
    """The head reads only the class token: after the last attention no patch token reaches the score."""
    x = image(1, 64)
    with pytest.raises(camfn.LayerError, match=r"exactly zero on every patch token.*encoder_layer_1\.ln_1"):
        camfn.gradcam(vit, camfn.params(vit), x, "encoder.layers.encoder_layer_1", 3, layout="vit")


def test_token_layer_without_layout_says_which_option(vit) -> None:
    """A token layer of a model no adapter knows (the ViT inside a Sequential) needs layout=; the torchvision
    ViT itself gets its layout from camfn.adapters.vision."""
    wrapped = nn.Sequential(vit)
    with pytest.raises(camfn.LayerError, match="layout='tokens'"):
        camfn.gradcam(wrapped, camfn.params(wrapped), image(1, 64), "0.encoder.layers.encoder_layer_1.ln_1", 3)
    inferred = camfn.gradcam(vit, camfn.params(vit), image(1, 64), "encoder.layers.encoder_layer_1.ln_1", 3)
    explicit = camfn.gradcam(
        vit, camfn.params(vit), image(1, 64), "encoder.layers.encoder_layer_1.ln_1", 3, layout="vit"
    )
    torch.testing.assert_close(inferred, explicit, atol=0, rtol=0)


def test_layout_needs_explicit_layer_and_known_spec(vit) -> None:
    p = camfn.params(vit)
    wrapped = nn.Sequential(vit)
    with pytest.raises(camfn.LayerError, match="explicit layer"):
        camfn.gradcam(wrapped, camfn.params(wrapped), image(1, 64), None, 3, layout="vit")
    with pytest.raises(camfn.OptionError, match="layout='spiral'"):
        camfn.gradcam(vit, p, image(1, 64), "encoder.layers.encoder_layer_1.ln_1", 3, layout="spiral")


@pytest.mark.parametrize("method", ["gradcampp", "layercam", "smooth_gradcampp", "scorecam", "ablationcam", "eigencam"])
def test_every_family_accepts_a_layout(vit, method) -> None:
    """Perturbation methods see the same (B, D, h, w) maps; ablationcam ablates channel k of the patch tokens."""
    x = image(1, 64, seed=3)
    fn = camfn.METHODS[method]
    maps = fn(vit, camfn.params(vit), x, "encoder.layers.encoder_layer_1.ln_1", 3, layout="vit")
    assert maps.shape == (1, 64, 64)
    assert bool(torch.isfinite(maps).all())


def test_ablation_with_layout_equals_manual_token_ablation(vit) -> None:
    """Slow formula: w_k = (y - y_k) / y with y_k from the tail on tokens whose patch channel k is zeroed."""
    from camfn.rewrite import cut_after as split
    from camfn.tracing import trace

    x = image(1, 64, seed=4)
    p = camfn.params(vit)
    ours = camfn.ablationcam(vit, p, x, "encoder.layers.encoder_layer_1.ln_1", 3, layout="vit", normalize=False)
    traced = trace(vit)
    cut = split(traced, traced.resolve("encoder.layers.encoder_layer_1.ln_1"))
    a, extras = cut.head(p, x)
    y = cut.tail(p, a, *extras)[:, 3]
    w = []
    for k in range(a.shape[-1]):
        ablated = a.clone()
        ablated[:, 1:, k] = 0
        w.append((y - cut.tail(p, ablated, *extras)[:, 3]) / y)
    maps = torch.einsum("kb,bkhw->bhw", torch.stack(w), tokens_to_maps(a, 1, (8, 8)))
    expected = camfn.postprocess.finish(maps, x, normalize=False)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)


def test_timm_prefix_tokens_are_read_from_the_model() -> None:
    """timm models expose num_prefix_tokens: a distilled DeiT has 2 prefix tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2
    ).eval()
    assert model.num_prefix_tokens == 2
    x = torch.randn(1, 3, 64, 64)
    ours = camfn.gradcam(model, camfn.params(model), x, "blocks.1.norm1", 1, layout="tokens")
    deit = camfn.gradcam(model, camfn.params(model), x, "blocks.1.norm1", 1, layout="deit")
    torch.testing.assert_close(ours, deit, rtol=0, atol=0)
    assert float(ours.std()) > 0.05


def test_grid_follows_the_input_aspect_ratio() -> None:
    fn = layout_fn("tokens", (2, 1 + 2 * 4, 5), (2, 3, 32, 64))
    t = torch.arange(2 * 9 * 5.0).reshape(2, 9, 5)
    out = fn(t)
    assert out.shape == (2, 5, 2, 4)
    assert torch.equal(out[:, :, 1, 2], t[:, 1 + 1 * 4 + 2])  # token p + i w + j -> (i, j)
    assert grid_of(12, (30, 40)) == (3, 4)
    with pytest.raises(camfn.LayerError, match="Tokens"):
        layout_fn("tokens", (2, 5, 3), (2, 3, 30, 70))
    assert layout_fn(Tokens(prefix=3, grid=(2, 2)), (1, 7, 5), (1, 3, 64, 64))(torch.zeros(1, 7, 5)).shape == (
        1,
        5,
        2,
        2,
    )


@settings(max_examples=25, deadline=None)
@given(prefix=st.integers(0, 3), h=st.integers(1, 4), w=st.integers(1, 4), d=st.integers(1, 3))
def test_pull_back_is_the_transpose_of_the_layout(prefix, h, w, d) -> None:
    """<L(t), m> = <t, L^T(m)> for the token layout, and L(L^T(m)) = m (a selection)."""
    fn = lambda t: tokens_to_maps(t, prefix, (h, w))  # noqa: E731
    g = torch.Generator().manual_seed(prefix * 64 + h * 16 + w * 4 + d)
    t = torch.randn(2, prefix + h * w, d, generator=g, dtype=torch.float64)
    m = torch.randn(2, d, h, w, generator=g, dtype=torch.float64)
    back = pull_back(fn, t, m)
    torch.testing.assert_close((fn(t) * m).sum(), (t * back).sum())
    torch.testing.assert_close(fn(back), m)
    assert bool((back[:, :prefix] == 0).all())


def test_patch_gradient_vanishes_only_when_patches_are_zero_and_prefix_is_not() -> None:
    g = torch.zeros(1, 1, 5, 3)
    assert not patch_gradient_vanishes(g, 1)  # all zero: nothing to say
    g[..., 0, :] = 1
    assert patch_gradient_vanishes(g, 1)
    g[..., 3, 1] = 1e-30
    assert not patch_gradient_vanishes(g, 1)
    assert not patch_gradient_vanishes(g, 0)
