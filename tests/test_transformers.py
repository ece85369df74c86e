"""Hugging Face transformers models (tiny configs, random weights, 64 px): defaults with no option, parity
with pytorch-grad-cam's HuggingFace tutorial approach in float64, every method on a ViT and a Swin, the
similarity and segmentation targets, model_kwargs, Cut on attention blocks, and clear export errors."""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camfn
from camfn.errors import TraceError

T = pytest.importorskip("transformers")
pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SIZE = 64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _vit(**extra):
    config = {
        "image_size": SIZE,
        "patch_size": 16,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    return {**config, **extra}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**_vit(num_labels=5)))
    elif name == "deit":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**_vit(num_labels=5)))
    elif name == "beit":
        model = T.BeitForImageClassification(T.BeitConfig(**_vit(num_labels=5, use_relative_position_bias=True)))
    elif name == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**_vit()))
    elif name == "dinov2_registers":
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**_vit(num_register_tokens=2)))
    elif name == "swin":
        config = T.SwinConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=8, num_labels=5
        )  # window 8: stage 0 (16 x 16 tokens) is windowed, stage 1 (8 x 8) one window
        model = T.SwinForImageClassification(config)
    elif name == "convnext":
        config = T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)
        model = T.ConvNextForImageClassification(config)
    elif name == "resnet":
        config = T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5
        )
        model = T.ResNetForImageClassification(config)
    elif name == "clip_vision":
        model = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**_vit(projection_dim=16)))
    elif name == "clip":
        text = {
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        }  # fmt: skip
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=_vit(), projection_dim=16))
    elif name == "segformer":
        config = T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            decoder_hidden_size=32, num_labels=3, patch_sizes=[7, 3], strides=[4, 2],
        )  # fmt: skip
        model = T.SegformerForSemanticSegmentation(config)
    elif name == "detr":
        backbone = T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", out_features=["stage2"]
        )
        config = T.DetrConfig(
            use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
            encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_labels=3,
        )  # fmt: skip
        model = T.DetrForObjectDetection(config)
    else:
        raise KeyError(name)
    return model.eval()


NAMES = [
    "vit", "deit", "beit", "dinov2", "dinov2_registers", "swin", "convnext", "resnet", "clip_vision", "segformer",
    "detr",
]  # fmt: skip
EXPECTED = {  # what the adapter infers: (layer, prefix tokens or None for channel-first maps, output)
    "vit": ("vit.layers.1.layernorm_before", 1, "logits"),
    "deit": ("deit.layers.1.layernorm_before", 2, "logits"),
    "beit": ("beit.layers.1.layernorm_before", 1, "logits"),
    "dinov2": ("encoder.layer.1.norm1", 1, "pooler_output"),
    "dinov2_registers": ("encoder.layer.1.norm1", 3, "pooler_output"),
    "swin": ("swin.layernorm", 0, "logits"),
    "convnext": ("convnext.encoder.stages.1", None, "logits"),
    "resnet": ("resnet.encoder.stages.1", None, "logits"),
    "clip_vision": ("vision_model.encoder.layers.1.layer_norm1", 1, "image_embeds"),
    "segformer": ("segformer.stages.1", None, "logits"),
    "detr": ("model.backbone.model.encoder.stages.1", None, "logits"),
}


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _outputs(model, x, **kwargs):
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _target(name):
    if name == "detr":  # a detection score: class 1's best query (logits (B, queries, classes + 1))
        return lambda logits: logits[:, :, 1].amax(1)
    return camfn.targets.segmentation(1) if name == "segformer" else None


# ------------------------------------------------------------------------------- defaults, no option
@pytest.mark.parametrize("name", NAMES)
def test_no_option_map_and_model_untouched(models, x, name):
    """gradcam(hf_model, params, x, None, target) with no option: the adapter's layer, layout and output,
    the same map as the explicit form under tracer='export', and the model's later outputs unchanged."""
    model = models(name)
    before = _outputs(model, x)
    maps = camfn.gradcam(model, camfn.params(model), x, None, _target(name))
    assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all()
    assert float(maps.amax()) == pytest.approx(1.0) and float(maps.std()) > 0  # a real, non-flat map
    layer, prefix, output = EXPECTED[name]
    assert camfn.default_layer(model, x) == layer
    layout = None if prefix is None else camfn.layout.Tokens(prefix=prefix)
    explicit = camfn.gradcam(
        model, camfn.params(model), x, layer, _target(name), layout=layout, output=output, tracer="export"
    )
    if output in ("pooler_output", "image_embeds"):
        explicit = None  # embedding models: the default target is checked in test_embedding_default_target
    if explicit is not None:
        torch.testing.assert_close(maps, explicit, atol=1e-6, rtol=0)
    after = _outputs(model, x)
    assert before.keys() == after.keys()
    for key in before:
        assert type(after[key]) is torch.Tensor
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_cam_without_fc_is_the_closed_form(models, x, name):
    """cam finds the classifier of an exported HF model itself (global average pooling, for ConvNeXt a norm of
    the pooled vector, then the Linear): the map is relu(sum_k W[c, k] A_k) of the last stage, resized and
    min-max normalised."""
    model = models(name)
    classes = torch.tensor([1, 3])
    maps = camfn.cam(model, camfn.params(model), x, None, classes)
    with torch.no_grad():
        a = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # the last stage (B, K, h, w)
    w = model.get_submodule("classifier.1" if name == "resnet" else "classifier").weight[classes]  # (B, K)
    expected = camfn.postprocess.finish(torch.einsum("bk,bkhw->bhw", w, a), x)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)


def test_embedding_default_target(models, x):
    """Embedding models: target None is the embedding's length along its clean direction."""
    model = models("dinov2")
    with torch.no_grad():
        ref = model(x).pooler_output
    direction = F.normalize(ref, dim=1)
    expected = camfn.gradcam(
        model, camfn.params(model), x, "encoder.layer.1.norm1", lambda e: (e * direction).sum(1),
        layout="vit", output="pooler_output",
    )  # fmt: skip
    torch.testing.assert_close(camfn.gradcam(model, camfn.params(model), x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("method", "options"),
    [("gradcam", {}), ("smooth_gradcampp", {"n": 2}), ("scorecam", {}), ("gradcam", {"aug_smooth": True})],
    ids=["gradcam", "smooth_gradcampp", "scorecam", "aug_smooth"],
)
def test_embedding_default_target_anchors_on_the_clean_input(models, x, method, options):
    """The default embedding target needs no forward of its own: a gradient method anchors it on its own clean
    forward; noisy copies, perturbed copies and augmented views are all scored against the clean embedding."""
    model = models("dinov2")
    with torch.no_grad():
        direction = F.normalize(model(x).pooler_output, dim=1)
    layer = "encoder.layer.1.norm1"

    def explicit(e):
        r = direction if e.shape[0] == direction.shape[0] else direction.repeat(e.shape[0] // direction.shape[0], 1)
        return (e * r).sum(1)

    run = camfn.METHODS[method]
    got = run(model, camfn.params(model), x, layer, **options)
    want = run(model, camfn.params(model), x, layer, explicit, layout="vit", output="pooler_output", **options)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- parity, float64
class _Field(torch.nn.Module):
    """pytorch-grad-cam's HuggingFace tutorial wrapper: the model's output field as a tensor."""

    def __init__(self, model, field):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x):
        return getattr(self.model(x), self.field)


def _reshape(prefix, h, w):
    def transform(t):
        return t[:, prefix:].reshape(t.size(0), h, w, t.size(2)).permute(0, 3, 1, 2)

    return transform


PARITY = {  # name -> (module path, prefix tokens or None for channel-first maps)
    "vit": ("vit.layers.1.layernorm_before", 1),
    "deit": ("deit.layers.1.layernorm_before", 2),
    "beit": ("beit.layers.1.layernorm_before", 1),
    "resnet": ("resnet.encoder.stages.1", None),
    "convnext": ("convnext.encoder.stages.1", None),
}


@pytest.mark.parametrize("name", [*PARITY, "swin"])
def test_parity_with_grad_cam_float64(models, x, name):
    """camfn's no-option map equals pytorch-grad-cam's (a .logits wrapper and a reshape_transform) to 1e-6."""
    model = copy.deepcopy(models(name)).double()
    xd = x.double()
    classes = [3, 1]
    maps = camfn.gradcam(model, camfn.params(model), xd, None, torch.tensor(classes))
    if name == "swin":
        path, prefix, side = "swin.layernorm", 0, 8
    else:
        path, prefix = PARITY[name]
        side = 4
    module = model.get_submodule(path)
    with GradCAM(model=_Field(model, "logits"), target_layers=[module]) as cam:
        if prefix is not None:
            cam.activations_and_grads.reshape_transform = _reshape(prefix, side, side)
        ref = cam(input_tensor=xd, targets=[ClassifierOutputTarget(c) for c in classes])
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("name", ["dinov2", "clip_vision"])
def test_similarity_target_parity(models, x, name):
    """targets.similarity on Dinov2 and CLIP vision equals grad-cam with a cosine-similarity target."""
    model = copy.deepcopy(models(name)).double()
    xd = x.double()
    field = "pooler_output" if name == "dinov2" else "image_embeds"
    with torch.no_grad():
        concept = getattr(model(xd.flip(0)), field)  # each image explained toward the other's embedding
    maps = camfn.gradcam(model, camfn.params(model), xd, None, camfn.targets.similarity(concept))
    path = EXPECTED[name][0]
    targets = [lambda out, r=r: F.cosine_similarity(out, r, dim=0) for r in concept]
    with GradCAM(model=_Field(model, field), target_layers=[model.get_submodule(path)]) as cam:
        cam.activations_and_grads.reshape_transform = _reshape(1, 4, 4)
        ref = cam(input_tensor=xd, targets=targets)
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_every_method(models, name):
    """Every method in camfn.METHODS runs with no option on a ViT and a Swin and gives a finite map."""
    model = models(name)
    x1 = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    for method_name, method in camfn.METHODS.items():
        if method_name == "cam":  # CAM reads the classifier's weights: found by fc= on exported graphs
            with pytest.raises(camfn.errors.LayerError, match="gradcam"):
                method(model, camfn.params(model), x1, None, 2)
            if name == "vit":  # the class token, not an average of patches, reaches the classifier
                continue
            maps = method(model, camfn.params(model), x1, None, 2, fc="classifier")
            torch.testing.assert_close(maps, camfn.gradcam(model, camfn.params(model), x1, None, 2), atol=1e-5, rtol=0)
            continue
        maps = method(model, camfn.params(model), x1, None, 2)
        assert maps.shape == (1, SIZE, SIZE), method_name
        assert torch.isfinite(maps).all(), method_name
        assert float(maps.amin()) >= 0 and float(maps.amax()) <= 1 + 1e-6, method_name


# ------------------------------------------------------------------------------- segmentation
def test_segformer_segmentation_target(models, x):
    """The segmentation target on Segformer: the score is the class's logits summed over the mask, so the
    map equals the explicit target with that mask; a different class gives a different map."""
    model = models("segformer")
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:12, 4:12] = 1
    ones = camfn.gradcam(model, camfn.params(model), x, None, camfn.targets.segmentation(1, mask))
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 3, 16, 16)
    by_hand = camfn.gradcam(
        model, camfn.params(model), x, None, lambda out: (out[:, 1] * mask).sum((1, 2)), output="logits"
    )
    torch.testing.assert_close(ones, by_hand, atol=1e-6, rtol=0)
    other = camfn.gradcam(model, camfn.params(model), x, None, camfn.targets.segmentation(2, mask))
    assert not torch.allclose(ones, other)


# ------------------------------------------------------------------------------- model_kwargs
def test_clip_model_with_input_ids(models, x):
    """CLIPModel with model_kwargs={'input_ids': ...}: logits_per_image picked, maps for batch 1 and 2, and the
    map equals the one of the vision tower scored by hand with the text embeddings."""
    model = models("clip")
    ids = torch.randint(2, 50, (3, 5), generator=torch.Generator().manual_seed(3))
    before = _outputs(model, x, input_ids=ids)
    maps = camfn.gradcam(model, camfn.params(model), x, None, torch.tensor([2, 0]), model_kwargs={"input_ids": ids})
    assert maps.shape == (2, SIZE, SIZE) and float(maps.std()) > 0
    one = camfn.gradcam(model, camfn.params(model), x[:1], None, 2, model_kwargs={"input_ids": ids})
    torch.testing.assert_close(one, maps[:1], atol=1e-6, rtol=0)
    applied = camfn.apply(model, camfn.params(model), x, model_kwargs={"input_ids": ids})
    torch.testing.assert_close(applied["logits_per_image"], before["logits_per_image"], atol=1e-6, rtol=0)
    ablated = camfn.ablationcam(model, camfn.params(model), x, None, 2, model_kwargs={"input_ids": ids})
    assert ablated.shape == (2, SIZE, SIZE) and torch.isfinite(ablated).all()  # the graph cut keeps the texts
    after = _outputs(model, x, input_ids=ids)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)


def test_interpolate_pos_encoding(models):
    """model_kwargs reaches the forward: a 96 px input to a 64 px ViT works with interpolate_pos_encoding and
    equals grad-cam on the same call."""
    model = models("vit")
    x96 = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    maps = camfn.gradcam(model, camfn.params(model), x96, None, 1, model_kwargs={"interpolate_pos_encoding": True})
    assert maps.shape == (1, 96, 96)

    class Interp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, t):
            return self.model(t, interpolate_pos_encoding=True).logits

    with GradCAM(model=Interp(), target_layers=[model.vit.layers[1].layernorm_before]) as cam:
        cam.activations_and_grads.reshape_transform = _reshape(1, 6, 6)
        ref = cam(input_tensor=x96, targets=[ClassifierOutputTarget(1)])
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------- errors
def test_clip_without_input_ids_names_the_fix(models, x):
    with pytest.raises(TraceError, match=r"input_ids.*model_kwargs=\{'input_ids'"):
        camfn.gradcam(models("clip"), camfn.params(models("clip")), x, None, 0)


def test_wrong_size_names_the_fix(models):
    model = models("vit")
    with pytest.raises(TraceError, match=r"refused the input of shape \(1, 3, 96, 96\).*interpolate_pos_encoding"):
        camfn.gradcam(model, camfn.params(model), torch.randn(1, 3, 96, 96), None, 0)


def test_layout_error_names_a_working_layer(models, x):
    """The last block's output of a ViT has no patch gradient: the error names a concrete layer that works."""
    model = models("vit")
    with pytest.raises(camfn.errors.LayerError, match=r"layer='vit\.layers\.1\.layernorm_before'") as info:
        camfn.gradcam(model, camfn.params(model), x, "vit.layernorm", 0, layout="vit")
    del info
    assert camfn.gradcam(model, camfn.params(model), x, "vit.layers.1.layernorm_before", 0).shape == (2, SIZE, SIZE)


def test_hidden_state_hooks_are_part_of_the_model(models, x):
    """After output_hidden_states=True transformers carries its own hooks; camfn keeps them, hooks='ignore'
    traces too, and both give the map of the hook-free model."""
    model = _build("vit")
    clean = camfn.gradcam(model, camfn.params(model), x, None, 1)
    with torch.no_grad():
        model(x, output_hidden_states=True)
    for hooks in ("error", "ignore"):
        torch.testing.assert_close(camfn.gradcam(model, camfn.params(model), x, None, 1, hooks=hooks), clean)
    segformer = models("segformer")
    _outputs(segformer, x)  # every Segformer forward leaves transformers' hooks on it
    target = camfn.targets.segmentation(1)
    kept = camfn.gradcam(segformer, camfn.params(segformer), x, None, target)
    torch.testing.assert_close(camfn.gradcam(segformer, camfn.params(segformer), x, None, target, hooks="ignore"), kept)


# ------------------------------------------------------------------------------- Cut on attention
def _beit_cut(model):
    beit = model.beit

    def head(x):
        h = beit.embeddings(x)
        h = h[0] if isinstance(h, tuple) else h
        return beit.layers[0](h, resolution=x.shape[2:])

    def tail(a):
        h = beit.layers[1](a, resolution=(SIZE, SIZE))
        return model.classifier(beit.pooler(beit.layernorm(h)))

    return camfn.Cut(head, tail)


def _swin_cut(model):
    swin = model.swin

    def head(x):
        h, dims = swin.embeddings(x)
        return swin.encoder.layers[0](h, dims)[0]

    def tail(a):
        h = swin.encoder.layers[1](a, (8, 8))[0]
        return model.classifier(torch.flatten(swin.pooler(swin.layernorm(h).transpose(1, 2)), 1))

    return camfn.Cut(head, tail)


@pytest.mark.parametrize("name", ["beit", "swin"])
def test_cut_on_attention_blocks(models, x, name):
    """Cut(head, tail) closures over HF attention blocks (masks built from weights): the map equals the traced
    model's map at the same layer, and the model's later outputs are real, unchanged tensors."""
    model = models(name)
    before = _outputs(model, x)
    cut = (_beit_cut if name == "beit" else _swin_cut)(model)
    with torch.no_grad():
        torch.testing.assert_close(cut(x), model(x).logits)
    layer = "beit.layers.0" if name == "beit" else "swin.encoder.layers.0"
    side = 4 if name == "beit" else 8
    for autograd_tail in (False, True):
        cut = (_beit_cut if name == "beit" else _swin_cut)(model)
        if autograd_tail:
            cut = camfn.Cut(cut.head.fn, cut.tail.fn, autograd_tail=True)
        maps = camfn.gradcam(cut, camfn.params(cut), x, "head", torch.tensor([1, 3]), layout="tokens")
        whole = camfn.gradcam(model, camfn.params(model), x, layer, torch.tensor([1, 3]), layout="tokens")
        assert maps.shape == (2, SIZE, SIZE) and side
        torch.testing.assert_close(maps, whole, atol=1e-5, rtol=0)
    after = _outputs(model, x)
    for key in before:
        assert type(after[key]) is torch.Tensor  # no FakeTensor left in BEiT's lru_cache
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(p.requires_grad for p in model.parameters())  # the user's weights are untouched


def test_detr_default_and_class_targets(models, x):
    """DETR's logits are (B, queries, classes + 1): target=None is the most confident query's most likely real
    class logit, an int c is class c's best query, a (B, T) tensor gives T maps; each equals gradcam with the
    explicit callable. A class of the "no object" column is out of range."""
    model = models("detr")
    p = camfn.params(model)
    top = camfn.gradcam(model, p, x, None, None)
    by_hand = camfn.gradcam(model, p, x, None, lambda lg: lg[..., :-1].amax((1, 2)))
    torch.testing.assert_close(top, by_hand, atol=0, rtol=0)
    one = camfn.gradcam(model, p, x, None, 1)
    torch.testing.assert_close(one, camfn.gradcam(model, p, x, None, lambda lg: lg[:, :, 1].amax(1)), atol=0, rtol=0)
    assert not torch.allclose(one, camfn.gradcam(model, p, x, None, 2))
    two = camfn.gradcam(model, p, x, None, torch.tensor([[1, 2], [2, 0]]))
    assert two.shape == (2, 2, SIZE, SIZE)
    torch.testing.assert_close(two[0, 0], one[0], atol=1e-6, rtol=0)
    with pytest.raises(camfn.errors.TargetError, match=r"class 3 is out of range.*0\.\.2"):
        camfn.gradcam(model, p, x, None, 3)


def test_query_logits_without_the_detector_rule_stay_an_error(models, x):
    """The same (B, queries, classes + 1) logits from a model no adapter knows: a TargetError saying to pass a
    callable, never a guess."""
    plain = _Field(models("detr"), "logits")
    layer = "model.model.backbone.model.encoder.stages.1"
    with pytest.raises(camfn.errors.TargetError, match="callable"):
        camfn.gradcam(plain, camfn.params(plain), x, layer, None, tracer="export")


def test_camfn_import_does_not_import_transformers():
    """The adapters are imported only when a transformers (or torchvision / timm) model is explained."""
    code = (
        "import sys, camfn; print('transformers' in sys.modules, 'camfn.adapters.transformers' in sys.modules, "
        "'timm' in sys.modules, 'camfn.adapters.vision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False", "False", "False"]
