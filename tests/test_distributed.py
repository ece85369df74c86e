"""``camfn.evaluate`` / ``camfn eval``: sharded maps and metrics, on one process and on two (``torchrun``, gloo).

One configuration throughout: the shipped shapes model, 16 test images at 32 px, shards of 6 (6, 6, 4 samples:
an uneven last shard) in batches of 4 (batches do not line up with shards), deletion/insertion with 8 steps.
The report must equal the metrics computed directly; a true 2-process run must write the same files, byte
for byte, as the in-process run; a rerun must recompute exactly the missing shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camfn
from camfn import cli, metrics, shapes
from camfn.evaluation import evaluate, item, shard_ranges

ROOT = Path(__file__).resolve().parents[1]
N, SIZE, SHARD, BATCH, STEPS = 16, 32, 6, 4, 8
CLI_ARGS = ["shapes", "--samples", str(N), "--size", str(SIZE), "--shard-size", str(SHARD)]
CLI_ARGS += ["--batch-size", str(BATCH), "--steps", str(STEPS)]
OPTIONS = {"deletion": {"steps": STEPS}, "insertion": {"steps": STEPS}}  # what the CLI's --steps passes


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return shapes.load()


@pytest.fixture(scope="module")
def batch() -> shapes.Batch:
    return shapes.make(N, size=SIZE, seed=shapes.TEST_SEED)  # what `camfn eval shapes --size 32` evaluates


@pytest.fixture(scope="module")
def data(batch: shapes.Batch) -> torch.utils.data.Dataset:
    return torch.utils.data.TensorDataset(batch.images, batch.labels, batch.boxes)


def run_evaluate(model, data, out: Path, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    kw = {"shard_size": SHARD, "batch_size": BATCH, "metric_options": OPTIONS, **kw}
    return evaluate("gradcam", model, data, shapes.LAYER, out_dir=out, log=lines.append, **kw), lines


@pytest.fixture(scope="module")
def single(model, data, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("eval") / "single"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank below (OMP_NUM_THREADS=1): the same kernels, the same bits
    try:
        report, lines = run_evaluate(model, data, out)
    finally:
        torch.set_num_threads(threads)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed
    return out, report, lines


def shard_files(out: Path) -> list[Path]:
    return sorted((out / "maps").glob("shard_*.pt"))


def test_shards_cover_the_data_set_once():
    assert shard_ranges(16, 6) == [range(0, 6), range(6, 12), range(12, 16)]
    assert [i for r in shard_ranges(17, 5) for i in r] == list(range(17))


def test_report_equals_the_metrics_computed_directly(single, model, batch):
    out, report, lines = single
    p = camfn.params(model)
    x, labels, boxes = batch.images, batch.labels, batch.boxes
    maps = camfn.gradcam(model, p, x, shapes.LAYER, labels)  # one batch of 16 (the run used batches of 4)
    direct = {
        "pointing_game": metrics.pointing_game(maps, boxes, tolerance=round(15 * SIZE / 224)).double(),
        "energy_pointing_game": metrics.energy_pointing_game(maps, boxes).double(),
        "average_drop": metrics.average_drop(model, p, x, maps, labels).double(),
        "increase_in_confidence": metrics.increase_in_confidence(model, p, x, maps, labels).double(),
        "deletion": metrics.deletion(model, p, x, maps, labels, steps=STEPS).auc.double(),
        "insertion": metrics.insertion(model, p, x, maps, labels, steps=STEPS).auc.double(),
    }
    assert report["samples"] == N and report["shards"] == 3 and report["skipped"] == {}
    assert set(report["metrics"]) == set(direct)
    for name, values in direct.items():
        got = report["metrics"][name]
        assert got["count"] == N
        assert got["mean"] == pytest.approx(values.mean().item(), abs=1e-6), name
        assert got["std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-6), name
    assert 0 < report["metrics"]["pointing_game"]["mean"] < 1  # a value that could have been anything
    shards = [torch.load(f, weights_only=True) for f in shard_files(out)]
    assert torch.cat([s["indices"] for s in shards]).tolist() == list(range(N))
    assert torch.equal(torch.cat([s["targets"] for s in shards]), labels)
    stored = torch.cat([s["maps"] for s in shards])
    assert stored.dtype == torch.float16 and stored.shape == (N, SIZE, SIZE)
    assert (stored.float() - maps).abs().max() < 1e-3  # float16 storage: half a unit in the last place
    for name, values in direct.items():
        per_sample = torch.cat([s["metrics"][name] for s in shards])
        assert torch.allclose(per_sample, values, atol=1e-6), name
    index = json.loads((out / "index.json").read_text())
    assert [(e["file"], e["start"], e["stop"], e["done"]) for e in index["shards"]] == [
        ("maps/shard_00000.pt", 0, 6, True),
        ("maps/shard_00001.pt", 6, 12, True),
        ("maps/shard_00002.pt", 12, 16, True),
    ]
    assert json.loads((out / "report.json").read_text()) == report
    assert lines == [f"rank 0: shard {i} computed ({n} samples)" for i, n in enumerate((6, 6, 4))]


def test_two_processes_write_what_one_process_writes(single, tmp_path):
    """A true ``torchrun --nproc_per_node 2`` run (gloo on the CPU) against the in-process run above."""
    out, report, _ = single
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    done = subprocess.run(
        [*launch, "-m", "camfn", "eval", *CLI_ARGS, "--out", str(two)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: shard 0 computed" in done.stderr and "rank 0: shard 2 computed" in done.stderr
    assert "rank 1: shard 1 computed" in done.stderr  # shard i on rank i % 2
    assert done.stdout.count("wrote ") == 1  # only rank 0 reports
    got = json.loads((two / "report.json").read_text())
    assert got["config"] == report["config"]  # the CLI and the library describe the same run
    for name, m in report["metrics"].items():
        assert got["metrics"][name]["count"] == m["count"]
        assert got["metrics"][name]["mean"] == pytest.approx(m["mean"], rel=1e-12, abs=1e-15)  # summation order
    for a, b in zip(shard_files(out), shard_files(two), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert (two / "index.json").read_bytes() == (out / "index.json").read_bytes()


def test_a_rerun_computes_only_the_missing_shard(single, model, data, tmp_path):
    out, report, _ = single
    copy = tmp_path / "resume"
    shutil.copytree(out, copy)
    kept = {f.name: f.stat().st_mtime_ns for f in shard_files(copy)}
    (copy / "maps" / "shard_00001.pt").unlink()
    again, lines = run_evaluate(model, data, copy)
    assert lines == [
        "rank 0: shard 0 skipped (done)",
        "rank 0: shard 1 computed (6 samples)",
        "rank 0: shard 2 skipped (done)",
    ]
    assert again == report
    after = {f.name: f.stat().st_mtime_ns for f in shard_files(copy)}
    assert after["shard_00000.pt"] == kept["shard_00000.pt"] and after["shard_00002.pt"] == kept["shard_00002.pt"]
    assert (copy / "maps" / "shard_00001.pt").read_bytes() == (out / "maps" / "shard_00001.pt").read_bytes()
    _, lines = run_evaluate(model, data, copy)
    assert all(line.endswith("skipped (done)") for line in lines) and len(lines) == 3


def test_an_out_dir_of_another_configuration_is_refused(single, model, data, tmp_path):
    out, _, _ = single
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    with pytest.raises(camfn.OptionError, match=r"another configuration \(differs in: method\).*another out_dir"):
        evaluate("layercam", model, data, shapes.LAYER, out_dir=copy, shard_size=SHARD, metric_options=OPTIONS)
    with pytest.raises(camfn.OptionError, match="differs in: shard_size"):
        run_evaluate(model, data, copy, shard_size=5)
    other = shapes.load()
    with torch.no_grad():
        other.fc.bias.add_(0.1)
    with pytest.raises(camfn.OptionError, match="differs in: model"):
        run_evaluate(other, data, copy)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"metrics": ["delection"]}, camfn.OptionError, "unknown metric 'delection'; did you mean 'deletion'"),
        ({"metrics": []}, camfn.OptionError, "metrics is empty"),
        ({"metric_options": {"road": {}}}, camfn.OptionError, "'road', which is not among the metrics"),
        ({"target": "best"}, camfn.TargetError, "use 'label'"),
        ({"shard_size": 0}, camfn.OptionError, "shard_size=0: use a positive int"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(model, data, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        evaluate("gradcam", model, data, shapes.LAYER, out_dir=tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_bad_method_and_data_sets(model, data, tmp_path):
    with pytest.raises(camfn.OptionError, match="unknown method 'gradcan'; did you mean 'gradcam'"):
        evaluate("gradcan", model, data, out_dir=tmp_path)
    with pytest.raises(camfn.InputError, match="the data set is empty"):
        evaluate("gradcam", model, [], out_dir=tmp_path)
    with pytest.raises(camfn.InputError, match=r"item 0: expected a float image tensor \(C, H, W\)"):
        evaluate("gradcam", model, [torch.zeros(8, 8)], out_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(camfn.InputError, match="is a file"):
        evaluate("gradcam", model, data, out_dir=tmp_path / "file")


def test_items_of_every_form(batch):
    image, label, box = batch.images[0], batch.labels[0], batch.boxes[0]
    assert item(image).label is None and item(image).box is None
    assert item((image, label)).label == int(label)
    assert torch.equal(item({"image": image, "label": label, "boxes": box}).box, box)
    with pytest.raises(camfn.InputError, match="the label must be one class index"):
        item((image, torch.tensor([1, 2])), 3)


def test_without_boxes_the_box_metrics_are_skipped(model, batch, tmp_path):
    images = list(batch.images[:3])  # bare tensors: no labels (target: top-1 class), no boxes
    names = ("pointing_game", "confidence", "road")
    report = evaluate(camfn.gradcam, model, images, shapes.LAYER, out_dir=tmp_path, metrics=names)
    assert report["skipped"] == {"pointing_game": "the data set has no boxes"}
    p, x = camfn.params(model), batch.images[:3]
    maps = camfn.gradcam(model, p, x, shapes.LAYER)  # top-1 classes, as the run
    assert report["metrics"]["confidence"]["mean"] == pytest.approx(
        metrics.confidence(model, p, x).mean().item(), abs=1e-6
    )
    assert report["metrics"]["road"]["mean"] == pytest.approx(
        metrics.road(model, p, x, maps).auc.mean().item(), abs=1e-6
    )
    assert report["config"]["target"] == "label" and report["config"]["method"] == "gradcam"


def test_cli_eval_on_an_image_folder_with_class_subfolders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i, cls in enumerate(("circle", "ring", "circle")):
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((20, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "out"
    args = ["eval", str(tmp_path / "data"), "--size", "32", "--metrics", "confidence,pointing_game", "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "pointing_game skipped: the data set has no boxes" in captured.err
    assert f"wrote {out / 'report.json'} (3 samples, 1 shards)" in captured.out
    shard = torch.load(out / "maps" / "shard_00000.pt", weights_only=True)
    assert shard["targets"].tolist() == [0, 0, 4]  # sorted paths: circle/0, circle/2, ring/1; classes by name
    assert shard["maps"].shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--metrics", "nope"], "unknown metric 'nope'"),
        (["--method", "gradcam,layercam"], "one method per run"),
        (["--samples", "0"], "argument --samples: '0': use a whole number from 1"),
        (["--steps", "0"], "argument --steps: '0': use a whole number from 1"),
    ],
)
def test_cli_eval_bad_input_exits_2(args, match, tmp_path, capsys):
    assert cli.main(["eval", *CLI_ARGS, "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().err


def test_cli_eval_on_a_missing_folder_exits_2(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder; pass 'shapes' or a folder of images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ failures and resume
def tiny(classes: int = 5) -> torch.nn.Module:
    from conftest import GapNet

    torch.manual_seed(0)
    return GapNet(classes=classes).eval()


def tiny_data(n: int = 8) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, 16, 16, generator=g), i % 5) for i in range(n)]


def test_non_finite_samples_are_reported_failed_and_never_scored(tmp_path, capsys):
    model, data = tiny(), tiny_data()
    data[2] = (
        data[2][0].clone().index_put_((torch.tensor(0), torch.tensor(3), torch.tensor(3)), torch.tensor(math.nan)),
        2,
    )
    data[5] = (data[5][0].clone().index_fill_(2, torch.tensor([1]), math.inf), 0)
    names = ("confidence", "average_drop")
    report = evaluate("gradcam", model, data, "conv2", out_dir=tmp_path / "run", shard_size=3, metrics=names)
    assert [f["index"] for f in report["failed"]] == [2, 5]
    good = [i for i in range(len(data)) if i not in (2, 5)]
    x = torch.stack([data[i][0] for i in good])
    labels = torch.tensor([data[i][1] for i in good])
    p = camfn.params(model)
    maps = camfn.gradcam(model, p, x, "conv2", labels)
    direct = {
        "confidence": metrics.confidence(model, p, x, labels).double(),
        "average_drop": metrics.average_drop(model, p, x, maps, labels).double(),
    }
    for name, values in direct.items():
        assert report["metrics"][name]["count"] == len(good)
        assert report["metrics"][name]["mean"] == pytest.approx(values.mean().item(), abs=1e-6)
    shards = [torch.load(f, weights_only=True) for f in shard_files(tmp_path / "run")]
    failed = torch.cat([s["failed"] for s in shards])
    assert failed.tolist() == [i in (2, 5) for i in range(len(data))]
    stored = torch.cat([s["maps"] for s in shards]).float()
    assert bool(stored[failed].isnan().all()) and bool(stored[~failed].isfinite().all())


def test_a_model_with_a_nan_weight_fails_every_sample(tmp_path, capsys):
    model = tiny()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = math.nan
    report = evaluate("gradcam", model, tiny_data(4), "conv2", out_dir=tmp_path / "run", metrics=["confidence"])
    assert [f["index"] for f in report["failed"]] == [0, 1, 2, 3]
    assert report["metrics"]["confidence"] == {"mean": None, "std": None, "count": 0}
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report  # plain JSON, no NaN literal


def test_cli_eval_names_the_failed_samples(tmp_path, capsys, monkeypatch):
    loaded = cli.load_model("shapes")
    with torch.no_grad():
        loaded.module.fc.bias[0] = math.nan  # every output NaN: every sample fails
    monkeypatch.setattr(cli, "load_model", lambda *args: loaded)
    args = ["eval", "shapes", "--samples", "3", "--size", "32", "--metrics", "confidence", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "note: 3 sample(s) failed (not scored): 0, 1, 2" in captured.err
    assert "confidence         -         -  0" in captured.out


def test_a_generator_seed_is_stored_by_value(tmp_path):
    model, data = tiny(), tiny_data(4)
    kw = {"out_dir": tmp_path / "run", "metrics": ["confidence"], "n": 2}
    lines: list[str] = []
    evaluate("smooth_gradcampp", model, data, "conv2", seed=torch.Generator().manual_seed(7), **kw)
    config = (tmp_path / "run" / "config.json").read_text()
    assert "0x" not in config and '"initial_seed": 7' in config
    evaluate("smooth_gradcampp", model, data, "conv2", seed=torch.Generator().manual_seed(7), log=lines.append, **kw)
    assert lines == ["rank 0: shard 0 skipped (done)"]  # an identical rerun resumes
    with pytest.raises(camfn.OptionError, match="differs in: method_options"):
        evaluate("smooth_gradcampp", model, data, "conv2", seed=torch.Generator().manual_seed(8), **kw)


class Tempered(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny()
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.temperature


def test_a_changed_forward_with_the_same_parameters_is_refused(tmp_path):
    model, data = Tempered().eval(), tiny_data(4)
    evaluate("gradcam", model, data, "net.conv2", out_dir=tmp_path / "run", metrics=["confidence"])
    model.temperature = -3.0  # same parameters, another forward: the shards would be stale
    with pytest.raises(camfn.OptionError, match=r"differs in: forward\)"):
        evaluate("gradcam", model, data, "net.conv2", out_dir=tmp_path / "run", metrics=["confidence"])


def test_cli_eval_reports_a_repaired_shard_once(tmp_path, capsys):
    args = ["eval", "shapes", "--samples", "4", "--size", "32", "--shard-size", "2", "--metrics", "confidence"]
    args += ["--out", str(tmp_path), "-q"]
    assert cli.main(args) == 0
    first = (tmp_path / "report.json").read_bytes()
    shard = tmp_path / "maps" / "shard_00001.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("does not match its checksum") == 1 and err.startswith("warning: ")  # shown despite -q
    assert (tmp_path / "report.json").read_bytes() == first


def test_evaluate_computes_metrics_that_rerun_the_method(tmp_path):
    """Every registry metric is available to camfn eval, also those that call the method again."""
    from camfn import evaluation, metrics, shapes

    assert set(evaluation.MODEL_METRICS) | set(evaluation.BOX_METRICS) == set(metrics.METRICS)
    model, batch = shapes.load(), shapes.make(4, size=32, seed=3)
    data = list(zip(batch.images, batch.labels, strict=True))
    report = camfn.evaluate(
        "gradcam", model, data, shapes.LAYER, out_dir=tmp_path / "run", metrics=["max_sensitivity"],
        metric_options={"max_sensitivity": {"samples": 2}}, shard_size=4, batch_size=4,
    )  # fmt: skip
    direct = metrics.max_sensitivity(
        camfn.gradcam, model, camfn.params(model), batch.images, shapes.LAYER, batch.labels, samples=2
    )
    assert abs(report["metrics"]["max_sensitivity"]["mean"] - float(direct.double().mean())) < 1e-4
