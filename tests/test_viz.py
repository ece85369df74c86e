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
