"""The metric registry, non-finite inputs, volumes, raw scores, callable targets, any step count, closed forms.

Every entry of ``camfn.metrics.METRICS`` is called by name through ``compute`` on a tiny model at 16 px:
each must refuse a NaN map (or input) naming the sample, and with ``skip_nonfinite=True`` give NaN for that
sample only (with a warning) and finite values for the rest.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import sklearn.metrics
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import camfn
from camfn import metrics
from camfn.errors import CamfnError, InputError, OptionError

CHEAP = {
    "sparseness": {},
    "complexity": {},
    "confidence": {},
    "average_drop": {},
    "increase_in_confidence": {},
    "road": {"fractions": (0.3, 0.6)},
    "cam_mult_image_confidence_change": {},
    "road_most_relevant_first_average": {"percentiles": (50,)},
    "road_least_relevant_first_average": {"percentiles": (50,)},
    "road_combined": {"percentiles": (50,)},
    "arcc": {"percentiles": (50,)},
    "pointing_game": {"tolerance": 1},
    "energy_pointing_game": {},
    "top_k_intersection": {"k": 5},
    "relevance_rank_accuracy": {},
    "auc": {},
    "deletion": {"steps": 4},
    "insertion": {"steps": 4},
    "pixel_flipping": {"steps": 4},
    "region_perturbation": {"patch_size": 8, "regions": 3},
    "irof": {"patch_size": 8},
    "monotonicity_correlation": {"features_in_step": 64, "samples": 2},
    "faithfulness_correlation": {"runs": 5, "subset_size": 8},
    "infidelity": {"samples": 3},
    "sanity_check": {"depth": 1},
    "mprt": {"depth": 1},
    "max_sensitivity": {"samples": 2},
    "avg_sensitivity": {"samples": 2},
}


class Net(nn.Module):
    """A tiny CNN whose output is NaN for samples whose first pixel is above 5 (a hostile model)."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        self.conv = conv(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = pool(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.pool(self.relu(self.conv(x))).flatten(1))
        poison = x.flatten(1)[:, :1] > 5
        return torch.where(poison, torch.full_like(out, float("nan")), out)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    p = camfn.params(model)
    maps = camfn.gradcam(model, p, x, "conv", 1)
    boxes = torch.tensor([[2, 2, 9, 9], [0, 0, 16, 8], [4, 8, 12, 16]])
    return model, p, x, maps, boxes


def inputs(model, p, x, maps, boxes):
    return {"model": model, "params": p, "x": x, "maps": maps, "target": torch.tensor([1, 1, 1]), "boxes": boxes,
            "method": camfn.gradcam, "layer": "conv"}  # fmt: skip


def test_every_metric_is_registered_public_and_described():
    assert set(metrics.METRICS) == set(CHEAP)  # a new metric must join this file's checks
    for name, entry in metrics.METRICS.items():
        assert getattr(metrics, name) is entry.fn and name in metrics.__all__
        assert entry.needs <= {"model", "maps", "boxes", "method"} and entry.needs
        assert entry.output in ("sample", "curve", "randomisation")
        assert isinstance(entry.higher_is_better, bool)
        assert "skip_nonfinite" in inspect.signature(entry.fn).parameters
        assert entry.fn.__doc__ and ">>>" in entry.fn.__doc__


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_compute_by_name_refuses_nan_and_skips_on_request(setup, name):
    model, p, x, maps, boxes = setup
    good = metrics.compute(name, inputs(model, p, x, maps, boxes), **CHEAP[name])
    assert good.shape == (3,) and good.dtype == torch.float64 and bool(torch.isfinite(good).all())
    takes_maps = "maps" in inspect.signature(metrics.METRICS[name].fn).parameters
    bad_maps, bad_x = maps.clone(), x.clone()
    if takes_maps:
        bad_maps[1, 3, 4] = float("nan")
    else:
        bad_x[1, 0, 3, 4] = float("inf")
    bad = inputs(model, p, bad_x, bad_maps, boxes)
    with pytest.raises(InputError, match=r"sample\(s\) \[1\].*skip_nonfinite=True"):
        metrics.compute(name, bad, **CHEAP[name])
    if not takes_maps:
        return
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        skipped = metrics.compute(name, bad, skip_nonfinite=True, **CHEAP[name])
    assert torch.isnan(skipped[1]) and bool(torch.isfinite(skipped[[0, 2]]).all())


def test_nonfinite_scores_are_named(setup):
    model, p, x, maps, _ = setup
    poisoned = x.clone()
    poisoned[2, 0, 0, 0] = 9.0  # the model answers NaN for sample 2
    with pytest.raises(InputError, match=r"scores of sample\(s\) \[2\]"):
        metrics.deletion(model, p, poisoned, maps, steps=4)
    with pytest.warns(RuntimeWarning):
        curve = metrics.deletion(model, p, poisoned, maps, steps=4, skip_nonfinite=True)
    assert bool(torch.isnan(curve.auc[2])) and bool(torch.isfinite(curve.scores[:2]).all())
    assert torch.allclose(curve.scores[:2], metrics.deletion(model, p, x[:2], maps[:2], steps=4).scores)
    with pytest.raises(OptionError, match="skip_nonfinite"):
        metrics.confidence(model, p, x, skip_nonfinite="yes")


def test_compute_errors_name_the_fix(setup):
    model, p, x, maps, _boxes = setup
    with pytest.raises(OptionError, match="did you mean 'deletion'"):
        metrics.compute("deletoin", {})
    with pytest.raises(OptionError, match=r"needs \['boxes'\]"):
        metrics.compute("auc", {"maps": maps})
    with pytest.raises(OptionError, match="method"):
        metrics.compute("max_sensitivity", {"model": model, "params": p, "x": x})


# --------------------------------------------------------------------------------- scores and targets
def test_raw_scores_callable_targets_and_any_step_count(setup):
    model, p, x, maps, _ = setup
    logits = camfn.apply(model, p, x)
    assert torch.allclose(metrics.confidence(model, p, x, 2, softmax=False), logits[:, 2])
    top = logits.argmax(1)
    assert torch.allclose(metrics.confidence(model, p, x), logits.softmax(1).gather(1, top[:, None])[:, 0])
    raw = metrics.deletion(model, p, x, maps, 2, steps=5, softmax=False)
    by_callable = metrics.deletion(model, p, x, maps, lambda out: out[:, 2], steps=5)
    assert torch.allclose(raw.scores, by_callable.scores) and torch.allclose(raw.scores[:, 0], logits[:, 2])
    prob = metrics.deletion(model, p, x, maps, camfn.targets.probability(2), steps=5)
    assert torch.allclose(prob.scores, metrics.deletion(model, p, x, maps, 2, steps=5).scores)
    for steps in (7, 300):  # 256 pixels: neither divides, 300 > pixels
        curve = metrics.deletion(model, p, x, maps, 2, steps=steps, baseline=0.0)
        counts = torch.arange(steps + 1) * 256 // steps
        assert torch.allclose(curve.fractions, counts.double().to(curve.fractions.dtype) / 256)
        ref = model(torch.zeros(1, 3, 16, 16)).softmax(1)[0, 2]
        assert torch.allclose(curve.scores[:, -1], ref.expand(3), atol=1e-6)
    auto = metrics.insertion(model, p, x, maps, steps=6)
    assert torch.allclose(auto.scores, metrics.insertion(model, p, x, maps, steps=6, chunk_size=None).scores)
    assert torch.allclose(auto.scores, metrics.insertion(model, p, x, maps, steps=6, chunk_size=5).scores)


def test_pixel_flipping_quantus_rule_with_a_remainder(setup):
    model, p, x, maps, _ = setup
    c = metrics.pixel_flipping(model, p, x, maps, 0, rule="quantus", features_in_step=100, baseline=0.0)
    assert c.fractions.mul(256).tolist() == [100, 200, 256]
    expected = [metrics.deletion(model, p, x, maps, 0, steps=256).scores[:, k] for k in (100, 200, 256)]
    assert torch.allclose(c.scores, torch.stack(expected, 1), atol=1e-6)
    assert torch.allclose(c.auc, (c.scores[:, :-1] + c.scores[:, 1:]).sum(1) / 2)


# -------------------------------------------------------------------------------------------- volumes
def test_volumes_work_where_defined_and_are_refused_clearly_elsewhere():
    torch.manual_seed(0)
    model = Net(dims=3).eval()
    p, x = camfn.params(model), torch.rand(2, 3, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    maps = camfn.gradcam(model, p, x, "conv", 0)
    assert maps.shape == (2, 6, 8, 8)
    region = torch.zeros(2, 6, 8, 8, dtype=torch.bool)
    region[:, 1:4, 2:6, 2:6] = True
    for name in ("deletion", "insertion", "pixel_flipping", "average_drop", "confidence", "monotonicity_correlation",
                 "faithfulness_correlation", "infidelity", "sparseness", "complexity", "auc", "top_k_intersection",
                 "energy_pointing_game", "relevance_rank_accuracy", "max_sensitivity", "sanity_check"):  # fmt: skip
        got = metrics.compute(name, inputs(model, p, x, maps, region) | {"target": torch.tensor([0, 0])}, **CHEAP[name])
        assert got.shape == (2,) and bool(torch.isfinite(got).all()), name
    for name in ("road", "region_perturbation", "irof", "road_combined"):
        with pytest.raises(InputError, match="2-d images"):
            metrics.compute(name, inputs(model, p, x, maps, region), **CHEAP[name])
    with pytest.raises(InputError, match="bool mask"):
        metrics.pointing_game(maps, torch.tensor([[0, 0, 2, 2]] * 2))


# ------------------------------------------------------------------------------------------ closed forms
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_auc_equals_sklearn_with_ties(seed, levels):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, levels, (2, 5, 6), generator=g).double()
    region = torch.rand(2, 5, 6, generator=g) < 0.4
    region[:, 0, 0], region[:, 0, 1] = True, False
    got = metrics.auc(maps, region)
    for b in range(2):
        expected = sklearn.metrics.roc_auc_score(region[b].flatten().numpy(), maps[b].flatten().numpy())
        assert float(got[b]) == pytest.approx(expected, abs=1e-12)


def test_localisation_and_complexity_by_hand():
    maps = torch.tensor([[[5.0, 4.0, 0.0], [3.0, 1.0, 2.0]]])
    region = torch.tensor([[[True, False, False], [True, True, False]]])
    assert metrics.top_k_intersection(maps, region, k=2).tolist() == [0.5]  # 5 in, 4 out
    assert metrics.top_k_intersection(maps, region, k=2, concept_influence=True).tolist() == [1.0]  # * 6 / 3
    assert metrics.relevance_rank_accuracy(maps, region).tolist() == pytest.approx([2 / 3])  # top 3: 5, 4, 3
    assert metrics.auc(maps, region).tolist() == pytest.approx([6 / 9])  # pairs in > out: 5>4,2,0; 3>2,0; 1>0
    a = torch.tensor([[[1.0, 1.0, 2.0, 4.0]]])
    n, s = 4, torch.tensor([1.0, 1.0, 2.0, 4.0])
    gini = sum((2 * (i + 1) - n - 1) * v for i, v in enumerate(s)) / (n * s.sum())
    assert metrics.sparseness(a).tolist() == pytest.approx([float(gini)])
    q = s / s.sum()
    assert metrics.complexity(-a).tolist() == pytest.approx([float(-(q * q.log()).sum())])
    with pytest.raises(InputError, match=r"sample\(s\) \[0\] is empty"):
        metrics.relevance_rank_accuracy(maps, torch.zeros_like(region))
    with pytest.raises(OptionError, match="k=7"):
        metrics.top_k_intersection(maps, region, k=7)


def test_infidelity_of_a_linear_models_exact_attribution_is_zero():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
    p = camfn.params(model)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    exact = p["1.weight"][1].reshape(1, 4, 4).expand(3, 4, 4)
    for kind in ("gaussian", "patches"):
        got = metrics.infidelity(model, p, x, exact, 1, perturbation=kind, patch_sizes=(2,))
        assert float(got.abs().max()) < 1e-20
        assert bool((metrics.infidelity(model, p, x, exact.flip(-1), 1, perturbation=kind, patch_sizes=(2,)) > 0).all())


def test_sanity_check_reports_flat_maps_and_mprt_leaves_model_and_rng_alone(setup):
    model, p, x, _, _ = setup
    result = metrics.sanity_check(camfn.gradcam, model, p, x, "conv", seed=1)
    assert torch.equal(result.flat, metrics.flat_maps(result.maps))
    assert torch.allclose(result.flat_share, result.flat.double().mean(1))
    assert bool((result.correlations[result.flat] == 0).all())
    before, state = torch.random.get_rng_state(), copy.deepcopy(model.state_dict())
    out = metrics.mprt(camfn.gradcam, model, p, x, "conv", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert out.layers == ["fc", "conv"] and out.correlations.shape == (2, 3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        fresh = nn.Linear(4, 3)  # reset_parameters of fc under seed 3 = a fresh Linear's init under seed 3
    top1 = camfn.apply(model, p, x).argmax(1)
    expected = camfn.gradcam(model, {**p, "fc.weight": fresh.weight.detach(), "fc.bias": fresh.bias.detach()}, x,
                             "conv", top1)  # fmt: skip
    assert torch.allclose(out.maps[0], expected, atol=1e-6)


def test_errors_are_camfn_errors(setup):
    model, p, x, maps, _boxes = setup
    bad_calls = [
        lambda: metrics.road(model, p, x, maps, solver="lu"),
        lambda: metrics.deletion(model, p, x, maps, chunk_size=0),
        lambda: metrics.deletion(model, p, x, maps, baseline="grey"),
        lambda: metrics.pixel_flipping(model, p, x, maps, rule="other"),
        lambda: metrics.faithfulness_correlation(model, p, x, maps, subset_size=10_000),
        lambda: metrics.irof(model, p, x, maps, segments=torch.zeros(3, 16, 16)),
        lambda: metrics.max_sensitivity(camfn.gradcam, model, p, x, "conv", radius=-1.0),
        lambda: metrics.mprt(camfn.gradcam, model, p, x, "conv", order="sideways"),
        lambda: metrics.infidelity(model, p, x, maps, perturbation="salt"),
        lambda: metrics.confidence(model, p, x, softmax="no"),
        lambda: metrics.road_combined(model, p, x, maps, percentiles=(120,)),
        lambda: metrics.auc(maps, torch.ones(3, 16, 16, dtype=torch.bool)),
    ]
    for call in bad_calls:
        with warnings.catch_warnings(), pytest.raises(CamfnError):
            call()
