"""camfn.export: programs ``(x, target) -> (output, maps)`` that run where camfn cannot be imported.

Every method of ``camfn.METHODS`` is exported for a tiny conv net (16 px; legrad: a one-block ViT),
saved with ``torch.export.save`` and loaded in ONE subprocess in which ``import camfn`` fails; its maps
and outputs must equal the eager method's to 1e-5 (float32) at batch sizes 3 and 1 (the programs are
exported from a batch of 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import camfn
from camfn.errors import InputError, OptionError
from camfn.files import check_exported

OPTIONS = {  # small settings of the slow methods
    "smooth_gradcampp": {"n": 2, "seed": 3},
    "sscam": {"n": 2, "seed": 5},
    "iscam": {"n": 2},
    "sess": {"num_scales": 2, "window_size": 12, "step_size": 4},
}
ON_VIT = {"legrad"}  # needs attention: a one-block ViT, its default layer
LAYER = "4"
TOL = 1e-5


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return _net()


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=5)
    nn.init.normal_(vit.heads.head.weight)  # torchvision initialises the head to zeros: flat maps
    return vit.eval()


def _case(name: str, net: nn.Module, vit: nn.Module) -> tuple[nn.Module, str | None, dict]:
    return (vit, None, {}) if name in ON_VIT else (net, LAYER, OPTIONS.get(name, {}))


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return _vit()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x3": torch.randn(3, 3, 16, 16, generator=g),
        "t3": torch.tensor([1, 4, -1]),  # -1: the top-1 class
        "x1": torch.randn(1, 3, 16, 16, generator=g),
        "t1": torch.tensor([2]),
    }


@pytest.fixture(scope="module")
def saved(net, vit, inputs, tmp_path_factory) -> tuple[Path, dict[str, torch.export.ExportedProgram]]:
    folder = tmp_path_factory.mktemp("programs")
    programs = {}
    for name, method in camfn.METHODS.items():
        model, layer, options = _case(name, net, vit)
        programs[name] = camfn.export(method, model, layer, inputs["x3"][:2], **options)
        torch.export.save(programs[name], folder / f"{name}.pt2")
    torch.save(inputs, folder / "inputs.pt")
    return folder, programs


LOADER = """
import sys, torch
sys.modules["camfn"] = None  # import camfn fails from here on
try:
    import camfn
except ImportError:
    pass
else:
    raise SystemExit("camfn was importable")
folder, names = sys.argv[1], sys.argv[2].split(",")
inputs = torch.load(f"{folder}/inputs.pt", weights_only=True)
results = {}
for name in names:
    program = torch.export.load(f"{folder}/{name}.pt2").module()
    for b in ("3", "1"):
        output, maps = program(inputs["x" + b], inputs["t" + b])
        results[f"{name}/{b}/output"], results[f"{name}/{b}/maps"] = output, maps
torch.save(results, f"{folder}/results.pt")
"""


@pytest.fixture(scope="module")
def loaded(saved) -> dict[str, torch.Tensor]:
    folder, _ = saved
    names = ",".join(camfn.METHODS)
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOADER), str(folder), names], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "results.pt", weights_only=True)


def _eager(net, name, x, t, vit=None):
    model, layer, options = _case(name, net, vit)
    tt = torch.where(t < 0, model(x).argmax(1), t)
    return camfn.METHODS[name](model, camfn.params(model), x, layer, tt, **options)


@pytest.mark.parametrize("name", list(camfn.METHODS))
def test_loaded_without_camfn_equals_eager(net, vit, inputs, loaded, name):
    model = _case(name, net, vit)[0]
    for b in ("3", "1"):
        x, t = inputs["x" + b], inputs["t" + b]
        maps, output = loaded[f"{name}/{b}/maps"], loaded[f"{name}/{b}/output"]
        reference = _eager(net, name, x, t, vit)
        assert maps.shape == reference.shape == (int(b), 16, 16)
        assert (maps - reference).abs().max() <= TOL, name
        assert torch.allclose(output, model(x), atol=TOL)
        assert float(reference.amax()) == pytest.approx(1.0)  # a real map, not a flat one


def test_negative_target_is_top1(net, inputs, saved):
    _, programs = saved
    x = inputs["x3"]
    _, maps = programs["gradcam"].module()(x, torch.full((3,), -1))
    expected = camfn.gradcam(net, camfn.params(net), x, LAYER)  # default target: the top-1 class
    assert (maps - expected).abs().max() <= TOL


def test_state_is_lifted_not_constant(net, inputs, saved):
    _, programs = saved
    program = programs["gradcam"]
    assert set(program.state_dict) == set(camfn.params(net))
    kinds = {s.target: s.kind.name for s in program.graph_signature.input_specs if s.target}
    assert kinds["0.weight"] == "PARAMETER" and kinds["1.running_mean"] == "BUFFER"
    assert not program.constants  # no noise in gradcam: nothing baked in
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    module = program.module()
    module.load_state_dict(camfn.params(other))  # a new checkpoint, same program
    x, t = inputs["x3"], torch.tensor([0, 1, 2])
    output, maps = module(x, t)
    assert torch.allclose(output, other(x), atol=TOL)
    assert (maps - camfn.gradcam(other, camfn.params(other), x, LAYER, t)).abs().max() <= TOL


def test_fixed_batch_is_one_batched_pass(net, inputs):
    x, t = inputs["x3"], inputs["t3"]
    program = camfn.export(camfn.xgradcam, net, LAYER, x, batch=3)
    assert not any("map_impl" in str(n.target) for n in program.graph.nodes)  # no per-sample loop
    output, maps = program.module()(x, t)
    assert (maps - _eager(net, "xgradcam", x, t)).abs().max() <= TOL and torch.allclose(output, net(x), atol=TOL)
    with pytest.raises(Exception, match="3"):  # torch.export's own shape guard
        program.module()(inputs["x1"], inputs["t1"])
    with pytest.raises(OptionError, match="positive int"):
        camfn.export(camfn.xgradcam, net, LAYER, x, batch=0)


def test_noise_is_baked_in_as_constants(saved):
    _, programs = saved
    assert len(programs["sscam"].constants) == OPTIONS["sscam"]["n"]
    assert len(programs["smooth_gradcampp"].constants) >= 1


def test_archive_holds_no_pickle(saved):
    """Tensors are raw bytes listed in the configs (``use_pickle`` false), the rest JSON or short text."""
    folder, _ = saved
    for name in camfn.METHODS:
        with zipfile.ZipFile(folder / f"{name}.pt2") as archive:
            entries = {i.filename.split("/", 1)[1]: archive.read(i.filename) for i in archive.infolist()}
        listed = set()
        for kind in ("weights", "constants"):
            table = json.loads(entries[f"data/{kind}/model_{kind}_config.json"])["config"]
            assert all(entry["use_pickle"] is False for entry in table.values()), (name, kind)
            listed |= {f"data/{kind}/{entry['path_name']}" for entry in table.values()}
        raw = {k for k in entries if k.startswith(("data/weights/", "data/constants/")) and not k.endswith(".json")}
        assert raw == listed, name
        assert entries["data/sample_inputs/model.pt"] == b"", name  # example inputs would be a torch.save pickle
        for key in entries.keys() - raw:
            data = entries[key]
            assert key.endswith(".json") or len(data) <= 64, (name, key)
            assert not data.startswith((b"\x80", b"PK")), (name, key)  # no pickle, no nested torch.save zip
        check_exported((folder / f"{name}.pt2").read_bytes(), f"{name}.pt2")  # camfn's own loader accepts it


def test_bad_calls_raise_clear_errors(net, inputs):
    with pytest.raises(InputError, match=r"camfn\.METHODS"):
        camfn.export(camfn.guided_backprop, net, LAYER, inputs["x1"])
    with pytest.raises(InputError, match=r"nn\.Module"):
        camfn.export(camfn.gradcam, lambda p, x: x, LAYER, inputs["x1"])
    with pytest.raises(OptionError, match="int seed"):
        camfn.export(camfn.sscam, net, LAYER, inputs["x1"], seed=torch.Generator())
    with pytest.raises(camfn.LayerError):
        camfn.export(camfn.gradcam, net, "7", inputs["x1"])  # the linear layer: no spatial map


def test_aoti_package_on_a_tiny_model(net, inputs, tmp_path):
    """AOTInductor compiles C++ (tens of seconds even for this net): gradcam only."""
    path = tmp_path / "gradcam_aoti.pt2"
    camfn.export(camfn.gradcam, net, LAYER, inputs["x1"], package=path)
    run = torch._inductor.aoti_load_package(str(path))
    x, t = inputs["x3"], inputs["t3"]
    output, maps = run(x, t)
    assert (maps - _eager(net, "gradcam", x, t)).abs().max() <= TOL
    assert torch.allclose(output, net(x), atol=TOL)


def test_cli_writes_a_program_equal_to_eager(net, inputs, tmp_path, capsys, monkeypatch):
    from camfn import cli, zoo

    monkeypatch.setattr(zoo, "load_model", lambda spec, weights=None: zoo.Model(net, spec, size=16, layer=LAYER))
    out = tmp_path / "cli" / "layercam.pt2"
    assert cli.main(["export", "--model", "tiny", "--method", "layercam", "--out", str(out)]) == 0
    assert "layercam" in capsys.readouterr().out
    x, t = inputs["x3"], inputs["t3"]
    output, maps = torch.export.load(out).module()(x, t)
    assert (maps - _eager(net, "layercam", x, t)).abs().max() <= TOL and torch.allclose(output, net(x), atol=TOL)
    assert cli.main(["export", "--model", "tiny", "--method", "gradcam,cam", "--out", str(out)]) == 2
    assert "one method" in capsys.readouterr().err
