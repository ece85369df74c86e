"""Parity of camfn.metrics with Quantus 0.6 on a tiny random-weight one-channel CNN (float32, a few images).

One channel, because Quantus counts every channel of a pixel as a feature while camfn perturbs whole pixels;
with one channel both mean the same. Maps are continuous random values (no ties: Quantus sorts unstably).
Tolerances: 1e-5 (float32 forwards), 1e-6 for map-only metrics. Where Quantus is broken, the test pins what
works and says so: ``np.trapz`` (gone in numpy >= 2.4) is restored as ``np.trapezoid`` for its AUC paths;
random subsets and noise are recorded from Quantus's own calls and handed to camfn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camfn
from camfn import metrics

quantus = pytest.importorskip("quantus")

SIZE = 16
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, SIZE, SIZE, generator=g)
    maps = torch.rand(3, SIZE, SIZE, generator=g)
    y = camfn.apply(model, camfn.params(model), x).argmax(1)
    region = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    region[0, 2:9, 3:12] = region[1, 8:, 8:] = region[2, :5, :] = True
    return model, camfn.params(model), x, maps, y, region


def call(metric, model, x, y, a, **kwargs):
    out = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu", **kwargs)
    return torch.as_tensor(np.asarray(out, dtype=np.float64))


@pytest.fixture
def trapz(monkeypatch):
    """Quantus's AUC paths call np.trapz, removed in numpy 2.4: restore it as np.trapezoid for the test."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


# -------------------------------------------------------------------------------------------- maps only
def test_localisation_metrics_match_quantus(setup):
    model, _, x, maps, y, region = setup
    s = region[:, None].numpy().astype(np.float64)
    opts = {"abs": False, "normalise": False, "disable_warnings": True}
    for k in (1, 20, 100):
        q = call(quantus.TopKIntersection(k=k, **opts), model, x, y, maps, s_batch=s)
        assert torch.allclose(metrics.top_k_intersection(maps, region, k=k).double(), q, atol=1e-6)
    q = call(quantus.RelevanceRankAccuracy(**opts), model, x, y, maps, s_batch=s)
    assert torch.allclose(metrics.relevance_rank_accuracy(maps, region).double(), q, atol=1e-6)
    q = call(quantus.AUC(**opts), model, x, y, maps, s_batch=s)
    assert torch.allclose(metrics.auc(maps, region).double(), q, atol=1e-6)
    q = call(quantus.RelevanceMassAccuracy(**opts), model, x, y, maps, s_batch=s)
    assert torch.allclose(metrics.energy_pointing_game(maps, region).double(), q, atol=1e-6)


def test_complexity_metrics_match_quantus(setup):
    model, _, x, maps, y, _ = setup
    opts = {"abs": False, "normalise": False, "disable_warnings": True}
    sharp = maps**6  # a spread of sparseness values
    for m in (maps, sharp):
        q = call(quantus.Sparseness(**opts), model, x, y, m.double())
        assert torch.allclose(metrics.sparseness(m.double()), q, atol=1e-6)  # Quantus adds 1e-7 to every value
        q = call(quantus.Complexity(**opts), model, x, y, m.double())
        assert torch.allclose(metrics.complexity(m.double()), q, atol=1e-6)


# -------------------------------------------------------------------------------------------- model metrics
def test_pixel_flipping_quantus_rule_matches(setup, trapz):
    model, p, x, maps, y, _ = setup
    for step in (16, 64):  # Quantus refuses steps that do not divide 256 (camfn flips the rest last)
        opts = {"features_in_step": step, "perturb_baseline": "black", "normalise": False, "disable_warnings": True}
        q = call(quantus.PixelFlipping(**opts), model, x, y, maps, softmax=True)
        got = metrics.pixel_flipping(model, p, x, maps, y, rule="quantus", features_in_step=step, baseline="black")
        assert torch.allclose(got.scores.double(), q, **TOL)
        q_auc = call(quantus.PixelFlipping(return_auc_per_sample=True, **opts), model, x, y, maps, softmax=True)
        assert torch.allclose(got.auc.double(), q_auc, **TOL)


@pytest.mark.parametrize(("order", "quantus_order"), [("most", "morf"), ("least", "lerf")])
def test_region_perturbation_matches(setup, order, quantus_order):
    model, p, x, maps, y, _ = setup
    opts = {
        "patch_size": 4,
        "regions_evaluation": 10,
        "order": quantus_order,
        "perturb_baseline": 0.0,
        "normalise": False,
    }
    q = call(quantus.RegionPerturbation(disable_warnings=True, **opts), model, x, y, maps, softmax=True)
    got = metrics.region_perturbation(model, p, x, maps, y, patch_size=4, regions=10, order=order, baseline=0.0)
    assert torch.allclose(got.scores.double(), q, **TOL)
    assert torch.allclose(got.auc.double(), q.sum(1) / 11, **TOL)  # AOPC: the k = 0 term is 0


def test_monotonicity_correlation_matches(setup):
    model, p, x, maps, y, _ = setup
    opts = {
        "features_in_step": 16,
        "nr_samples": 1,
        "perturb_baseline": 0.0,
        "normalise": False,
        "disable_warnings": True,
    }
    q = call(quantus.MonotonicityCorrelation(**opts), model, x, y, maps, softmax=True)
    got = metrics.monotonicity_correlation(model, p, x, maps, y, features_in_step=16, samples=1, baseline=0.0)
    assert torch.allclose(got.double(), q, **TOL)


def test_faithfulness_correlation_matches_with_quantus_subsets(setup, monkeypatch):
    model, p, x, maps, y, _ = setup
    drawn = []
    choice = np.random.choice

    def recorded(*args, **kwargs):
        drawn.append(choice(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(np.random, "choice", recorded)
    opts = {"nr_runs": 12, "subset_size": 20, "perturb_baseline": 0.0, "normalise": False, "return_aggregate": False}
    q = call(quantus.FaithfulnessCorrelation(disable_warnings=True, **opts), model, x, y, maps, softmax=True)
    subsets = torch.as_tensor(np.stack(drawn)).reshape(12, 3, 20).transpose(0, 1)  # runs x batch -> (B, runs, k)
    got = metrics.faithfulness_correlation(model, p, x, maps, y, subsets=subsets, baseline=0.0)
    assert torch.allclose(got.double(), q, **TOL)


def test_irof_matches_with_quantus_segments(setup, trapz):
    model, p, x, maps, y, _ = setup
    from quantus.helpers.utils import get_superpixel_segments

    segments = torch.stack(
        [torch.as_tensor(get_superpixel_segments(np.moveaxis(i.numpy(), 0, -1).astype("double"), "slic")) for i in x]
    )
    opts = {"perturb_baseline": 0.0, "normalise": False, "return_aggregate": False, "disable_warnings": True}
    q = call(quantus.IROF(**opts), model, x, y, maps, softmax=True)
    got = metrics.irof(model, p, x, maps, y, segments=segments, baseline=0.0)
    assert torch.allclose(got.double(), q, **TOL)


def test_infidelity_patches_match(setup):
    model, p, x, maps, y, _ = setup
    opts = {"perturb_patch_sizes": [4, 8], "n_perturb_samples": 2, "perturb_baseline": "black", "normalise": False}
    q = call(quantus.Infidelity(disable_warnings=True, **opts), model, x, y, maps, softmax=False)
    got = metrics.infidelity(model, p, x, maps, y, perturbation="patches", patch_sizes=(4, 8), baseline="black")
    assert torch.allclose(got.double(), q, atol=1e-5, rtol=1e-4)


def explain(model, inputs, targets, relu=True, **kwargs):  # Quantus adds device= to the kwargs
    x, t = torch.as_tensor(inputs), torch.as_tensor(targets)
    return camfn.gradcam(model, camfn.params(model), x, "2", t, relu=relu).numpy()[:, None]


@pytest.mark.parametrize("which", ["max", "avg"])
def test_sensitivity_matches_with_the_same_noise(setup, which):
    model, p, x, _, y, _ = setup
    noise = torch.rand(4, *x.shape, generator=torch.Generator().manual_seed(5)) * 0.2 - 0.1
    calls = iter(noise)

    def perturb(arr, indices, **kwargs):
        return arr + next(calls).reshape(arr.shape).numpy()

    cls = {"max": quantus.MaxSensitivity, "avg": quantus.AvgSensitivity}[which]
    metric = cls(nr_samples=4, perturb_func=perturb, normalise=False, abs=False, disable_warnings=True)
    maps = camfn.gradcam(model, p, x, "2", y)
    q = call(metric, model, x, y, maps, explain_func=explain, softmax=False)
    fn = {"max": metrics.max_sensitivity, "avg": metrics.avg_sensitivity}[which]
    got = fn(camfn.gradcam, model, p, x, "2", y, perturbations=noise)
    assert torch.allclose(got.double(), q, **TOL)


def test_mprt_matches_quantus_per_layer(setup):
    model, p, x, _, y, _ = setup
    q_metric = quantus.MPRT(seed=42, layer_order="top_down", abs=False, normalise=False, disable_warnings=True)
    raw = {"relu": False}  # Quantus refuses all-zero maps, which ReLU'd maps of randomised layers can be
    scores = q_metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=None,
        explain_func=explain,
        explain_func_kwargs=dict(raw),
        device="cpu",
    )  # fmt: skip (Quantus adds device= to it)
    got = metrics.mprt(camfn.gradcam, model, p, x, "2", y, seed=43, **raw)
    layers = [k for k in scores if k != "original"]
    assert got.layers == layers == ["6", "2", "0"]
    for i, name in enumerate(layers):
        q = torch.as_tensor(np.asarray(scores[name], dtype=np.float64))
        defined = ~torch.isnan(q)  # scipy gives NaN for a flat map; camfn 0, and flags it
        assert torch.allclose(got.correlations[i].double()[defined], q[defined], atol=1e-5)
        assert torch.equal(~defined, got.flat[i])
    # Quantus's "average" includes the unrandomised model (correlation 1); camfn's mean is over the layers only
    assert all(abs(v - 1) < 1e-6 for v in scores["original"])


def test_road_imputation_matches_quantus_and_gradcam(setup):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from quantus.functions.perturb_func import noisy_linear_imputation

    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 12, 14, generator=g, dtype=torch.float64)
    mask = torch.rand(12, 14, generator=g) < 0.6
    got = metrics.impute(x[None], mask[None], noise=0.0)[0]
    q = noisy_linear_imputation(x.numpy(), np.flatnonzero(mask.numpy()), noise=0.0)
    assert torch.allclose(got, torch.as_tensor(q), atol=1e-9)
    gc = NoisyLinearImputer(noise=0.0)(x.float(), (~mask).float())
    assert torch.allclose(got.float(), gc, atol=1e-5)
    cg = metrics.impute(x[None], mask[None], noise=0.0, solver="cg", tol=1e-10)[0]
    assert torch.allclose(cg, got, atol=1e-8)
