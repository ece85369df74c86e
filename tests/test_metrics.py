"""Value tests for camfn.metrics on inputs whose answers are known by hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import scipy.stats
import torch
from conftest import GapNet, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import camfn
from camfn import metrics
from camfn.errors import InputError, OptionError, TargetError
from camfn.noise import gaussian

EPS = 1e-12


class RegionMean(nn.Module):
    """Two classes with softmax ``[1 - m, m]``, ``m`` the mean of ``x`` over a fixed pixel region (all channels)."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.double())
        self.count = float(region.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x * self.region).sum((1, 2, 3)) / (self.count * x.shape[1])
        m = m.clamp(EPS, 1 - EPS)
        return torch.stack([torch.log(1 - m), torch.log(m)], 1)


def top_row(size: int = 4) -> torch.Tensor:
    region = torch.zeros(size, size)
    region[0] = 1
    return region


@pytest.fixture(scope="module")
def region_model() -> RegionMean:
    return RegionMean(top_row()).eval()


@pytest.fixture(scope="module")
def flat_image() -> torch.Tensor:
    return torch.full((1, 1, 4, 4), 0.8, dtype=torch.float64)


def region_first(size: int = 4) -> torch.Tensor:
    """A map ranking the top row (the model's region) first, the rest after it."""
    return (top_row(size) + torch.linspace(0, 0.5, size * size).reshape(size, size)).double()[None]


# ------------------------------------------------------------------------------------ confidence
def test_confidence_is_the_softmax_probability_of_the_class(region_model, flat_image):
    p = camfn.params(region_model)
    x = torch.cat([flat_image, flat_image * 0.25])  # m = 0.8 and 0.2
    assert torch.allclose(metrics.confidence(region_model, p, x), torch.tensor([0.8, 0.8], dtype=torch.float64))
    assert torch.allclose(metrics.confidence(region_model, p, x, 1), torch.tensor([0.8, 0.2], dtype=torch.float64))
    got = metrics.confidence(region_model, p, x, torch.tensor([0, 1]))
    assert torch.allclose(got, torch.tensor([0.2, 0.2], dtype=torch.float64))


def test_average_drop_and_increase_by_hand(region_model, flat_image):
    p = camfn.params(region_model)
    half = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    # class 1: Y = 0.8, O = 0.4 -> drop 0.5, no increase
    assert torch.allclose(metrics.average_drop(region_model, p, flat_image, half), torch.tensor([0.5]).double())
    assert metrics.increase_in_confidence(region_model, p, flat_image, half).tolist() == [0.0]
    # class 0: Y = 0.2, O = 0.6 -> drop 0, increase 1
    assert metrics.average_drop(region_model, p, flat_image, half, 0).tolist() == [0.0]
    assert metrics.increase_in_confidence(region_model, p, flat_image, half, 0).tolist() == [1.0]
    # a map of ones changes nothing: O == Y is no increase
    ones = torch.ones(1, 4, 4, dtype=torch.float64)
    assert metrics.average_drop(region_model, p, flat_image, ones).tolist() == [0.0]
    assert metrics.increase_in_confidence(region_model, p, flat_image, ones).tolist() == [0.0]


# ----------------------------------------------------------------------------- deletion/insertion
def test_deletion_curve_and_auc_by_hand(region_model, flat_image):
    p = camfn.params(region_model)
    best = region_first()
    worst = 1 - best
    maps = torch.cat([best, worst])
    curve = metrics.deletion(region_model, p, flat_image.expand(2, -1, -1, -1), maps, 1, steps=8)
    assert torch.allclose(curve.fractions, torch.arange(9).double() / 8)
    # 2 pixels per step; the region (4 px) goes first for `best`, last for `worst`
    expected = torch.tensor(
        [[0.8, 0.4, 0, 0, 0, 0, 0, 0, 0], [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.4, 0]], dtype=torch.float64
    )
    assert torch.allclose(curve.scores, expected, atol=1e-9)
    assert torch.allclose(curve.auc, torch.tensor([0.1, 0.7], dtype=torch.float64), atol=1e-9)


def test_deletion_baseline_tensor_and_chunking(region_model, flat_image):
    p = camfn.params(region_model)
    one = metrics.deletion(region_model, p, flat_image, region_first(), steps=8, baseline=torch.tensor(0.2))
    assert torch.allclose(one.scores[0, 2:], torch.tensor(0.2, dtype=torch.float64))
    model = randomize_bn(GapNet()).eval()
    q, x = camfn.params(model), torch.rand(3, 3, 12, 12)
    maps = torch.rand(3, 12, 12)
    whole = metrics.deletion(model, q, x, maps, steps=6, chunk_size=None)
    small = metrics.deletion(model, q, x, maps, steps=6, chunk_size=4)
    assert torch.allclose(whole.scores, small.scores, atol=1e-6)
    assert torch.allclose(whole.scores[:, 0], metrics.confidence(model, q, x), atol=1e-6)


def test_insertion_curve_by_hand(region_model, flat_image):
    p = camfn.params(region_model)
    curve = metrics.insertion(region_model, p, flat_image, region_first(), 1, steps=8, blur=torch.zeros(()))
    expected = torch.tensor([[0.0, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]], dtype=torch.float64)
    assert torch.allclose(curve.scores, expected, atol=1e-9)
    assert torch.allclose(curve.auc, torch.tensor([0.7], dtype=torch.float64), atol=1e-9)
    # a constant image is its own blur: a flat curve
    flat = metrics.insertion(region_model, p, flat_image, region_first(), steps=4, blur=2.0)
    assert torch.allclose(flat.scores, torch.tensor(0.8, dtype=torch.float64))


def test_blur_of_a_delta_is_the_normalised_gaussian():
    delta = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    delta[..., 7, 7] = 1
    out = metrics.blurred(delta, 1.0)
    k = torch.exp(-(torch.arange(-3, 4, dtype=torch.float64) ** 2) / 2)
    k = k / k.sum()
    assert torch.allclose(out[0, 0, 4:11, 4:11], k[:, None] * k[None, :])
    assert float(out.sum()) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- ROAD
def test_impute_reproduces_a_linear_ramp_exactly():
    rows, cols = torch.meshgrid(torch.arange(24.0).double(), torch.arange(20.0).double(), indexing="ij")  # coarse start
    ramp = torch.stack([0.3 * rows - 0.2 * cols + 1, 0.1 * cols, -rows + 0.5]).double()[None]
    mask = torch.zeros(1, 24, 20, dtype=torch.bool)
    mask[0, 1:23, 1:19] = torch.rand(22, 18, generator=torch.Generator().manual_seed(0)) < 0.7
    mask[0, 2:20, 2:16] = True  # a block of unknowns with no known neighbour of its own
    out = metrics.impute(ramp, mask, noise=0.0, tol=1e-12)
    assert torch.allclose(out, ramp, atol=1e-9)


def test_imputed_pixels_are_the_weighted_mean_of_their_neighbours():
    x = torch.rand(1, 2, 17, 19, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.rand(1, 17, 19, generator=torch.Generator().manual_seed(2)) < 0.6  # touches the border too
    out = metrics.impute(x, mask, noise=0.0, tol=1e-12)
    assert torch.equal(out[:, :, ~mask[0]], x[:, :, ~mask[0]])
    for r, c in mask[0].nonzero().tolist():
        total, weight = torch.zeros(2, dtype=torch.float64), 0.0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr or dc) and 0 <= r + dr < 17 and 0 <= c + dc < 19:
                    w = 1 / 12 if dr and dc else 1 / 6
                    total += w * out[0, :, r + dr, c + dc]
                    weight += w
        assert torch.allclose(out[0, :, r, c], total / weight, atol=1e-9)


def test_impute_noise_is_seeded_and_only_on_removed_pixels():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(4)) < 0.5
    clean = metrics.impute(x, mask, noise=0.0)
    noisy = metrics.impute(x, mask, noise=0.1, seed=5)
    assert torch.equal(noisy, metrics.impute(x, mask, noise=0.1, seed=5))
    assert torch.equal(noisy, metrics.impute(x, mask, noise=0.1, seed=torch.Generator().manual_seed(5)))
    assert not torch.allclose(noisy, metrics.impute(x, mask, noise=0.1, seed=6))
    eps = gaussian((3, 6, 6), std=0.1, seed=5, dtype=torch.float64)
    assert torch.allclose(noisy - clean, mask.unsqueeze(1) * eps, atol=1e-9)
    everything = metrics.impute(x, torch.ones(2, 6, 6, dtype=torch.bool), noise=0.0)
    assert torch.equal(everything, torch.zeros_like(x))  # nothing to interpolate from


def test_removed_takes_the_fraction_of_pixels():
    maps = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0))
    for f in (0.0, 0.126, 0.5, 1.0):  # 12.6 pixels round to 13
        most, least = metrics.removed(maps, f, "most"), metrics.removed(maps, f, "least")
        assert most.sum((1, 2)).tolist() == [round(f * 100)] * 3 == least.sum((1, 2)).tolist()
        if 0 < f < 1:
            for b in range(3):
                assert maps[b][most[b]].min() > maps[b][~most[b]].max()
                assert maps[b][least[b]].max() < maps[b][~least[b]].min()


def test_road_curve_by_hand():
    region = torch.zeros(8, 8)
    region[3, 4] = 1
    model = RegionMean(region).eval()
    x = (region * 0.5).double()[None, None]  # m = 0.5; imputing the pixel from zero neighbours gives m = 0
    maps = (region + 0.01 * torch.rand(8, 8, generator=torch.Generator().manual_seed(0))).double()[None]
    most = metrics.road(model, camfn.params(model), x, maps, 1, fractions=(0.0, 1 / 64, 0.5), noise=0.0)
    assert torch.allclose(most.scores, torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(most.auc, torch.tensor([0.25 / 64 / 0.5], dtype=torch.float64), atol=1e-9)
    least = metrics.road(model, camfn.params(model), x, maps, 1, fractions=(0.5, 63 / 64, 1.0), order="least", noise=0)
    assert torch.allclose(least.scores, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(least.fractions, torch.tensor([0.5, 63 / 64, 1.0], dtype=torch.float64))


def test_road_is_seeded_and_chunking_does_not_matter():
    model = randomize_bn(GapNet()).eval()
    p, x = camfn.params(model), torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(1))
    x0, maps0 = x.clone(), maps.clone()
    a = metrics.road(model, p, x, maps, fractions=(0.2, 0.6), seed=3, noise=0.2, chunk_size=None)
    b = metrics.road(model, p, x, maps, fractions=(0.2, 0.6), seed=3, noise=0.2, chunk_size=1)
    c = metrics.road(model, p, x, maps, fractions=(0.2, 0.6), seed=4, noise=0.2)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert not torch.allclose(a.scores, c.scores)
    assert torch.equal(x, x0) and torch.equal(maps, maps0)


# ----------------------------------------------------------------------------------- pointing game
def delta(r: int, c: int, size: int = 64) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, r, c] = 1
    return m


@pytest.mark.parametrize(
    ("r", "c", "tolerance", "hit"),
    [
        (25, 29, 0, True),  # last column inside [20, 30)
        (25, 30, 0, False),  # x1 is exclusive
        (25, 20, 0, True),
        (25, 19, 0, False),
        (19, 25, 0, False),
        (25, 44, 15, True),  # c < x1 + 15 = 45
        (25, 45, 15, False),
        (25, 5, 15, True),  # c >= x0 - 15 = 5
        (25, 4, 15, False),
        (44, 5, 15, True),
        (45, 25, 15, False),
    ],
)
def test_pointing_game_delta_map(r, c, tolerance, hit):
    box = torch.tensor([[20, 20, 30, 30]])
    assert metrics.pointing_game(delta(r, c), box, tolerance=tolerance).tolist() == [hit]


def test_pointing_game_batched_several_boxes_and_first_maximum():
    maps = torch.cat([delta(5, 5), delta(50, 50)])
    boxes = torch.tensor([[[0, 0, 10, 10], [40, 40, 45, 45]], [[0, 0, 10, 10], [40, 40, 51, 51]]])
    assert metrics.pointing_game(maps, boxes, tolerance=0).tolist() == [True, True]
    tie = delta(5, 5) + delta(50, 50)  # first maximum in raster order: (5, 5)
    assert metrics.pointing_game(tie, torch.tensor([[0, 0, 10, 10]]), 0).tolist() == [True]


def test_energy_pointing_game_mass_split():
    maps = torch.zeros(3, 8, 8, dtype=torch.float64)
    maps[0, 1, 1], maps[0, 6, 6] = 3.0, 1.0  # 3 of 4 inside
    maps[1] = 1.0  # uniform: 4 of 64 pixels inside
    boxes = torch.tensor([[0, 0, 2, 2]] * 3)
    got = metrics.energy_pointing_game(maps, boxes)
    assert torch.allclose(got, torch.tensor([0.75, 4 / 64, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------------------- rank correlation
def test_rank_correlation_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    b = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]], dtype=torch.float64)
    assert metrics.rank_correlation(a, b).tolist() == pytest.approx([0.8])  # 1 - 6 * 2 / (4 * 15)
    ties = torch.tensor([[[1.0, 1.0], [2.0, 3.0]]], dtype=torch.float64)
    assert metrics.rank_correlation(ties, a).tolist() == pytest.approx([4.5 / (4.5 * 5) ** 0.5])
    assert metrics.rank_correlation(torch.zeros(1, 2, 2), a.float()).tolist() == [0.0]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 5),
    st.integers(2, 5),
    st.integers(0, 2**31 - 1),
    st.integers(2, 6),
)
def test_rank_correlation_matches_scipy(batch, h, w, seed, levels):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, levels, (batch, h, w), generator=g).double()  # few levels: many ties
    b = torch.randint(0, levels, (batch, h, w), generator=g).double() + 0.5 * a
    got = metrics.rank_correlation(a, b)
    for i in range(batch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on a constant input
            expected = scipy.stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        if expected == expected:  # scipy gives NaN for a constant input, camfn 0
            assert float(got[i]) == pytest.approx(expected, abs=1e-10)
        else:
            assert float(got[i]) == 0.0


# ------------------------------------------------------------------------------------ sanity check
@pytest.fixture(scope="module")
def sanity_setup():
    torch.manual_seed(0)
    model = randomize_bn(GapNet()).eval()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    return model, x


def test_randomized_cascades_from_the_top(sanity_setup):
    model, _ = sanity_setup
    p = camfn.params(model)
    stacked, names = metrics.randomized(model, p, seed=1)
    assert names == ["fc", "conv2", "bn", "conv1"]
    owners = {"fc": ["fc.weight", "fc.bias"], "conv2": ["conv2.weight", "conv2.bias"]}
    owners |= {"bn": ["bn.weight", "bn.bias"], "conv1": ["conv1.weight", "conv1.bias"]}
    for i in range(4):
        for j, name in enumerate(names):
            for key in owners[name]:
                assert torch.equal(stacked[key][i], p[key]) == (j > i), (i, key)
    for key in ("bn.running_mean", "bn.running_var"):
        assert all(torch.equal(stacked[key][i], p[key]) for i in range(4))
    assert torch.equal(stacked["fc.weight"][0], stacked["fc.weight"][3])  # the same draw in every set
    again, _ = metrics.randomized(model, p, seed=1)
    assert all(torch.equal(stacked[k], again[k]) for k in stacked)
    assert metrics.randomized(model, p, seed=1, depth=2)[1] == ["fc", "conv2"]


def test_sanity_check_vmap_equals_loop_and_model_unchanged(sanity_setup):
    model, x = sanity_setup
    before = copy.deepcopy(model.state_dict())
    p = camfn.params(model)
    result = metrics.sanity_check(camfn.gradcam, model, p, x, "conv2", seed=2)
    assert result.layers == ["fc", "conv2", "bn", "conv1"]
    assert result.correlations.shape == (4, 2)
    top1 = camfn.apply(model, p, x).argmax(1)  # target=None: the trained model's class for every set
    trained = camfn.gradcam(model, p, x, "conv2", top1)
    stacked, _ = metrics.randomized(model, p, seed=2)
    for i in range(4):
        maps = camfn.gradcam(model, {k: v[i] for k, v in stacked.items()}, x, "conv2", top1)
        assert torch.allclose(result.maps[i], maps, atol=1e-5)
        assert torch.allclose(result.correlations[i], metrics.rank_correlation(trained, maps), atol=1e-4)
    assert torch.allclose(metrics.rank_correlation(trained, trained), torch.ones(2))
    chunked = metrics.sanity_check(camfn.gradcam, model, p, x, "conv2", seed=2, chunk_size=3)
    assert torch.allclose(chunked.correlations, result.correlations, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not model._forward_hooks and not model.conv2._forward_hooks


# ------------------------------------------------------------------------------------------- errors
def test_errors(region_model, flat_image):
    p = camfn.params(region_model)
    good = torch.ones(1, 4, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="squeeze"):
        metrics.deletion(region_model, p, flat_image, good[:, None])
    with pytest.raises(InputError, match=r"\(1, 4, 4\)"):
        metrics.average_drop(region_model, p, flat_image, torch.ones(1, 2, 2))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metrics.average_drop(region_model, p, flat_image, good * 2)
    with pytest.raises(InputError, match="boxes"):
        metrics.pointing_game(good, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(InputError, match="boxes"):
        metrics.energy_pointing_game(good, torch.tensor([[0, 0, 2]]))
    with pytest.raises(InputError, match="x0 <= x1"):
        metrics.pointing_game(good, torch.tensor([[3, 0, 2, 2]]))
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        metrics.road(region_model, p, flat_image, good, fractions=(0.5, 1.5))
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        metrics.removed(good, -0.1)
    with pytest.raises(OptionError, match="order"):
        metrics.road(region_model, p, flat_image, good, order="most-first")
    with pytest.raises(OptionError, match="steps"):
        metrics.deletion(region_model, p, flat_image, good, steps=0)
    with pytest.raises(TargetError, match=r"target\[:, t\]"):
        metrics.confidence(region_model, p, flat_image, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TargetError, match="out of range"):
        metrics.confidence(region_model, p, flat_image, 2)
    # a callable target scores the raw output: here the log-probability of class 0
    got = metrics.confidence(region_model, p, flat_image, lambda out: out[:, 0])
    assert torch.allclose(got, torch.tensor([0.2], dtype=torch.float64).log())
