"""LeGrad on torch.export graphs of Hugging Face transformers (tiny configs, random weights, 64 px): equal to the
LeGrad formula computed with autograd through transformers' own forward in float64, the same map for
``attn_implementation="eager"`` (an explicit softmax) and ``"sdpa"`` (a fused op rewritten by camfn), and a
clear error for windowed (Swin) attention naming the blocks that work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import camfn
from camfn.postprocess import finish

T = pytest.importorskip("transformers")

SIZE = 64
VIT = {
    "image_size": SIZE, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64,
}  # fmt: skip


def _build(name: str, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=5, attn_implementation=impl))
    elif name == "deit":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VIT, num_labels=5, attn_implementation=impl))
    elif name == "beit":
        config = T.BeitConfig(**VIT, num_labels=5, use_relative_position_bias=True, attn_implementation=impl)
        model = T.BeitForImageClassification(config)
    elif name == "dinov2":
        config = T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=2, attn_implementation=impl)
        model = T.Dinov2WithRegistersModel(config)
    elif name == "clip_vision":
        model = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**VIT, projection_dim=16, attn_implementation=impl))
    elif name in ("swin", "swin_windowed"):
        window = 8 if name == "swin" else 4  # 8: the last stage (8 x 8 tokens at 64 px) is one window
        config = T.SwinConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=window,
            num_labels=5, attn_implementation=impl,
        )  # fmt: skip
        model = T.SwinForImageClassification(config)
    else:
        raise KeyError(name)
    return model.eval().double()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ------------------------------------------------------------------------------- the formula, by autograd
DELTAS: list[torch.Tensor] = []  # one zero leaf per attention call, added to its probabilities


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention with ``P + delta`` (delta a fresh zero leaf) and the softmax in float64."""
    logits = query @ key.transpose(2, 3) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        logits = logits + attention_mask
    p = logits.softmax(-1)
    delta = torch.zeros_like(p, requires_grad=True)
    DELTAS.append(delta)
    return ((p + delta) @ value).transpose(1, 2).contiguous(), p


T.AttentionInterface.register("camfn_probe", _probe_attention)


def _legrad_by_hand(model, x, classes):
    """Per block l: s_l = classifier(layernorm(mean of block l's tokens)) [ViT's head on the mean token];
    E_l = relu(d s_l / d P_l) averaged over heads and queries, CLS dropped, on the 4 x 4 grid; summed over l."""
    model.config._attn_implementation = "camfn_probe"
    DELTAS.clear()
    try:
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    finally:
        model.config._attn_implementation = "eager"
    total = 0
    for tokens, delta in zip(hidden, DELTAS, strict=True):
        logits = model.classifier(model.vit.layernorm(tokens.mean(1)))
        score = logits.gather(1, classes[:, None]).sum()
        (g,) = torch.autograd.grad(score, delta)
        relevance = F.relu(g).mean((1, 2))[:, 1:]  # (B, patches)
        total = total + relevance.reshape(x.shape[0], 4, 4)
    return finish(total, x)


def test_vit_equals_the_formula_in_both_attention_implementations(x):
    """legrad on the exported HF ViT equals the autograd formula, for eager and sdpa attention, to 1e-6."""
    classes = torch.tensor([1, 3])
    reference = _legrad_by_hand(_build("vit", "eager"), x, classes)
    maps = {}
    for impl in ("eager", "sdpa"):
        model = _build("vit", impl)
        maps[impl] = camfn.legrad(model, camfn.params(model), x, None, classes)
        torch.testing.assert_close(maps[impl], reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps["eager"], maps["sdpa"], atol=1e-6, rtol=0)
    assert float(reference.std()) > 0  # a real map


@pytest.mark.parametrize("name", ["deit", "beit", "dinov2", "clip_vision", "swin"])
def test_eager_equals_sdpa(x, name):
    """DeiT (teacher: CLS and distillation tokens), BEiT (relative position bias as the sdpa mask), Dinov2 with
    registers (3 prefix tokens), CLIP vision and a Swin whose last stage is one window: the same map from the
    explicit softmax and from the rewritten fused op, no option needed."""
    maps = {}
    for impl in ("eager", "sdpa"):
        model = _build(name, impl)
        maps[impl] = camfn.legrad(model, camfn.params(model), x, None, None)
        assert maps[impl].shape == (2, SIZE, SIZE) and torch.isfinite(maps[impl]).all()
    torch.testing.assert_close(maps["eager"], maps["sdpa"], atol=1e-6, rtol=0)
    assert float(maps["sdpa"].std()) > 0


def test_prefix_tokens_are_dropped(x):
    """Dinov2 with 2 registers: the 3 prefix keys are dropped (a 4 x 4 grid is left); stating prefix_tokens=3
    gives the same map, and a prefix that leaves no grid is a clear error."""
    model = _build("dinov2", "sdpa")
    inferred = camfn.legrad(model, camfn.params(model), x, None, None, size=None)
    assert inferred.shape == (2, 4, 4)
    stated = camfn.legrad(model, camfn.params(model), x, None, None, size=None, prefix_tokens=3)
    torch.testing.assert_close(inferred, stated, atol=0, rtol=0)
    with pytest.raises(camfn.errors.LayerError, match="prefix_tokens="):
        camfn.legrad(model, camfn.params(model), x, None, None, prefix_tokens=2)


def test_swin_windowed_attention_is_a_clear_error(x):
    """Windowed attention has no image-wide attention to read: layer=None on a Swin whose every stage has
    several windows, and a windowed block named on a Swin with a global last stage, both raise a LayerError
    naming the problem and the blocks that work."""
    model = _build("swin_windowed", "sdpa")
    with pytest.raises(camfn.errors.LayerError, match=r"windowed attention.*window_size"):
        camfn.legrad(model, camfn.params(model), x, None, 1)
    model = _build("swin", "sdpa")
    with pytest.raises(camfn.errors.LayerError, match=r"windowed attention.*\['swin\.encoder\.layers\.1\.blocks\.0'\]"):
        camfn.legrad(model, camfn.params(model), x, "swin.encoder.layers.0.blocks.0", 1)
    block = camfn.legrad(model, camfn.params(model), x, "swin.encoder.layers.1.blocks.0", 1)
    torch.testing.assert_close(block, camfn.legrad(model, camfn.params(model), x, None, 1), atol=0, rtol=0)


def test_explicit_softmax_in_a_fx_graph(x):
    """The eager form in torch.fx too: timm's ViT with fused_attn=False (softmax -> Dropout module -> @ v) gives
    the map of its fused F.scaled_dot_product_attention."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fused = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=2, embed_dim=32, num_heads=2, num_classes=10
    )
    fused = fused.eval().double()
    explicit = copy.deepcopy(fused)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    maps = [camfn.legrad(m, camfn.params(m), x, None, 1) for m in (fused, explicit)]
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=0)
