"""The long tail, part B: finercam, refinecam, sess, legrad, postprocess.aggregate, targets.counterfactual.

Parity with pytorch-grad-cam 1.5.7 and torchcam 0.5 on random-weight models in float64 (the references
compute in float32 in places, cv2 resizes and blurs in float32: the tolerances below say how much that
costs), closed forms where the reference has none, and for every method: (B, T) targets, ``vmap`` over
samples, ``camfn.compiled`` (backend "eager") and ``layout=``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch.func import vmap

import camfn
from camfn.targets import counterfactual

GC_TOL = 2e-5  # grad-cam: float32 min-max (eps 1e-7) and cv2 float32 resizes of float64 maps
TC_TOL = 1e-6  # torchcam: torch throughout; eps 1e-8 in its min-max


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gc_targets(classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(c)) for c in classes]


def _close(ours: torch.Tensor, theirs, tol: float) -> None:
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float64)
    err = (ours.detach() - theirs).abs().max().item()
    assert err <= tol, err


# ------------------------------------------------------------------------------------ aggregate
def test_aggregate_matches_grad_cam_multi_layer(resnet, x):
    from pytorch_grad_cam import GradCAM

    classes = [3, 7]
    with GradCAM(resnet, [resnet.layer3, resnet.layer4]) as cam:
        theirs = cam(x, _gc_targets(classes))
    maps = camfn.gradcam(resnet, camfn.params(resnet), x, ["layer3", "layer4"], torch.tensor(classes), size=None)
    ours = camfn.postprocess.aggregate(maps, size=(64, 64))
    _close(ours, theirs, GC_TOL)


def test_aggregate_weights_layers_equally():
    big, small = torch.tensor([[[0.0, 100.0], [50.0, 100.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1e-3]]])
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]]])  # (normalize(big) + normalize(small)) / 2, normalised
    assert torch.allclose(camfn.postprocess.aggregate([big, small]), expected)
    with pytest.raises(camfn.InputError, match="at least one map"):
        camfn.postprocess.aggregate([])


# ------------------------------------------------------------------------------------ counterfactual
def test_counterfactual_negates_the_gradient(resnet, x):
    p = camfn.params(resnet)
    raw = {"relu": False, "normalize": False, "size": None}
    plain = camfn.gradcam(resnet, p, x, "layer4", 4, **raw)
    negated = camfn.gradcam(resnet, p, x, "layer4", counterfactual(4), **raw)
    assert torch.allclose(negated, -plain, atol=1e-12)
    top = camfn.apply(resnet, p, x).argmax(1)
    assert torch.allclose(
        counterfactual()(camfn.apply(resnet, p, x)), -camfn.apply(resnet, p, x).gather(1, top[:, None])[:, 0]
    )


# ------------------------------------------------------------------------------------ finercam
def test_finercam_matches_grad_cam(resnet, x):
    from pytorch_grad_cam import FinerCAM

    p = camfn.params(resnet)
    with FinerCAM(resnet, [resnet.layer4]) as cam:
        theirs_top = cam(x)  # main class: the top-1; the 2nd-4th closest logits, alpha = 1
        theirs_c = cam(x, target_idx=5, alpha=0.7)
    _close(camfn.finercam(resnet, p, x, "layer4"), theirs_top, GC_TOL)
    _close(camfn.finercam(resnet, p, x, "layer4", 5, alpha=0.7), theirs_c, GC_TOL)


@pytest.mark.parametrize("base", ["gradcam", "layercam"])
def test_finercam_matches_torchcam(resnet, x, base):
    from torchcam.methods import FinerCAM, GradCAM, LayerCAM

    classes = [2, 6]
    with FinerCAM(
        resnet, "layer4", input_shape=(3, 64, 64), base_method={"gradcam": GradCAM, "layercam": LayerCAM}[base]
    ) as cam:
        scores = resnet(x)
        (theirs,) = cam(classes, scores)
    ours = camfn.finercam(
        resnet, camfn.params(resnet), x, "layer4", torch.tensor(classes), base=base, mode="torchcam", size=None
    )
    _close(ours, theirs, TC_TOL)


def test_finercam_is_the_base_method_on_the_contrastive_score(resnet, x):
    """Closed form: torchcam mode with the top-1 target = gradcam on contrastive(None, k, gamma) (the k
    closest logits to the top-1 are the k highest others); alpha=0 is plain gradcam."""
    p = camfn.params(resnet)
    ours = camfn.finercam(resnet, p, x, "layer4", mode="torchcam", alpha=0.3, k=2)
    ref = camfn.gradcam(resnet, p, x, "layer4", camfn.targets.contrastive(None, k=2, gamma=0.3))
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(
        camfn.finercam(resnet, p, x, "layer4", 3, alpha=0.0), camfn.gradcam(resnet, p, x, "layer4", 3), atol=1e-12
    )
    with pytest.raises(camfn.TargetError, match="not a callable"):
        camfn.finercam(resnet, p, x, "layer4", lambda out: out[:, 0])
    with pytest.raises(camfn.OptionError, match="base="):
        camfn.finercam(resnet, p, x, "layer4", base="nope")


def test_finercam_fixes_the_classes_on_the_clean_input(gapnet):
    """A perturbation base scores every masked copy against the clean input's classes; aug_smooth works."""
    from camfn.methods.composite import finer_classes, finer_score

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    p = camfn.params(gapnet)
    score = finer_score(*finer_classes(None, gapnet(x), 3), "gradcam", 1.0)
    ours = camfn.finercam(gapnet, p, x, "act", base="scorecam")
    assert torch.allclose(ours, camfn.scorecam(gapnet, p, x, "act", score), atol=1e-6)
    smooth = camfn.finercam(gapnet, p, x, "act", 1, aug_smooth=True)
    assert smooth.shape == (2, 8, 8) and bool((smooth.amax((1, 2)) == 1).all())


# ------------------------------------------------------------------------------------ refinecam
LAYERS = ["layer2", "layer3", "layer4"]


def test_refinecam_matches_grad_cam(resnet, x):
    from pytorch_grad_cam import RefineCAM

    classes = [1, 8]
    cam = RefineCAM(resnet, [resnet.layer2, resnet.layer3, resnet.layer4])  # base Grad-CAM++
    theirs = cam(x, _gc_targets(classes))
    for c in cam.base_cam_per_layer:
        c.activations_and_grads.release()
    _close(camfn.refinecam(resnet, camfn.params(resnet), x, LAYERS, torch.tensor(classes)), theirs, GC_TOL)


def test_refinecam_matches_torchcam(resnet, x):
    from torchcam.methods import GradCAM, RefineCAM

    classes = [1, 8]
    with RefineCAM(resnet, LAYERS, input_shape=(3, 64, 64), base_method=GradCAM) as cam:
        (theirs,) = cam(classes, resnet(x))
    ours = camfn.refinecam(
        resnet, camfn.params(resnet), x, LAYERS, torch.tensor(classes), base="gradcam", mode="torchcam", size=None
    )
    _close(ours, theirs, TC_TOL)


def test_refinecam_formula(resnet, x):
    p = camfn.params(resnet)
    per_layer = camfn.gradcam(resnet, p, x, LAYERS, 4)
    product = torch.stack(per_layer).prod(0)
    expected = camfn.postprocess.normalize(product)
    assert torch.allclose(camfn.refinecam(resnet, p, x, LAYERS, 4, base="gradcam"), expected, atol=1e-12)
    one = camfn.refinecam(resnet, p, x, "layer4", 4, base="gradcam")
    assert torch.allclose(one, camfn.gradcam(resnet, p, x, "layer4", 4), atol=1e-12)


# ------------------------------------------------------------------------------------ sess
@pytest.mark.parametrize("options", [{}, {"pre_filter_ratio": 0.5, "pool": "max", "step_size": 40}])
def test_sess_matches_grad_cam(resnet, x, options):
    from pytorch_grad_cam import SESS, GradCAM

    classes = [2, 9]
    cam = SESS(resnet, [resnet.layer4], base_method=GradCAM, num_scales=3, **options)
    theirs = cam(x, _gc_targets(classes))
    cam.base_cam.activations_and_grads.release()
    ours = camfn.sess(resnet, camfn.params(resnet), x, "layer4", torch.tensor(classes), num_scales=3, **options)
    _close(ours, theirs, 1e-4)  # cv2 float32 resizes and blur at every patch


def test_sess_matches_grad_cam_on_a_wide_image(resnet):
    from pytorch_grad_cam import SESS, GradCAM

    wide = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cam = SESS(resnet, [resnet.layer4], base_method=GradCAM, num_scales=2)
    theirs = cam(wide, _gc_targets([4]))
    cam.base_cam.activations_and_grads.release()
    _close(camfn.sess(resnet, camfn.params(resnet), wide, "layer4", 4, num_scales=2), theirs, 1e-4)


def test_sess_one_scale_one_window_is_the_blurred_base_map(resnet, x):
    p = camfn.params(resnet)
    ours = camfn.sess(resnet, p, x, "layer4", 3, scales=[64], smooth=False)
    assert torch.allclose(ours, camfn.gradcam(resnet, p, x, "layer4", 3), atol=1e-12)
    with pytest.raises(camfn.OptionError, match="window size"):
        camfn.sess(resnet, p, x, "layer4", 3, scales=[32])
    with pytest.raises(camfn.OptionError, match="must fit"):
        camfn.sess(resnet, p, x, "layer4", 3, window_size=65)
    with pytest.raises(camfn.InputError, match="2-D windows"):
        camfn.sess(resnet, p, x[:, :, 0], "layer4", 3)


def test_sess_takes_every_target_form(resnet, x):
    """(B, T) classes = T single-class calls; a callable, per-sample callables (grad-cam's target objects, also
    against grad-cam's SESS) and camfn.targets.logit = the class tensor; a batch = its samples one by one."""
    from pytorch_grad_cam import SESS, GradCAM

    p, kw = camfn.params(resnet), {"num_scales": 2}
    classes = torch.tensor([[2, 9], [5, 1]])
    many = camfn.sess(resnet, p, x, "layer4", classes, **kw)
    assert many.shape == (2, 2, 64, 64)
    one = camfn.sess(resnet, p, x, "layer4", classes[:, 0], **kw)
    _close(many[:, 0], one, 1e-12)
    _close(many[:, 1], camfn.sess(resnet, p, x, "layer4", classes[:, 1], **kw), 1e-12)
    _close(camfn.sess(resnet, p, x, "layer4", lambda out: out.gather(1, classes), **kw), many, 1e-12)
    _close(camfn.sess(resnet, p, x, "layer4", camfn.targets.logit(classes[:, 0]), **kw), one, 1e-12)
    targets = _gc_targets(classes[:, 0])
    _close(camfn.sess(resnet, p, x, "layer4", targets, **kw), one, 1e-12)
    cam = SESS(resnet, [resnet.layer4], base_method=GradCAM, **kw)
    theirs = cam(x, targets)
    cam.base_cam.activations_and_grads.release()
    _close(one, theirs, 1e-4)
    alone = torch.cat([camfn.sess(resnet, p, x[i : i + 1], "layer4", classes[i : i + 1, 0], **kw) for i in range(2)])
    _close(alone, one, 1e-12)
    raw = {"use_softmax_scores": False, **kw}  # a callable on a non-logit output needs raw scores
    column = lambda out: out[:, :, 0].gather(1, classes[:, :1]).squeeze(1)  # noqa: E731
    as_3d = {"output": lambda out: out[:, :, None]}
    with pytest.raises(camfn.OptionError, match="use_softmax_scores=False"):
        camfn.sess(resnet, p, x, "layer4", column, **as_3d, **kw)
    _close(
        camfn.sess(resnet, p, x, "layer4", column, **as_3d, **raw),
        camfn.sess(resnet, p, x, "layer4", classes[:, 0], **raw),
        1e-12,
    )
    with pytest.raises(camfn.TargetError, match="2 sample"):
        camfn.sess(resnet, p, x, "layer4", targets[:1], **kw)


def test_sess_callable_under_vmap_and_compiled(gapnet):
    import copy

    net = copy.deepcopy(gapnet).double()
    p = camfn.params(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    contrast = lambda out: out[:, 1] - out[:, 2]  # noqa: E731
    both = camfn.sess(net, p, x, "relu", contrast, num_scales=2)
    mapped = vmap(lambda xi: camfn.sess(net, p, xi[None], "relu", contrast, num_scales=2)[0])(x)
    _close(mapped, both, 1e-10)
    fast = camfn.compiled(camfn.sess, net, "relu", backend="eager", num_scales=2)
    _close(fast(p, x, contrast), both, 1e-10)


# ------------------------------------------------------------------------------------ every method
COMPOSITES = {
    "finercam": {},
    "refinecam": {"base": "gradcam"},
    "sess": {"num_scales": 2},
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_many_targets_vmap_and_compiled(gapnet, name):
    """(B, T) targets = one call per column; vmap over samples = the batch; compiled (fullgraph) = eager."""
    import copy

    method, options = camfn.METHODS[name], COMPOSITES[name]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = copy.deepcopy(gapnet).double()
    p = camfn.params(net)
    layer = ["relu", "act"] if name == "refinecam" else "relu"
    many = torch.tensor([[1, 2], [3, 4]])
    both = method(net, p, x, layer, many, **options)
    assert both.shape == (2, 2, 16, 16)
    for t in range(2):
        assert torch.allclose(both[:, t], method(net, p, x, layer, many[:, t], **options), atol=1e-10)
    mapped = vmap(lambda xi, ti: method(net, p, xi[None], layer, ti[None], **options)[0])(x, many[:, 0])
    assert torch.allclose(mapped, both[:, 0], atol=1e-10)
    fast = camfn.compiled(method, net, layer, backend="eager", **options)
    assert torch.allclose(fast(p, x, many), both, atol=1e-10)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    return model.double().eval()


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_layout_passes_to_the_base(vit, x, name):
    """With layout='vit' each composite equals its definition written out with the base method."""
    p = camfn.params(vit)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    raw = {"relu": False, "layout": "vit"}
    if name == "finercam":
        from camfn.methods.composite import finer_classes, finer_score

        ours = camfn.finercam(vit, p, x, layer, 3, **raw)
        score = finer_score(*finer_classes(3, vit(x), 3), "gradcam", 1.0)
        expected = camfn.gradcam(vit, p, x, layer, score, **raw)
    elif name == "refinecam":
        ours = camfn.refinecam(vit, p, x, layer, 3, base="gradcam", **raw)
        expected = camfn.gradcam(vit, p, x, layer, 3, layout="vit")  # per-layer base maps keep their ReLU
    else:
        ours = camfn.sess(vit, p, x, layer, 3, scales=[64], smooth=False, **raw)
        expected = camfn.gradcam(vit, p, x, layer, 3, layout="vit")
    assert ours.shape == (2, 64, 64) and bool(ours.amax() > 0)
    assert torch.allclose(ours, expected, atol=1e-12)


# ------------------------------------------------------------------------------------ legrad
BLOCKS = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]


def test_legrad_matches_torchcam(vit, x):
    from torchcam.methods import LeGrad

    classes = [3, 5]
    with LeGrad(vit, BLOCKS) as cam:
        (theirs,) = cam(classes, vit(x))
    p = camfn.params(vit)
    _close(camfn.legrad(vit, p, x, None, torch.tensor(classes), size=None), theirs, TC_TOL)
    with LeGrad(vit, BLOCKS[1:]) as cam:
        (theirs,) = cam(classes, vit(x))
    _close(camfn.legrad(vit, p, x, BLOCKS[1], torch.tensor(classes), size=None), theirs, TC_TOL)
    # the model's own pooling (the class token) through torchcam's score_projection
    with LeGrad(vit, BLOCKS, score_projection=lambda t: vit.heads(vit.encoder.ln(t)[:, 0])) as cam:
        (theirs,) = cam(classes, vit(x))
    _close(camfn.legrad(vit, p, x, None, torch.tensor(classes), size=None, pool="model"), theirs, TC_TOL)


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False, num_classes=10, depth=3)
    torch.nn.init.normal_(model.head.weight)
    return model.double().eval()


def test_explicit_attention_equals_the_fused_graph(timm_vit, vit, x):
    from camfn.methods.attention import explicit_attention
    from camfn.rewrite import program
    from camfn.tracing import traced

    for model in (timm_vit, vit):
        p = camfn.params(model)
        trace = traced(model, p, x)
        rewritten = explicit_attention(trace)
        fused = [n for n in rewritten.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
        assert not fused and len(rewritten.probs) == len(rewritten.blocks) > 0
        assert torch.allclose(program(trace, rewritten.graph)(p, x), model(x), atol=1e-12, rtol=0)


def test_legrad_timm_formula_loop(timm_vit, x):
    """Reference: a copy of the model with timm's unfused attention (``fused_attn=False``), P read by a hook
    on ``attn_drop``, each block's score by autograd (``forward_head(norm(mean tokens))``)."""
    import copy

    ref = copy.deepcopy(timm_vit)
    probs, tokens = [], []
    for block in ref.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
        block.register_forward_hook(lambda m, i, o: tokens.append(o))
    ref(x)
    classes = torch.tensor([[3], [5]])
    maps = []
    for p_l, t_l in zip(probs, tokens, strict=True):
        s = ref.forward_head(ref.norm(t_l.mean(1, keepdim=True).expand_as(t_l))).gather(1, classes).sum()
        (g,) = torch.autograd.grad(s, p_l, retain_graph=True)
        maps.append(g.relu().mean((1, 2))[:, 1:].reshape(2, 4, 4))
    expected = camfn.postprocess.normalize(torch.stack(maps).mean(0))
    ours = camfn.legrad(timm_vit, camfn.params(timm_vit), x, None, classes[:, 0], size=None)
    assert torch.allclose(ours, expected, atol=1e-10)
    assert not any(getattr(b.attn, "fused_attn", True) is False for b in timm_vit.blocks)  # model untouched


def test_legrad_many_targets_vmap_compiled_and_layout(vit, x):
    p = camfn.params(vit)
    many = torch.tensor([[1, 2], [3, 4]])
    both = camfn.legrad(vit, p, x, None, many)
    assert both.shape == (2, 2, 64, 64)
    for t in range(2):
        assert torch.allclose(both[:, t], camfn.legrad(vit, p, x, None, many[:, t]), atol=1e-10)
    mapped = vmap(lambda xi, ti: camfn.legrad(vit, p, xi[None], None, ti[None])[0])(x, many[:, 0])
    assert torch.allclose(mapped, both[:, 0], atol=1e-10)
    fast = camfn.compiled(camfn.legrad, vit, None, backend="eager")
    assert torch.allclose(fast(p, x, many), both, atol=1e-10)
    assert torch.equal(camfn.legrad(vit, p, x, None, many, layout="tokens"), both)
    with pytest.raises(camfn.OptionError, match="layout"):
        camfn.legrad(vit, p, x, None, many, layout="nhwc")


def test_legrad_errors(resnet, vit, x):
    with pytest.raises(camfn.LayerError, match="needs a transformer"):
        camfn.legrad(resnet, camfn.params(resnet), x, None, 1)
    blocks = list(vit.encoder.layers)
    p = camfn.params(vit)
    assert torch.equal(camfn.legrad(vit, p, x, blocks[1:], 1), camfn.legrad(vit, p, x, BLOCKS[1], 1))
    with pytest.raises(camfn.LayerError, match="attention block names"):
        camfn.legrad(vit, camfn.params(vit), x, "encoder.layers.encoder_layer_9", 1)


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_generic_contract_on_a_tiny_cnn(gapnet, name):
    """What the suite asks of every method in METHODS: (B, T) targets at a tiny 8 px CNN, maps differentiable
    w.r.t. x, the model and its parameters unchanged."""
    method = camfn.METHODS[name]
    before = {k: v.clone() for k, v in gapnet.state_dict().items()}
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    maps = method(gapnet, camfn.params(gapnet), x, "act", torch.tensor([[1, 2], [0, 4]]))
    maps.sum().backward()
    assert maps.shape == (2, 2, 8, 8) and x.grad is not None
    assert all(torch.equal(v, gapnet.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in gapnet.parameters())
