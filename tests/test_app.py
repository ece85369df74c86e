"""``camfn app``: the plain functions behind the page (values against camfn itself), the command's exits, and
the page in a real browser (Debian's chromium driven by Playwright), which skips with the reason only where
gradio, playwright or chromium is missing.
"""

from __future__ import annotations

import html
import io
import re
import sys
from typing import Any

import numpy as np
import pytest
import torch
from browser import explained, find_chromium, serving
from conftest import GapNet
from PIL import Image

import camfn
from camfn import app, cli, shapes, viz
from camfn.errors import InputError, LayerError, OptionError, TargetError


@pytest.fixture(scope="module")
def loaded() -> cli.Model:
    return app.load("shapes")


@pytest.fixture(scope="module")
def demo(loaded: cli.Model) -> cli.Sample:
    return app.sample(loaded)


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def camfn_map(loaded: cli.Model, item: cli.Sample, method: str, layer: str, target: int) -> torch.Tensor:
    m = camfn.METHODS[method](loaded.module, camfn.params(loaded.module), item.x, layer, target)
    return m[0].detach().float()


# ---------------------------------------------------------------------------------------------- plain functions
def test_demo_sample_is_the_shipped_demo_image(demo: cli.Sample) -> None:
    x, label, _ = shapes.demo_image()
    assert torch.equal(demo.x, x)
    assert torch.allclose(demo.picture, (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1))
    assert demo.name.endswith(shapes.CLASSES[label])


def test_top_classes_are_the_softmax_top5(loaded: cli.Model, demo: cli.Sample) -> None:
    with torch.no_grad():
        probs = torch.softmax(loaded.module(demo.x)[0], 0)
    top = app.top_classes(loaded, demo)
    order = probs.argsort(descending=True)[:5].tolist()
    assert [i for i, _, _ in top] == order
    assert [name for _, name, _ in top] == [shapes.CLASSES[i] for i in order]
    assert np.allclose([p for _, _, p in top], probs[order].numpy(), atol=1e-6)


def test_layer_choices_show_each_layers_output_shape(loaded: cli.Model, demo: cli.Sample) -> None:
    choices, default = app.layer_choices(loaded, demo)
    infos = camfn.layers(loaded.module, demo.x.shape)
    assert [name for _, name in choices] == [i.name for i in infos]  # every node of this model has a shape
    for (label, _), info in zip(choices, infos, strict=True):
        assert str(info.shape) in label and info.module in label
    inside = [i.name for i in infos if i.name.startswith(shapes.LAYER + ".")]
    assert default == inside[-1]


@pytest.mark.parametrize("target", [None, 0])
def test_overlays_are_viz_overlays_of_camfns_maps(loaded: cli.Model, demo: cli.Sample, target: int | None) -> None:
    methods = ["gradcam", "layercam", "scorecam"]
    result = app.explain(loaded, demo, "features.4", methods, target, cmap="viridis", alpha=0.7)
    chosen = app.top_classes(loaded, demo)[0][0] if target is None else target
    assert [p.method for p in result.panels] == methods and not result.errors
    assert result.target.startswith(f"{shapes.CLASSES[chosen]} (class {chosen},")
    for panel in result.panels:
        expected = camfn_map(loaded, demo, panel.method, "features.4", chosen)
        assert torch.allclose(panel.map, expected, atol=1e-6, rtol=0)
        scale = round(app.DISPLAY / 64)
        assert np.array_equal(pixels(panel.overlay), pixels(viz.overlay(demo.picture, expected, "viridis", 0.7, scale)))
        assert panel.seconds >= 0
    assert not torch.allclose(result.panels[0].map, result.panels[2].map, atol=1e-3)  # two methods, two maps


def test_downloads_hold_the_maps_and_the_pictures(loaded: cli.Model, demo: cli.Sample, tmp_path) -> None:
    result = app.explain(loaded, demo, None, ["gradcam", "eigencam"])
    paths = app.write_downloads(result, tmp_path / "out")
    assert [p.name for p in paths] == [
        f"{demo.name}_{m}.{ext}" for ext in ("npy", "png") for m in ("gradcam", "eigencam")
    ]
    for panel in result.panels:
        saved = np.load(tmp_path / "out" / f"{demo.name}_{panel.method}.npy")
        assert saved.dtype == np.float32 and np.array_equal(saved, panel.map.numpy())
        with Image.open(tmp_path / "out" / f"{demo.name}_{panel.method}.png") as png:
            assert np.array_equal(pixels(png), pixels(panel.overlay))


def test_progress_is_reported_before_each_method(loaded: cli.Model, demo: cli.Sample) -> None:
    calls = []
    app.explain(loaded, demo, None, ["gradcam", "ablationcam"], progress=lambda *a: calls.append(a))
    assert calls == [(0, 2, "gradcam"), (1, 2, "ablationcam"), (2, 2, "done")]


def test_a_layer_without_spatial_output_gives_camfns_message(loaded: cli.Model, demo: cli.Sample) -> None:
    with pytest.raises(LayerError) as raised:
        camfn.gradcam(loaded.module, camfn.params(loaded.module), demo.x, "fc", 0)
    result = app.explain(loaded, demo, "fc", ["gradcam", "layercam"])
    assert result.panels == []
    assert result.errors == {"gradcam": str(raised.value), "layercam": str(raised.value)}
    page = app.status_html(result)
    assert f'<div class="camfn-error">gradcam, layercam: {html.escape(str(raised.value))}</div>' in page
    assert "Traceback" not in page


def test_bad_choices_raise_camfn_errors(loaded: cli.Model, demo: cli.Sample, tmp_path) -> None:
    with pytest.raises(OptionError, match="at least one method"):
        app.explain(loaded, demo, None, [])
    with pytest.raises(OptionError, match="unknown method"):
        app.explain(loaded, demo, None, ["gradcom"])
    with pytest.raises(TargetError, match="5 classes"):
        app.explain(loaded, demo, None, ["gradcam"], 5)
    with pytest.raises(OptionError, match="colormap"):
        app.explain(loaded, demo, None, ["gradcam"], cmap="no-such-colormap")
    with pytest.raises(TargetError, match="class index"):
        app._parse_target("triangle")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    with pytest.raises(InputError, match="cannot read image") as raised:
        app.sample(loaded, broken)
    assert app.status_html(error=app._message(raised.value)) == (
        f'<div class="camfn-error">{html.escape(str(raised.value))}</div>'
    )
    with pytest.raises(InputError, match="unknown model"):
        app.load("resnet181")


def test_unexpected_failures_show_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise ZeroDivisionError("division by zero\nsecond line")
    except ZeroDivisionError as e:
        text = app._message(e)
    assert text == "unexpected failure: ZeroDivisionError: division by zero"
    assert "Traceback" in capsys.readouterr().err  # the server log keeps it, the page does not


def test_uploaded_image_on_an_exported_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = GapNet(classes=4).eval()
    batch = {"x": {0: torch.export.Dim("batch", max=4096)}}
    torch.export.save(
        torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=batch), tmp_path / "m.pt2"
    )
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    assert app._model_spec("shapes", str(tmp_path / "m.pt2"), "w.pt") == (str(tmp_path / "m.pt2"), None)
    assert app._model_spec("resnet18", str(tmp_path / "w.pth"), None) == ("resnet18", str(tmp_path / "w.pth"))
    exported = app.load(str(tmp_path / "m.pt2"))
    item = app.sample(exported, tmp_path / "photo.png")
    assert item.name == "photo" and tuple(item.x.shape) == (1, 3, 32, 32)
    choices, default = app.layer_choices(exported, item)
    assert default == "relu_default" and "conv2d_default_1" in [name for _, name in choices]
    assert not any(name.startswith("_guards_fn") for _, name in choices)  # shape checks, not layers
    result = app.explain(exported, item, "conv2d_default_1", ["gradcam"], 1)
    expected = camfn.gradcam(model, camfn.params(model), item.x, "conv2", 1)[0]
    assert torch.allclose(result.panels[0].map, expected, atol=1e-5)
    assert result.panels[0].overlay.size == (40 * 6, 24 * 6)  # the photo's own size, upscaled for display


def test_command_exits_2_with_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["app", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert cli.main(["app", "--model", "resnet181"]) == 2
    assert "unknown model 'resnet181'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the extra were not installed
    assert cli.main(["app"]) == 2
    assert "pip install 'camfn[app]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the browser
def _browser_or_skip() -> str:
    pytest.importorskip("gradio", reason="the app needs gradio: pip install 'camfn[app]'")
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install playwright")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium found (apt-get install chromium, or set CAMFN_CHROMIUM to a chromium binary)")
    return chromium


def _fetch(page: Any, src: str) -> np.ndarray:
    reply = page.request.get(src)
    assert reply.ok, f"{src}: HTTP {reply.status}"
    return pixels(Image.open(io.BytesIO(reply.body())))


def test_page_in_a_real_browser(loaded: cli.Model, demo: cli.Sample, tmp_path) -> None:
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with serving(log=tmp_path / "server.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            explained(page, [])
            page.screenshot(path=str(tmp_path / "gradcam.png"), full_page=True)
            shown = _fetch(page, page.locator("#camfn-image img").get_attribute("src"))
            overlay = _fetch(page, page.locator("#camfn-overlays img").first.get_attribute("src"))
            expected = app.explain(loaded, demo, None, ["gradcam"]).panels[0]
            assert overlay.shape == shown.shape == pixels(expected.overlay).shape
            assert np.abs(overlay - shown).mean() > 20  # the map is drawn over the picture
            assert np.abs(overlay - pixels(expected.overlay)).max() <= 3  # camfn's overlay (another process)
            status = page.locator("#camfn-status").inner_text()
            assert f"Predicted: {app.top_classes(loaded, demo)[0][1]}" in status and "gradcam" in status

            page.get_by_label("layercam", exact=True).check()
            page.locator("#camfn-layer input").click()
            page.get_by_role("option", name=re.compile(r"^fc\b")).click()
            page.get_by_role("button", name="Explain").click()
            page.locator(".camfn-error").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "bad_layer.png"), full_page=True)
            with pytest.raises(LayerError) as raised:
                camfn.gradcam(loaded.module, camfn.params(loaded.module), demo.x, "fc", 0)
            assert page.locator(".camfn-error").first.inner_text() == f"gradcam, layercam: {raised.value}"
            assert page.locator("#camfn-overlays img").count() == 0
            assert "Traceback" not in page.content()
        finally:
            browser.close()
    print(f"screenshots: {tmp_path / 'gradcam.png'}, {tmp_path / 'bad_layer.png'}")
