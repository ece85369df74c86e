"""The ``camfn`` command line: pictures it writes, listings, and every bad-input case's exit code and message.

Most runs call :func:`camfn.cli.main` in-process on a tiny exported model (``GapNet`` saved with
``torch.export``); two true subprocess runs cover ``python -m camfn`` / the ``camfn`` script on the shipped
shapes model and demo image (``make demo``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GapNet
from PIL import Image

import camfn
from camfn import cli, shapes, viz

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (ROOT / "camfn" / "assets" / "shapes.pt").is_file()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny exported model, a TorchScript file, a state dict, an image, a non-image and a plain file."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = GapNet(classes=5).eval()
    batch = {"x": {0: torch.export.Dim("batch", max=4096)}}  # example batch 2: a batch of 1 would specialise
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=batch), root / "tiny.pt2")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), root / "static.pt2")
    with warnings.catch_warnings():  # torch.jit is deprecated: exactly why the CLI refuses it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), root / "tiny_script.pt")
    torch.save(model.state_dict(), root / "tiny_state.pt")
    torch.save({"fc.weight": torch.zeros(3, 3)}, root / "wrong_state.pt")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    (root / "broken.png").write_bytes(b"this is not a PNG")
    (root / "afile").write_text("x")
    return {p.stem if p.name != "tiny.pt2" else "pt2": p for p in root.iterdir()}


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_follows_map(png: Path, npy: Path, image: np.ndarray) -> None:
    """The overlay is the image plus the jet-coloured map (alpha 0.5), so it differs where the map is high.

    ``image`` (``(H, W, 3)`` in ``[0, 1]``) is the picture under the overlay. Checks (1) the colour left after
    removing half the image is jet(map) (to 8-bit rounding), and (2) red - blue is at least 0.45 higher where
    the map exceeds 0.8 than where it is below 0.1 (jet: R - B >= 0.5 above 0.8, <= -0.5 below 0.1, halved).
    """
    picture = Image.open(png)
    m = torch.from_numpy(np.load(npy))
    if tuple(m.shape) != (picture.height, picture.width):  # the map is at the network's input size
        size = (picture.height, picture.width)
        m = torch.nn.functional.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float64) / 255
    colour = (rgb - 0.5 * image) / 0.5
    expected = viz.colorize(m, "jet").permute(1, 2, 0).numpy()
    assert np.abs(colour - expected).max() < 4 / 255
    m = m.numpy()
    high, low = m > 0.8, m < 0.1
    assert high.any()
    assert low.any()
    shift = rgb[..., 0] - rgb[..., 2] - (image[..., 0] - image[..., 2]) / 2
    assert shift[high].mean() > shift[low].mean() + 0.45


# ------------------------------------------------------------------------------------------ pictures
def test_overlay_has_the_image_size_and_follows_the_map(files, tmp_path, capsys):
    code, out, err = run(
        [
            "explain",
            str(files["photo"]),
            "--model",
            str(files["pt2"]),
            "--out",
            str(tmp_path),
            "--npy",
            "--target",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    png, npy = tmp_path / "photo_gradcam.png", tmp_path / "photo_gradcam.npy"
    assert f"wrote {png}" in out
    assert Image.open(png).size == (40, 24)  # the image's size, not the network's 32 x 32 input
    m = np.load(npy)
    assert m.shape == (32, 32)
    assert m.min() >= 0
    assert m.max() == pytest.approx(1)
    photo = np.asarray(Image.open(files["photo"]), dtype=np.float64) / 255
    assert_follows_map(png, npy, photo)


def test_scale_alpha_and_cmap(files, tmp_path, capsys):
    base = ["explain", str(files["photo"]), "--model", str(files["pt2"]), "--out", str(tmp_path), "-q"]
    assert run([*base, "--scale", "3", "--alpha", "0", "--cmap", "viridis"], capsys) == (0, "", "")
    picture = np.asarray(Image.open(tmp_path / "photo_gradcam.png"))
    assert picture.shape == (72, 120, 3)
    photo = np.asarray(Image.open(files["photo"]).resize((120, 72), Image.BILINEAR))
    assert np.abs(picture.astype(int) - photo.astype(int)).mean() < 25  # alpha 0: the (upscaled) image itself


def test_method_all_writes_one_grid(files, tmp_path, capsys):
    code, out, err = run(
        ["explain", str(files["photo"]), str(files["photo"]), "--model", str(files["pt2"]), "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0
    code, out, err = run(
        [
            "explain",
            str(files["photo"]),
            str(files["photo"]),
            "--model",
            str(files["pt2"]),
            "--method",
            "all",
            "--out",
            str(tmp_path / "all"),
        ],
        capsys,
    )
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert written == ["methods.png"]  # one picture for every method and both images
    # cam finds the classifier (aten.linear after the pooling) in the exported graph; legrad needs attention
    assert "note: legrad skipped: legrad needs a transformer" in err and "cam skipped" not in err
    shown = [n for n, m in camfn.METHODS.items() if m.spec.requires is None]
    assert f"{len(shown)} methods x 2 image(s)" in out
    width, height = Image.open(tmp_path / "all" / "methods.png").size
    # 40 x 24 images scaled 4x to reach 128 px cells; columns: the image and every method shown; 4 px gaps
    assert width == 4 + (len(shown) + 1) * (160 + 4)
    assert height > 2 * 96


def test_layers_lists_names_and_shapes(capsys):
    code, out, _ = run(["layers", "--model", "resnet18", "--size", "64"], capsys)
    assert code == 0
    assert "layer4.1.relu_1" in out
    assert "(1, 512, 2, 2)  <- default" in out
    assert "fc" in out.split("\n")[-2]


def test_methods_lists_each_method_on_one_line(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(camfn.METHODS)
    assert "Grad-CAM (Selvaraju" in lines[0]


def test_exported_model_layers(files, capsys):
    code, out, _ = run(["layers", "--model", str(files["pt2"])], capsys)
    assert code == 0
    assert "input (1, 3, 32, 32)" in out
    assert "<- default" in out


def test_progress_bar_is_tqdm_and_optional(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    bar = cli.progress(4, enabled=True)
    assert isinstance(bar, tqdm.tqdm) and bar.total == 4
    bar.close()
    assert cli.progress(4, enabled=False) is None  # --quiet
    assert cli.progress(1, enabled=True) is None  # one map: no bar
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar, no error
    assert cli.progress(4, enabled=True) is None


def test_explain_runs_without_tqdm(monkeypatch, files, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    args = ["explain", str(files["photo"]), str(files["photo"]), "--model", str(files["pt2"]), "--out", str(tmp_path)]
    assert run(args, capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo__gradcam.png", "photo_gradcam.png"]


# ------------------------------------------------------------------------------------------ bad input
BAD = [
    (["explain", "{missing}"], "image not found"),
    (["explain", "{broken}"], "cannot read image"),
    (["explain", "{dir}"], "is a folder"),
    (["explain", "{photo}", "--model", "{pt2}", "--layer", "conv2d_defualt"], "nearest names: conv2d_default"),
    (["explain", "{photo}", "--method", "gradcamm"], "did you mean 'gradcam'"),
    (["explain", "{photo}", "--method", ","], "--method is empty"),
    (["explain", "{photo}", "--model", "resnet81"], "Nearest names: resnet18"),
    (["explain", "{photo}", "--model", "{tiny_script}"], "TorchScript model, which torch.fx cannot trace"),
    (["explain", "{photo}", "--model", "{tiny_state}"], "--weights"),
    (["explain", "{photo}", "--model", "{missing}.pt2"], "model file not found"),
    (["explain", "{photo}", "--model", "resnet18", "--weights", "{missing}"], "weights file not found"),
    (["explain", "{photo}", "--model", "resnet18", "--weights", "{broken}"], "cannot read weights"),
    (["explain", "{photo}", "--model", "resnet18", "--weights", "{wrong_state}"], "do not fit resnet18"),
    (["explain", "{photo}", "--model", "resnet18", "--weights", "{tiny_state}", "--pretrained"], "not both"),
    (["explain", "{photo}", "--model", "{pt2}", "--target", "7"], "target class 7 is out of range"),
    (["explain", "{photo}", "--model", "{pt2}", "--target", "-1"], "class indices start at 0"),
    (["explain", "{photo}", "--model", "{pt2}", "--target", "dog"], "is not a class index"),
    (["explain", "--target", "sqare"], "did you mean 'square'? Classes: circle, square, triangle, cross, ring"),
    (["explain", "{photo}", "--model", "{static}", "--method", "scorecam"], "Export with a dynamic batch"),
    (["explain", "{photo}", "--alpha", "1.5"], "argument --alpha: '1.5': use a number between 0"),
    (["explain", "{photo}", "--scale", "0"], "argument --scale: '0': use a whole number from 1"),
    (["explain", "{photo}", "--out", "{afile}"], "is a file"),
    (["explain", "{photo}", "--device", "nonsense"], "is not a device"),
    (["explain", "{photo}", "--size", "big"], "use a whole number"),
    (["explain", "{photo}", "--mean", "a,b"], "one number or three"),
    (["explain", "{photo}", "--cmap", "rainbo"], "unknown colormap 'rainbo'"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_exits_2_with_a_message(args, message, files, tmp_path, capsys):
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "nope.png"), "dir": str(tmp_path)}
    args = [a.format(**paths) for a in args]
    if "--out" not in args and args and args[0] == "explain":
        args += ["--out", str(tmp_path / "out")]
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_cuda_without_a_device_exits_2(files, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run(["explain", str(files["photo"]), "--device", "cuda"], capsys)
    assert code == 2
    assert "no CUDA device is available here; use --device cpu" in err


def test_failed_download_is_a_clear_message(monkeypatch, files, tmp_path, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    code, _, err = run(
        ["explain", str(files["photo"]), "--model", "resnet18", "--pretrained", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert "could not download the pretrained weights of resnet18" in err
    assert "--weights FILE" in err


def test_unexpected_failure_exits_1(monkeypatch, files, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_methods", lambda: {"gradcam": broken})
    args = ["explain", str(files["photo"]), "--model", str(files["pt2"]), "--out", str(tmp_path)]
    code, _, err = run(args, capsys)
    assert code == 1
    assert "unexpected failure: RuntimeError: boom" in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", *args])


def test_weights_file_sets_the_number_of_classes(files, tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    loaded = cli.load_model("resnet18", tmp_path / "r18.pt")
    assert loaded.module.fc.out_features == 3
    assert loaded.note is None
    assert zipfile.is_zipfile(files["tiny_script"])


# ------------------------------------------------------------------------------------------ subprocess
def _command() -> list[str]:
    """``python -m camfn``; with the shipped weights not there yet, an untrained stand-in model."""
    if SHIPPED:
        return [sys.executable, "-m", "camfn"]
    stand_in = (
        "import sys, camfn.shapes as s; s.load = lambda: s.net().eval(); "
        "from camfn.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", stand_in]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_demo_subprocess_writes_an_overlay_that_follows_the_map(tmp_path):
    done = subprocess.run(
        [*_command(), "explain", "--out", str(tmp_path), "--npy"], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 0, done.stderr
    (png,) = tmp_path.glob("*_gradcam.png")
    (npy,) = tmp_path.glob("*_gradcam.npy")
    assert f"wrote {png}" in done.stdout
    x, _, _ = shapes.demo_image()
    assert Image.open(png).size == (x.shape[3], x.shape[2])  # the demo image's size (64 x 64)
    picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1).permute(1, 2, 0).numpy()
    assert_follows_map(png, npy, picture)


def test_make_demo_command_writes_the_method_grid(tmp_path):
    script = shutil.which("camfn", path=str(Path(sys.executable).parent))
    command = [script] if script and SHIPPED else _command()
    done = subprocess.run(
        [*command, "explain", "--method", "all", "--out", str(tmp_path), "-q"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    (grid,) = tmp_path.glob("*_methods.png")
    shown = [n for n, m in camfn.METHODS.items() if m.spec.requires is None]  # legrad needs attention: skipped
    lines = -(-(len(shown) + 1) // viz.WRAP)  # one image: the cells wrap onto lines of viz.WRAP
    width, height = Image.open(grid).size
    assert width > 128 * viz.WRAP and height > 128 * lines  # 64 px cells upscaled to 128 px


# ------------------------------------------------------------------------------------------ image modes
def png_16bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): IHDR depth 16, colour type 2, unfiltered rows."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


RAMP16 = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)  # 0 .. 57300: mostly above 255
GRAY8 = (np.arange(12 * 16).reshape(12, 16) % 256).astype(np.uint8)
ALPHA = (np.arange(12 * 16).reshape(12, 16) * 7 % 256).astype(np.uint8)
PALETTE = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30], [200, 200, 0]], dtype=np.uint8)
INDICES = (np.arange(12 * 16).reshape(12, 16) % 4).astype(np.uint8)
RGB = (np.random.default_rng(3).random((12, 16, 3)) * 255).astype(np.uint8)


def _palette_image(transparent: int | None) -> Image.Image:
    image = Image.fromarray(INDICES, mode="L").convert("P")
    image.putpalette(PALETTE.reshape(-1).tolist() + [0] * (768 - PALETTE.size))
    image.putdata(INDICES.reshape(-1).tolist())
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def _gray(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255
    return rgb / 255 * a + (1 - a)


IMAGE_MODES = {
    # mode: (writer(path), expected (H, W, 3) floats in [0, 1])
    "16-bit gray": (lambda p: Image.fromarray(RAMP16).save(p), _gray(RAMP16 / 65535)),
    "16-bit RGB": (lambda p: png_16bit_rgb(p, np.stack([RAMP16, RAMP16 // 2, 65535 - RAMP16], -1)), None),
    "8-bit gray": (lambda p: Image.fromarray(GRAY8).save(p), _gray(GRAY8 / 255)),
    "1-bit": (lambda p: Image.fromarray(GRAY8 > 100).save(p), _gray((GRAY8 > 100).astype(float))),
    "palette": (lambda p: _palette_image(None).save(p), PALETTE[INDICES] / 255),
    "palette with a transparent index": (
        lambda p: _palette_image(1).save(p, transparency=1),
        np.where((INDICES == 1)[..., None], 1.0, PALETTE[INDICES] / 255),
    ),
    "gray with alpha": (
        lambda p: Image.fromarray(np.stack([GRAY8, ALPHA], -1), mode="LA").save(p),
        _over_white(_gray(GRAY8).astype(float), ALPHA),
    ),
    "RGBA": (
        lambda p: Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), mode="RGBA").save(p),
        _over_white(RGB.astype(float), ALPHA),
    ),
}


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_image_modes_are_read_at_their_depth(mode, tmp_path):
    write, expected = IMAGE_MODES[mode]
    path = tmp_path / "image.png"
    write(path)
    got = cli.load_image(path).permute(1, 2, 0).double().numpy()
    if mode == "16-bit RGB":  # Pillow keeps the high byte of each 16-bit sample: within one 8-bit step
        expected = np.stack([RAMP16, RAMP16 // 2, 65535 - RAMP16], -1) / 65535
        assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    else:
        np.testing.assert_allclose(got, expected, atol=1e-6)  # float32 rounding only
    assert got.min() < 0.5  # not the all-white picture convert("RGB") gave 16-bit images


def test_explain_draws_a_16_bit_png_as_it_is(files, tmp_path, capsys):
    path = tmp_path / "deep.png"
    Image.fromarray(RAMP16).save(path)
    args = ["explain", str(path), "--model", str(files["pt2"]), "--out", str(tmp_path / "out"), "--npy"]
    assert run([*args, "--alpha", "0"], capsys)[0] == 0
    drawn = np.asarray(Image.open(tmp_path / "out" / "deep_gradcam.png"), dtype=np.float64)
    np.testing.assert_allclose(drawn, _gray(RAMP16 / 65535 * 255), atol=0.5)  # alpha 0: the image, 8-bit rounded
    assert run([*args, "--alpha", "0.5"], capsys)[0] == 0
    drawn = np.asarray(Image.open(tmp_path / "out" / "deep_gradcam.png"), dtype=np.float64) / 255
    m = torch.from_numpy(np.load(tmp_path / "out" / "deep_gradcam.npy"))
    m = torch.nn.functional.interpolate(m[None, None], size=(12, 16), mode="bilinear", align_corners=False)[0, 0]
    expected = 0.5 * _gray(RAMP16 / 65535) + 0.5 * viz.colorize(m, "jet").permute(1, 2, 0).numpy()
    assert np.abs(drawn - expected).max() < 1 / 255  # the blend formula on the 16-bit image, 8-bit rounded


def test_outputs_replace_a_symlink_instead_of_following_it(files, tmp_path, capsys):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("photo_gradcam.png", "photo_gradcam.npy"):
        (out / name).symlink_to(victim)
    args = ["explain", str(files["photo"]), "--model", str(files["pt2"]), "--out", str(out), "--npy", "-q"]
    assert run(args, capsys)[0] == 0
    assert victim.read_bytes() == b"keep me"
    assert not (out / "photo_gradcam.png").is_symlink() and Image.open(out / "photo_gradcam.png").size == (40, 24)
    assert np.load(out / "photo_gradcam.npy").shape == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == ["photo_gradcam.npy", "photo_gradcam.png"]  # no temp files left


def test_load_model_lives_in_zoo(files):
    from camfn import zoo

    assert cli.load_model is zoo.load_model and cli.Model is zoo.Model
    loaded = zoo.load_model(str(files["pt2"]))
    assert loaded.size == (32, 32) and loaded.hooks == "ignore"
