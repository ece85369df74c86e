"""Hostile files and flags: untrusted ``.pt2`` archives, weights, damaged ``camfn eval`` folders, images, CLI flags
and ``camfn.viz`` arguments.

Every case asserts the exact outcome: the error class and a message naming the problem and the fix, exit code 2
with such a message (and no map computed), or, for damaged files camfn wrote itself, the warning and a correct
recovery. Every case also asserts that nothing outside the tool's own output folder changed: the shared sandbox
(model, image, a victim file symlinks point at) and the case's own input files are byte-identical afterwards,
and no pickle planted in a file ever ran (its marker file is never created).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import pathlib
import pickle
import re
import shutil
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GapNet
from PIL import Image

from camfn import cli, viz, zoo
from camfn.errors import CamfnError, InputError, OptionError, TargetError, UnsafeFileError
from camfn.evaluation import evaluate
from camfn.images import load_image


class Touch:
    """Unpickling this runs ``pathlib.Path(marker).touch()``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def torch_saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclasses.dataclass
class Sandbox:
    root: Path
    pt2: bytes  # a clean torch.export.save archive of GapNet (dynamic batch)
    prefix: str  # the archive's top folder
    marker: Path  # planted pickles create this file when they run
    victim: Path  # symlinks in output folders point here
    ref: Path  # a finished `evaluate` run (copied per case)
    report: dict
    data: list


def snapshot(*roots: Path) -> dict[str, Any]:
    """Every path under ``roots``: its kind and its bytes (or link target)."""
    state = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                state[str(p)] = ("link", str(p.readlink()))
            elif p.is_file():
                state[str(p)] = ("file", p.read_bytes())
            else:
                state[str(p)] = ("dir",)
    return state


N, SHARD = 10, 4
EVAL = {"shard_size": SHARD, "batch_size": 4, "metrics": ("confidence", "average_drop")}


def tiny_data(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 16, 16, generator=g), i % 5) for i in range(N)]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return GapNet(classes=5).eval()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    root = tmp_path_factory.mktemp("sandbox")
    model = tiny_model()
    batch = {"x": {0: torch.export.Dim("batch", max=4096)}}
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=batch), buffer)
    (root / "tiny.pt2").write_bytes(buffer.getvalue())
    Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    (root / "victim.txt").write_text("keep me\n")
    (root / "markers").mkdir()
    prefix = zipfile.ZipFile(buffer).namelist()[0].split("/")[0] + "/"
    ref = tmp_path_factory.mktemp("ref") / "eval"
    data = tiny_data()
    report = evaluate("gradcam", model, data, "conv2", out_dir=ref, **EVAL)
    return Sandbox(root, buffer.getvalue(), prefix, root / "markers" / "ran", root / "victim.txt", ref, report, data)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def check_unchanged(sandbox: Sandbox, inputs: Path, act: Callable[[], Any]) -> Any:
    before = snapshot(sandbox.root, inputs)
    result = act()
    assert snapshot(sandbox.root, inputs) == before, "something outside the output folder changed"
    assert not sandbox.marker.exists(), "a pickle from a file ran"
    return result


# ============================================================================================ .pt2 archives
def rebuild(data: bytes, replace: dict[str, bytes | None]) -> bytes:
    """The archive ``data`` with entries replaced (``None``: removed) or added."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if info.filename not in replace:
                z.writestr(info, src.read(info.filename))
        for name, payload in replace.items():
            if payload is not None:
                z.writestr(name, payload)
    return out.getvalue()


def planted(entry: str, payload: Callable[[Sandbox], bytes]) -> Callable[[Sandbox], bytes]:
    """A builder of the clean archive with ``entry`` (under its top folder) set to ``payload(sandbox)``."""
    return lambda sb: rebuild(sb.pt2, {sb.prefix + entry: payload(sb)})


def duplicated(data: bytes, name: str, payload: bytes) -> bytes:
    """The archive with a second entry called ``name`` (zip readers disagree on which one counts)."""
    out = io.BytesIO(data)
    with warnings.catch_warnings(), zipfile.ZipFile(out, "a") as z:
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        z.writestr(name, payload)
    return out.getvalue()


def edit_program(sb: Sandbox, edit: Callable[[dict], None]) -> bytes:
    name = sb.prefix + "models/model.json"
    program = json.loads(zipfile.ZipFile(io.BytesIO(sb.pt2)).read(name))
    edit(program)
    return rebuild(sb.pt2, {name: json.dumps(program).encode()})


def pickled_weight(sb: Sandbox) -> bytes:
    name = sb.prefix + "data/weights/model_weights_config.json"
    config = json.loads(zipfile.ZipFile(io.BytesIO(sb.pt2)).read(name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return rebuild(
        sb.pt2,
        {
            name: json.dumps(config).encode(),
            sb.prefix + "data/weights/" + first["path_name"]: torch_saved(Touch(sb.marker)),
        },
    )


def shape_expression(sb: Sandbox, text: str) -> bytes:
    """The clean archive with a symbolic int whose expression (``sympy.sympify``'d by torch) is ``text``."""
    symbol = {"as_expr": {"expr_str": text, "hint": None}}
    return edit_program(sb, lambda p: p["graph_module"]["graph"]["sym_int_values"].update(s0=symbol))


def first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.ReLU()), buffer)
    return buffer.getvalue()


ARCHIVES: dict[str, tuple[Callable[[Sandbox], bytes], type[Exception], str]] = {
    "legacy weights pickle": (
        planted("data/weights/model.pt", lambda sb: torch_saved(Touch(sb.marker))),
        UnsafeFileError,
        r"entry '.*data/weights/model\.pt'.*asks for the Python object",
    ),
    "legacy constants pickle": (
        planted("data/constants/model.pt", lambda sb: torch_saved(Touch(sb.marker))),
        UnsafeFileError,
        r"data/constants/model\.pt",
    ),
    "raw pickle as legacy weights": (
        planted("data/weights/model.pt", lambda sb: pickle.dumps(Touch(sb.marker))),
        UnsafeFileError,
        r"does not load with torch\.load\(weights_only=True\)",
    ),
    "weight marked use_pickle": (pickled_weight, UnsafeFileError, r"data/weights/weight_"),
    "opaque constant": (
        planted("data/constants/opaque_obj_0", lambda sb: pickle.dumps(Touch(sb.marker))),
        UnsafeFileError,
        "holds a Python object or compiled code",
    ),
    "custom object constant": (
        planted("data/constants/custom_obj_0", lambda sb: b"\x80\x04N."),
        UnsafeFileError,
        "holds a Python object or compiled code",
    ),
    "sample inputs pickle": (
        planted("data/sample_inputs/model.pt", lambda sb: torch_saved(Touch(sb.marker))),
        UnsafeFileError,
        r"data/sample_inputs/model\.pt",
    ),
    "unknown pickle entry": (
        planted("data/extra.bin", lambda sb: pickle.dumps(Touch(sb.marker))),
        UnsafeFileError,
        r"data/extra\.bin",
    ),
    "TorchScript entry": (
        planted("data/weights/model.pt", lambda sb: torchscript_bytes()),
        UnsafeFileError,
        "TorchScript archive",
    ),
    "AOTInductor library": (
        planted("data/aotinductor/model/model.so", lambda sb: b"\x7fELF"),
        UnsafeFileError,
        "compiled code",
    ),
    "guards_code": (
        lambda sb: edit_program(sb, lambda p: p.update(guards_code=[f"__import__('os').remove('{sb.victim}')"])),
        UnsafeFileError,
        "guards_code .* is not a shape guard",
    ),
    "sympy expression": (
        lambda sb: shape_expression(sb, "__import__('os').getcwd()"),
        UnsafeFileError,
        "shape expression .* holds '__import__'",
    ),
    "sympy expression building a string": (
        lambda sb: shape_expression(sb, "open(chr(47)+chr(116))"),
        UnsafeFileError,
        "holds 'open'",
    ),
    "node calls torch.os.system": (
        lambda sb: edit_program(sb, lambda p: first_node(p).update(target="torch.os.system")),
        UnsafeFileError,
        "calls 'torch.os.system', which is not a torch.ops operator",
    ),
    "node calls builtins.exec": (
        lambda sb: edit_program(sb, lambda p: first_node(p).update(target="builtins.exec")),
        UnsafeFileError,
        "calls 'builtins.exec'",
    ),
    "node calls torch.hub.load": (
        lambda sb: edit_program(sb, lambda p: first_node(p).update(target="torch.hub.load")),
        UnsafeFileError,
        "calls 'torch.hub.load'",
    ),
    "node calls torch.ops.load_library": (
        lambda sb: edit_program(sb, lambda p: first_node(p).update(target="torch.ops.load_library.__call__")),
        UnsafeFileError,
        "calls 'torch.ops.load_library.__call__'",
    ),
    "node calls a dunder of an operator": (
        lambda sb: edit_program(sb, lambda p: first_node(p).update(target="torch.ops.aten.__class__.__init__")),
        UnsafeFileError,
        "which is not a torch.ops operator",
    ),
    "range constraint expression": (
        lambda sb: edit_program(
            sb, lambda p: p["range_constraints"].update({"__import__('os')": {"min_val": 0, "max_val": 1}})
        ),
        UnsafeFileError,
        "range constraint .* is not a symbol name",
    ),
    "program is not JSON": (
        planted("models/model.json", lambda sb: b'{"graph_module": '),
        UnsafeFileError,
        "is not valid JSON",
    ),
    "duplicate entry names": (
        lambda sb: duplicated(sb.pt2, sb.prefix + "models/model.json", b'{"guards_code": ["evil"]}'),
        UnsafeFileError,
        "two entries of one name",
    ),
    "not a zip file": (lambda sb: b"hello, not an archive", InputError, "not a torch.export archive"),
    "truncated archive": (lambda sb: sb.pt2[: len(sb.pt2) // 2], InputError, "not a torch.export archive"),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_hostile_pt2_is_refused_before_torch_reads_it(case, sandbox, inputs):
    build, error, match = ARCHIVES[case]
    path = inputs / "evil.pt2"
    path.write_bytes(build(sandbox))

    def act() -> None:
        with pytest.raises(error, match=match) as caught:
            zoo.load_model(str(path))
        assert type(caught.value) is error
        assert str(path) in str(caught.value)
        assert "re-export" in str(caught.value) or "torch.export.save" in str(caught.value)

    check_unchanged(sandbox, inputs, act)


def test_the_threats_are_real_under_plain_torch_export_load(sandbox, tmp_path):
    """Without camfn's inspection, ``torch.export.load`` runs the legacy entry's pickle (``weights_only=False``)
    while loading, and a program's ``guards_code`` when the loaded module is called."""
    marker = tmp_path / "ran"
    evil = rebuild(sandbox.pt2, {sandbox.prefix + "data/weights/model.pt": torch_saved(Touch(marker))})
    with pytest.raises(Exception):  # noqa: B017 (torch fails after running the code)
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()
    marker.unlink()
    guard = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    module = torch.export.load(io.BytesIO(edit_program(sandbox, lambda p: p.update(guards_code=[guard])))).module()
    assert not marker.exists()
    with contextlib.suppress(Exception):
        module(torch.randn(1, 3, 32, 32))
    assert marker.exists()


def test_cli_refuses_a_hostile_pt2_with_exit_2(sandbox, inputs, tmp_path, capsys):
    path = inputs / "evil.pt2"
    path.write_bytes(ARCHIVES["legacy weights pickle"][0](sandbox))
    args = ["explain", str(sandbox.root / "photo.png"), "--model", str(path), "--out", str(tmp_path / "out")]
    assert check_unchanged(sandbox, inputs, lambda: cli.main(args)) == 2
    err = capsys.readouterr().err
    assert "refused to load entry" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_clean_pt2_still_loads(sandbox):
    loaded = zoo.load_model(str(sandbox.root / "tiny.pt2"))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.module(x), tiny_model()(x), rtol=0, atol=0)


# ============================================================================================ --weights
WEIGHTS: dict[str, tuple[Callable[[Sandbox, Path], None], str]] = {
    "pickle that runs code": (
        lambda sb, p: p.write_bytes(torch_saved(Touch(sb.marker))),
        "asks for the Python object",
    ),
    "raw pickle": (lambda sb, p: p.write_bytes(pickle.dumps({"w": Touch(sb.marker)})), "weights_only=True"),
    "a list of tensors": (lambda sb, p: p.write_bytes(torch_saved([torch.zeros(2)])), "does not hold a state dict"),
    "a dict of numbers": (lambda sb, p: p.write_bytes(torch_saved({"w": 1})), "does not hold a state dict"),
    "empty file": (lambda sb, p: p.write_bytes(b""), "cannot read weights file"),
    "truncated file": (
        lambda sb, p: p.write_bytes(torch_saved({"w": torch.zeros(64)})[:100]),
        "cannot read weights file",
    ),
    "a folder": (lambda sb, p: p.mkdir(), "is not a file"),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_hostile_weights_are_refused(case, sandbox, inputs):
    build, match = WEIGHTS[case]
    path = inputs / "weights.pt"
    build(sandbox, path)

    def act() -> None:
        with pytest.raises(InputError, match=match) as caught:
            zoo.load_model("resnet18", path)
        assert type(caught.value) is InputError and str(path) in str(caught.value)
        assert "state_dict" in str(caught.value) or "not a file" in str(caught.value)

    check_unchanged(sandbox, inputs, act)


# ============================================================================================ camfn eval folders
def shard(out: Path, i: int) -> Path:
    return out / "maps" / f"shard_{i:05d}.pt"


def set_shard(out: Path, i: int, data: bytes) -> None:
    """Replace shard ``i`` by ``data`` and record its checksum, as if camfn had written it."""
    import hashlib

    shard(out, i).write_bytes(data)
    entry = json.loads(shard(out, i).with_suffix(".json").read_text())
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    shard(out, i).with_suffix(".json").write_text(json.dumps(entry))


def flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def link_to_victim(sb: Sandbox, p: Path) -> None:
    p.unlink()
    p.symlink_to(sb.victim)


DAMAGE: dict[str, tuple[Callable[[Sandbox, Path], None], str | None]] = {
    "flipped byte in a shard": (lambda sb, out: flip_byte(shard(out, 1)), "does not match its checksum"),
    "truncated shard": (
        lambda sb, out: shard(out, 1).write_bytes(shard(out, 1).read_bytes()[:50]),
        "does not match its checksum",
    ),
    "shard holding a list": (lambda sb, out: set_shard(out, 1, torch_saved([1, 2])), "not a valid shard"),
    "shard holding other keys": (lambda sb, out: set_shard(out, 1, torch_saved({"maps": "x"})), "not a valid shard"),
    "shard holding a pickle that runs code": (
        lambda sb, out: set_shard(out, 1, torch_saved({"maps": Touch(sb.marker)})),
        "not a valid shard",
    ),
    "shard of the wrong indices": (
        lambda sb, out: set_shard(out, 1, shard(out, 2).read_bytes()),
        "not a valid shard",
    ),
    "truncated shard entry": (
        lambda sb, out: shard(out, 1).with_suffix(".json").write_text('{"shard": 1, "st'),
        "shard index entry .* is damaged",
    ),
    "shard entry holding a list": (
        lambda sb, out: shard(out, 1).with_suffix(".json").write_text("[]"),
        "shard index entry .* is damaged",
    ),
    "truncated config.json": (
        lambda sb, out: (out / "config.json").write_text('{"method": "gradc'),
        r"config\.json .* is damaged .* rewritten",
    ),
    "config.json holding a list": (lambda sb, out: (out / "config.json").write_text("[1]"), "expected a JSON object"),
    "config.json with NaN": (
        lambda sb, out: (out / "config.json").write_text('{"a": NaN}'),
        "non-JSON constant NaN",
    ),
    "config.json not UTF-8": (lambda sb, out: (out / "config.json").write_bytes(b"\xff\xfe{"), "is damaged"),
    "symlink at config.json": (lambda sb, out: link_to_victim(sb, out / "config.json"), r"config\.json .* is damaged"),
    "symlink at a shard": (lambda sb, out: link_to_victim(sb, shard(out, 1)), "does not match its checksum"),
    "truncated index.json": (lambda sb, out: (out / "index.json").write_text('{"conf'), None),
    "symlink at report.json": (lambda sb, out: link_to_victim(sb, out / "report.json"), None),
    "symlink at index.json": (lambda sb, out: link_to_victim(sb, out / "index.json"), None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_eval_folder_is_repaired_with_a_warning(case, sandbox, inputs, tmp_path):
    damage, match = DAMAGE[case]
    out = tmp_path / "eval"
    shutil.copytree(sandbox.ref, out)
    damage(sandbox, out)

    def act() -> dict:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            report = evaluate("gradcam", tiny_model(), sandbox.data, "conv2", out_dir=out, **EVAL)
        texts = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
        if match is None:
            assert texts == []
        else:
            assert len(texts) == 1 and re.search(match, texts[0]), texts
        return report

    report = check_unchanged(sandbox, inputs, act)
    assert report == sandbox.report
    for name in ("config.json", "index.json", "report.json", "maps/shard_00001.pt", "maps/shard_00001.json"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (sandbox.ref / name).read_bytes(), name


def test_a_changed_item_in_the_middle_recomputes_its_shard(sandbox, inputs, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(sandbox.ref, out)
    data = copy.deepcopy(sandbox.data)
    data[5] = (1 - data[5][0], data[5][1])  # shard 1 holds items 4..7
    lines: list[str] = []

    def act() -> dict:
        with pytest.warns(UserWarning, match="data items of shard_00001.pt changed"):
            return evaluate("gradcam", tiny_model(), data, "conv2", out_dir=out, log=lines.append, **EVAL)

    check_unchanged(sandbox, inputs, act)
    assert [line.split(": ", 1)[-1] for line in lines if line.startswith("rank")] == [
        "shard 0 skipped (done)",
        "shard 1 computed (4 samples)",
        "shard 2 skipped (done)",
    ]
    fresh = evaluate("gradcam", tiny_model(), data, "conv2", out_dir=tmp_path / "fresh", **EVAL)
    assert shard(out, 1).read_bytes() == shard(tmp_path / "fresh", 1).read_bytes()
    assert fresh["metrics"] == json.loads((out / "report.json").read_text())["metrics"]


def stride_changed() -> torch.nn.Module:
    model = tiny_model()
    model.conv2.stride = (2, 2)  # the same parameters, another forward
    return model


class Scaled(GapNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.temperature


def temperature_changed() -> torch.nn.Module:
    model = Scaled(classes=5)
    model.load_state_dict(tiny_model().state_dict())
    model.temperature = -3.0
    return model.eval()


REFUSED: dict[str, tuple[Callable[[], torch.nn.Module], dict, type[Exception], str]] = {
    "stride changed": (stride_changed, {}, OptionError, r"another configuration \(differs in: forward\)"),
    "python attribute in forward changed": (
        temperature_changed,
        {},
        OptionError,
        r"differs in: forward\).*another out_dir",
    ),
    "option with a memory address": (tiny_model, {"seed": object()}, OptionError, "cannot record by value"),
    "target out of range": (tiny_model, {"target": 99}, TargetError, "target class 99 is out of range"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_eval_refuses_a_stale_or_unrecordable_run(case, sandbox, inputs, tmp_path):
    make, kw, error, match = REFUSED[case]
    out = tmp_path / "eval"
    shutil.copytree(sandbox.ref, out)
    before = snapshot(out)

    def act() -> None:
        with pytest.raises(error, match=match) as caught:
            evaluate("gradcam", make(), sandbox.data, "conv2", out_dir=out, **{**EVAL, **kw})
        assert type(caught.value) is error

    check_unchanged(sandbox, inputs, act)
    assert snapshot(out) == before  # refused before writing anything


def test_a_run_failing_validation_writes_no_config(sandbox, inputs, tmp_path):
    out = tmp_path / "eval"

    def act() -> None:
        with pytest.raises(TargetError, match="out of range"):
            evaluate("gradcam", tiny_model(), sandbox.data, "conv2", out_dir=out, target=99, **EVAL)

    check_unchanged(sandbox, inputs, act)
    assert not (out / "config.json").exists()
    report = evaluate("gradcam", tiny_model(), sandbox.data, "conv2", out_dir=out, target=3, **EVAL)
    assert report["config"]["target"] == 3 and report["metrics"]["confidence"]["count"] == N


@pytest.mark.parametrize(
    ("case", "prepare", "match"),
    [
        ("out_dir is a file", lambda out: out.write_text("x"), "is a file"),
        ("maps is a symlink", lambda out: (out.mkdir(), (out / "maps").symlink_to(out.parent)), "is a symlink"),
    ],
)
def test_eval_refuses_an_unusable_out_dir(case, prepare, match, sandbox, inputs, tmp_path):
    out = tmp_path / "eval"
    prepare(out)

    def act() -> None:
        with pytest.raises(InputError, match=match):
            evaluate("gradcam", tiny_model(), sandbox.data, "conv2", out_dir=out, **EVAL)

    check_unchanged(sandbox, inputs, act)


# ============================================================================================ images
def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring ``width x height`` RGB pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def tiff_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


IMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "decompression bomb": (lambda p: p.write_bytes(png_declaring(100_000, 100_000)), "too large|decompression bomb"),
    "huge declared size": (lambda p: p.write_bytes(png_declaring(9000, 9000)), "declares 9000 x 9000 pixels"),
    "truncated PNG": (
        lambda p: p.write_bytes(png_declaring(32, 32)[:40]),
        "cannot read image",
    ),
    "empty file": (lambda p: p.write_bytes(b""), "cannot read image"),
    "text file": (lambda p: p.write_text("not a picture"), "cannot read image"),
    "float image with NaN": (
        lambda p: p.write_bytes(tiff_of(np.full((4, 4), np.nan, dtype=np.float32))),
        "mode F",
    ),
    "float image above 1": (lambda p: p.write_bytes(tiff_of(np.full((4, 4), 7.0, dtype=np.float32))), "mode F"),
    "negative 32-bit image": (lambda p: p.write_bytes(tiff_of(np.full((4, 4), -5, dtype=np.int32))), "0..65535"),
    "a folder named like an image": (lambda p: p.mkdir(), "is a folder"),
    "missing file": (lambda p: None, "image not found"),
}


@pytest.mark.parametrize("case", list(IMAGES))
def test_hostile_images_are_refused(case, sandbox, inputs, tmp_path, capsys):
    build, match = IMAGES[case]
    path = inputs / "image.png"
    build(path)

    def act() -> None:
        with pytest.raises(InputError, match=match):
            load_image(path)
        args = ["explain", str(path), "--model", str(sandbox.root / "tiny.pt2"), "--out", str(tmp_path / "out")]
        assert cli.main(args) == 2

    check_unchanged(sandbox, inputs, act)
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unreadable_image_after_a_library_patched_pil(inputs, monkeypatch):
    """ultralytics replaces PIL.Image.open with a wrapper that, on an unreadable file, imports an optional
    plugin (pi-heif) and raises ImportError when it is missing: still a clear InputError."""
    from PIL import Image, UnidentifiedImageError

    original = Image.open

    def patched(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'pi_heif'") from None

    monkeypatch.setattr(Image, "open", patched)
    path = inputs / "image.png"
    path.write_text("not a picture")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(path)


# ============================================================================================ CLI flags
EXPLAIN_FLAGS: list[tuple[list[str], str]] = [
    (["--std", "0"], "argument --std: '0': use one number or three"),
    (["--std", "inf"], "positive finite numbers"),
    (["--std", "nan"], "positive finite numbers"),
    (["--std=-1,1,1"], "positive finite numbers"),
    (["--std", "1,2"], "one number or three"),
    (["--mean", "inf"], "argument --mean"),
    (["--mean", "nan,0,0"], "finite numbers"),
    (["--alpha", "nan"], "argument --alpha: 'nan': use a number between 0"),
    (["--alpha", "-0.1"], "argument --alpha"),
    (["--alpha", "half"], "argument --alpha"),
    (["--scale", "100000"], "argument --scale: '100000': use a whole number from 1 to 64"),
    (["--scale", "-1"], "argument --scale"),
    (["--scale", "1.5"], "argument --scale"),
    (["--size", "0"], "argument --size: '0': use a whole number from 1 to 8192"),
    (["--size", "100000"], "argument --size"),
    (["--size", "0x5"], "argument --size"),
    (["--size", "-3"], "argument --size"),
    (["--cmap", "nosuchmap"], "unknown colormap 'nosuchmap'"),
    (["--target", "-4"], "class indices start at 0"),
    (["--target", "99"], "target class 99 is out of range"),
    (["--target", str(2**70)], "out of range"),
    (["--out", "{victim}/sub"], "which is a file; pass a folder"),
    (["--out", "{victim}"], "is a file; pass a folder"),
    (["--method", "all", "--scale", "64"], "--scale 64: the picture would have"),
    (["--scale", "64", "{big}"], "--scale 64: the picture would have"),
]
EVAL_FLAGS: list[tuple[list[str], str]] = [
    (["--steps", "0"], "argument --steps: '0': use a whole number from 1"),
    (["--steps", "-3"], "argument --steps"),
    (["--steps", "1e9"], "argument --steps"),
    (["--shard-size", "0"], "argument --shard-size: '0': use a whole number >= 1"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--samples", "-1"], "argument --samples"),
    (["--std", "0"], "argument --std"),
    (["--out", "{victim}/eval"], "is under"),
]


def _no_maps(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a map was computed before the flags were checked")


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [("explain", f, m) for f, m in EXPLAIN_FLAGS] + [("eval", f, m) for f, m in EVAL_FLAGS],
    ids=[f"explain {' '.join(f)}" for f, _ in EXPLAIN_FLAGS] + [f"eval {' '.join(f)}" for f, _ in EVAL_FLAGS],
)
def test_bad_flags_exit_2_before_any_map(command, flags, message, sandbox, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_run_method", _no_maps)
    monkeypatch.setattr("camfn.evaluation._shard", _no_maps)
    big = inputs / "big.png"
    Image.new("RGB", (1200, 1200)).save(big)
    image = big if "{big}" in flags else sandbox.root / "photo.png"
    flags = [f.format(victim=sandbox.victim) for f in flags if f != "{big}"]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    if command == "explain":
        args = ["explain", str(image), "--model", str(sandbox.root / "tiny.pt2"), *out, *flags]
    else:
        args = ["eval", "shapes", "--samples", "4", "--size", "32", *out, *flags]
    code = check_unchanged(sandbox, inputs, lambda: cli.main(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ============================================================================================ viz
IMAGE = np.full((6, 8, 3), 200, dtype=np.uint8)
MAP = np.linspace(0, 1, 48).reshape(6, 8)
VIZ: dict[str, tuple[Callable[[], Any], type[CamfnError], str]] = {
    "alpha as a string": (
        lambda: viz.overlay(IMAGE, MAP, alpha="0.5"),
        OptionError,
        r"alpha='0\.5' \(str\).*alpha=0\.5",
    ),
    "alpha True": (lambda: viz.overlay(IMAGE, MAP, alpha=True), OptionError, "alpha=True"),
    "alpha NaN": (lambda: viz.overlay(IMAGE, MAP, alpha=float("nan")), OptionError, "between 0"),
    "alpha 2": (lambda: viz.blend(IMAGE, MAP, alpha=2), OptionError, "between 0"),
    "alpha None": (lambda: viz.blend(IMAGE, MAP, alpha=None), OptionError, "alpha=None"),
    "unknown colormap": (lambda: viz.overlay(IMAGE, MAP, cmap="nosuchmap"), OptionError, "unknown colormap"),
    "colormap number": (lambda: viz.colorize(MAP, 5), OptionError, "cmap=5"),
    "colormap of wrong shape": (
        lambda: viz.colorize(MAP, lambda v: v),
        OptionError,
        r"must return colors \(\.\.\., 3\)",
    ),
    "colormap out of range": (lambda: viz.colorize(MAP, lambda v: np.stack([v * 9] * 3, -1)), OptionError, "outside"),
    "colormap that fails": (lambda: viz.colorize(MAP, lambda v: 1 / 0), OptionError, "ZeroDivisionError"),
    "map with NaN": (lambda: viz.overlay(IMAGE, np.full((6, 8), np.nan)), InputError, "NaN or Inf"),
    "bool map": (lambda: viz.overlay(IMAGE, np.ones((6, 8), dtype=bool)), InputError, "bool"),
    "map as a list": (lambda: viz.overlay(IMAGE, [[0.0, 1.0]]), InputError, "numpy array, got list"),
    "map of 3 dims": (lambda: viz.overlay(IMAGE, np.zeros((2, 6, 8))), InputError, r"expected one \(H, W\) map"),
    "image with NaN": (lambda: viz.overlay(np.full((6, 8, 3), np.nan), MAP), InputError, "NaN or Inf pixels"),
    "image of 5 channels": (lambda: viz.overlay(np.zeros((6, 8, 5)), MAP), InputError, "expected"),
    "image as a list": (lambda: viz.overlay([[1, 2]], MAP), InputError, "got list"),
    "scale True": (lambda: viz.overlay(IMAGE, MAP, scale=True), OptionError, "scale=True"),
    "preprocess std 0": (lambda: viz.preprocess(IMAGE, std=(0.0,)), OptionError, r"std=\(0\.0,\).*> 0"),
    "preprocess mean inf": (lambda: viz.preprocess(IMAGE, mean=(float("inf"),)), OptionError, "finite"),
    "preprocess size 0": (lambda: viz.preprocess(IMAGE, size=0), OptionError, "size=0"),
    "preprocess size of 3": (lambda: viz.preprocess(IMAGE, size=(1, 2, 3)), OptionError, "size="),
    "deprocess a batch": (lambda: viz.deprocess(torch.zeros(2, 3, 4, 4)), InputError, r"got shape \(2, 3, 4, 4\)"),
    "deprocess numpy": (lambda: viz.deprocess(np.zeros((3, 4, 4))), InputError, "ndarray"),
    "deprocess NaN": (lambda: viz.deprocess(torch.full((3, 2, 2), float("nan"))), InputError, "NaN"),
}


@pytest.mark.parametrize("case", list(VIZ))
def test_bad_viz_arguments(case, sandbox, inputs):
    act, error, match = VIZ[case]
    before = (IMAGE.copy(), MAP.copy())

    def run() -> None:
        with pytest.raises(error, match=match) as caught:
            act()
        assert type(caught.value) is error

    check_unchanged(sandbox, inputs, run)
    assert np.array_equal(IMAGE, before[0]) and np.array_equal(MAP, before[1])  # arguments untouched
