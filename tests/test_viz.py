"""camfn.viz: colormaps (closed form and parity with matplotlib), overlays, grids, tensor and PIL inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from camfn import viz
from camfn.errors import InputError, OptionError


def test_jet_closed_form():
    t = torch.tensor([0.0, 0.125, 0.375, 0.5, 0.625, 0.875, 1.0])
    rgb = viz.colorize(t[None], "jet")[:, 0].T
    expected = [
        [0.0, 0.0, 0.5],  # dark blue
        [0.0, 0.0, 1.0],  # blue
        [0.0, 1.0, 1.0],  # cyan
        [0.5, 1.0, 0.5],
        [1.0, 1.0, 0.0],  # yellow
        [1.0, 0.0, 0.0],  # red
        [0.5, 0.0, 0.0],  # dark red
    ]
    torch.testing.assert_close(rgb, torch.tensor(expected))


@pytest.mark.parametrize("name", ["viridis", "turbo"])
def test_tables_match_matplotlib(name):
    matplotlib = pytest.importorskip("matplotlib")
    t = np.linspace(0, 1, 1001)
    ours = viz.colorize(torch.tensor(t, dtype=torch.float32)[None], name)[:, 0].T.numpy()
    theirs = matplotlib.colormaps[name](t)[:, :3]
    assert np.abs(ours - theirs).max() < 0.035  # 17 knots vs matplotlib's 256 entries
    assert np.abs(ours[[0, -1]] - theirs[[0, -1]]).max() < 2 / 255  # the ends exactly (8-bit)


def test_viridis_gets_lighter():
    rgb = viz.colorize(torch.linspace(0, 1, 64)[None], "viridis")[:, 0].T
    luma = rgb @ torch.tensor([0.299, 0.587, 0.114])
    assert bool((luma.diff() > 0).all())


def test_colorize_clips_and_keeps_leading_axes():
    maps = torch.tensor([[[-1.0, 2.0]]]).expand(2, 1, 2)
    rgb = viz.colorize(maps, "turbo")
    assert rgb.shape == (2, 3, 1, 2)
    torch.testing.assert_close(rgb[..., 0], viz.colorize(torch.zeros(2, 1, 1), "turbo")[..., 0])
    torch.testing.assert_close(rgb[..., 1], viz.colorize(torch.ones(2, 1, 1), "turbo")[..., 0])


def test_unknown_colormap_suggests_one():
    with pytest.raises(OptionError, match="did you mean 'jet'"):
        viz.colorize(torch.zeros(2, 2), "jett")


def test_as_image_accepts_pil_and_tensor_forms():
    rng = np.random.default_rng(0)
    pixels = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    from_pil = viz.as_image(Image.fromarray(pixels))
    from_uint8 = viz.as_image(torch.from_numpy(pixels).permute(2, 0, 1))
    torch.testing.assert_close(from_pil, from_uint8)
    assert from_pil.shape == (3, 5, 7)
    torch.testing.assert_close(from_pil * 255, torch.from_numpy(pixels).permute(2, 0, 1).float())
    gray = viz.as_image(Image.fromarray(pixels[..., 0]))
    assert gray.shape == (3, 5, 7)
    assert torch.equal(gray[0], gray[2])
    x = torch.rand(1, 3, 5, 7)
    assert torch.equal(viz.as_image(x), x[0])  # in [0, 1]: kept
    normalised = (x - 0.5) / 0.2
    shown = viz.as_image(normalised)
    assert float(shown.min()) == 0.0
    assert float(shown.max()) == pytest.approx(1.0)
    torch.testing.assert_close(shown, (x[0] - x.min()) / (x.max() - x.min()))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4, 4), torch.zeros(4, 5, 5), torch.zeros(5)])
def test_as_image_rejects_other_shapes(bad):
    with pytest.raises(InputError, match="expected"):
        viz.as_image(bad)


def test_blend_endpoints_and_map_resize():
    image = torch.rand(3, 8, 8)
    m = torch.rand(4, 4)
    torch.testing.assert_close(viz.blend(image, m, alpha=0.0), image)
    up = torch.nn.functional.interpolate(m[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(viz.blend(image, m, alpha=1.0), viz.colorize(up))
    with pytest.raises(OptionError, match="alpha"):
        viz.blend(image, m, alpha=1.5)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 9),
    st.integers(2, 9),
    st.floats(0, 1),
    st.sampled_from(viz.COLORMAPS),
    st.integers(0, 2**16),
)
def test_blend_is_a_convex_mix(h, w, alpha, cmap, seed):
    g = torch.Generator().manual_seed(seed)
    image, m = torch.rand(3, h, w, generator=g), torch.rand(h, w, generator=g)
    before = m.clone()
    out = viz.blend(image, m, cmap, alpha)
    color = viz.colorize(m, cmap)
    low, high = torch.minimum(image, color), torch.maximum(image, color)
    assert bool(((out >= low - 1e-6) & (out <= high + 1e-6)).all())
    assert torch.equal(m, before)  # inputs untouched


def test_overlay_size_and_colors():
    image = Image.new("RGB", (12, 6), (255, 255, 255))
    m = torch.zeros(6, 12)
    m[:, 6:] = 1
    picture = viz.overlay(image, m, "jet", alpha=0.5, scale=3)
    assert picture.size == (36, 18)
    assert picture.getpixel((0, 9)) == (128, 128, 191)  # white + dark blue
    assert picture.getpixel((35, 9)) == (191, 128, 128)  # white + dark red
    with pytest.raises(OptionError, match="scale"):
        viz.overlay(image, m, scale=0)


def test_grid_layout_titles_and_cells():
    images = [torch.ones(3, 16, 16), torch.zeros(3, 32, 16)]
    maps = {"one": [torch.ones(16, 16), torch.ones(32, 16)], "zero": torch.zeros(2, 32, 16)}
    picture = viz.grid(images, maps, cell=32, alpha=1.0, row_titles=["first", "second"], pad=4)
    # cells: 16 px scaled 2x, 32 px kept; columns image, one, zero (each as wide as the widest cell and title)
    cell_w = 32
    assert picture.width == 4 + 3 * (cell_w + 4)
    pixels = np.asarray(picture)
    assert (pixels[:12] < 128).any()  # column titles are drawn in black
    columns = [4 + j * (cell_w + 4) + cell_w // 2 for j in range(3)]
    row = pixels[pixels.shape[0] - 4 - 16, columns]  # inside the second row's cells
    assert row.tolist() == [[0, 0, 0], [128, 0, 0], [0, 0, 128]]  # image, jet(1), jet(0)


def test_grid_rejects_mismatched_maps():
    with pytest.raises(InputError, match="one per image"):
        viz.grid([torch.zeros(3, 4, 4)], {"gradcam": torch.zeros(2, 4, 4)})
    with pytest.raises(InputError, match="at least one"):
        viz.grid([], {})


def test_grid_wraps_one_image_into_lines_of_columns():
    """One image and 7 methods: 8 cells wrap 5 + 3 by default; each line has its own titles; columns= overrides."""
    maps = {f"m{k}": torch.full((1, 16, 16), k / 6) for k in range(7)}
    image = torch.ones(3, 16, 16)
    picture = viz.grid([image], maps, cell=32, alpha=1.0, pad=4)
    assert picture.width == 4 + viz.WRAP * (32 + 4)
    line = picture.height // 2 - 4 - (32 + 4)  # two lines, each (titles + pad) + (cell + pad)
    assert picture.height == 2 * (line + 4 + 32 + 4) and 8 < line < 30
    pixels = np.asarray(picture)
    first, second = line + 4 + 16, 2 * (line + 4) + 36 + 16  # middles of the two lines of cells
    centre = [4 + j * 36 + 16 for j in range(5)]
    jet = (viz.colorize(torch.tensor([[4 / 6]]))[:, 0, 0] * 255).round().tolist()
    assert pixels[first, centre[0]].tolist() == [255, 255, 255]  # the image itself opens the first line
    assert pixels[second, centre[0]].tolist() == jet  # m4 opens the second line
    assert (pixels[second, centre[3]] == 255).all()  # 3 cells on the last line: the rest stays white
    assert (pixels[line + 4 + 36 : line + 4 + 36 + line] < 128).any()  # titles above the second line
    one_row = viz.grid([image], maps, cell=32, columns=8)
    assert one_row.size == (4 + 8 * 36, line + 4 + 36)
    two_images = viz.grid([image, image], {k: v.expand(2, -1, -1) for k, v in maps.items()}, cell=32)
    assert two_images.width == 4 + 8 * 36  # several images: one line each by default (methods stay in columns)
    with pytest.raises(OptionError, match="columns"):
        viz.grid([image], maps, columns=0)


# ------------------------------------------------------------------------------ numpy, colormaps, preprocess
def test_overlay_on_numpy_is_the_blend_formula_per_pixel():
    rng = np.random.default_rng(1)
    image = (rng.random((6, 9, 3)) * 255).astype(np.uint8)
    m = rng.random((6, 9))
    alpha = 0.3
    picture = np.asarray(viz.overlay(image, m, "jet", alpha=alpha), dtype=np.float64)
    t = np.clip(m, 0, 1)[..., None]
    jet = np.clip(1.5 - np.abs(4 * t - np.array([3.0, 2.0, 1.0])), 0, 1)  # the closed form, in numpy
    expected = np.round(255 * ((1 - alpha) * image / 255 + alpha * jet))
    assert np.abs(picture - expected).max() <= 1  # float32 blend, then 8-bit rounding
    floats = np.asarray(viz.overlay(image / 255, m.astype(np.float32), "jet", alpha=np.float32(alpha)))
    assert np.abs(floats.astype(int) - picture).max() <= 1  # (H, W, 3) floats in [0, 1] as uint8 / 255


def test_numpy_gray_and_rgba_images():
    gray = np.array([[0, 255]], dtype=np.uint8)
    assert viz.as_image(gray).tolist() == [[[0.0, 1.0]]] * 3
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)  # opaque red, transparent black
    torch.testing.assert_close(viz.as_image(rgba)[:, 0], torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    sixteen = np.array([[0, 65535, 32768]], dtype=np.uint16)
    torch.testing.assert_close(viz.as_image(sixteen)[0, 0], torch.tensor([0.0, 1.0, 32768 / 65535]))


def test_a_callable_colormap_and_matplotlib_names():
    m = torch.linspace(0, 1, 11)[None]
    gray = viz.colorize(m, lambda v: np.repeat(v[..., None], 3, -1))
    torch.testing.assert_close(gray[:, 0].T, m[0][:, None].expand(11, 3))
    as_bytes = viz.colorize(m, lambda v: (np.repeat(v[..., None], 4, -1) * 255).astype(np.uint8))  # RGBA uint8
    assert (as_bytes - gray).abs().max() <= 1 / 255
    matplotlib = pytest.importorskip("matplotlib")
    expected = torch.tensor(matplotlib.colormaps["magma"](m[0].double().numpy())[:, :3], dtype=torch.float32)
    torch.testing.assert_close(viz.colorize(m, "magma")[:, 0].T, expected)
    torch.testing.assert_close(viz.colorize(m, matplotlib.colormaps["magma"])[:, 0].T, expected)
    with pytest.raises(OptionError, match="did you mean 'magma'"):
        viz.colorize(m, "magmaa")


def test_without_matplotlib_a_name_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(OptionError, match="install matplotlib"):
        viz.colorize(torch.zeros(2, 2), "magma")
    assert viz.colorize(torch.zeros(1, 1), "viridis").shape == (3, 1, 1)  # the built-in tables need nothing


@pytest.mark.parametrize("alpha", ["0.5", None, True, [0.5], float("inf")])
def test_alpha_must_be_a_number_in_the_unit_interval(alpha):
    with pytest.raises(OptionError, match=r"alpha=.*use a number between 0 \(image only\) and 1"):
        viz.overlay(torch.zeros(3, 2, 2), torch.zeros(2, 2), alpha=alpha)


def test_preprocess_normalises_and_deprocess_inverts_it():
    rng = np.random.default_rng(2)
    image = (rng.random((7, 10, 3)) * 255).astype(np.uint8)
    x = viz.preprocess(image)
    assert x.shape == (1, 3, 7, 10)
    mean, std = np.array(viz.IMAGENET_MEAN), np.array(viz.IMAGENET_STD)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (image / 255 - mean) / std, atol=1e-5)
    assert np.array_equal(viz.deprocess(x), image)  # exact round trip at the same size
    assert viz.deprocess(x[0]).dtype == np.uint8
    pil = viz.preprocess(Image.fromarray(image), size=5)  # shorter side 5: (5, 7)
    assert pil.shape == (1, 3, 5, 7)
    assert viz.preprocess(image, size=(4, 4), mean=(0.5,), std=(0.5,)).shape == (1, 3, 4, 4)
    torch.testing.assert_close(viz.preprocess(image, mean=(0.0,), std=(1.0,))[0], viz.as_image(image))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))
def test_deprocess_preprocess_round_trip(h, w, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(viz.deprocess(viz.preprocess(image)), image)
