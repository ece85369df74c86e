"""The GPU check on a machine without CUDA: benchmarks/gpu_check.sh parses, exits 0 with a "no CUDA" message
at once and leaves the results alone; benchmarks/gpu.py's defaults are the race the issue asks for, and a
tiny CPU run checks its wiring (camfn against grad-cam and torchcam, the report written).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RESULTS = ROOT / "benchmarks" / "results" / "gpu.md"
if str(ROOT) not in sys.path:  # the benchmarks package lives beside camfn, outside the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
BASH = shutil.which("bash")


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT)], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


def test_script_parses() -> None:
    assert BASH is not None
    done = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@NO_CUDA
@pytest.mark.parametrize("gpu_listed", [False, True], ids=["no-nvidia-smi", "nvidia-smi-but-no-cuda"])
def test_script_exits_cleanly_without_cuda(tmp_path: pathlib.Path, gpu_listed: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu_listed:  # a machine that lists a GPU but whose torch cannot use it
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: a GPU torch cannot use'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (pathlib.Path(p) / "nvidia-smi").exists()
    )
    before = RESULTS.stat().st_mtime_ns if RESULTS.exists() else None
    done = check({"CAMFN_PYTHON": sys.executable, "PATH": f"{bin_dir}{os.pathsep}{path}"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA: torch" in done.stdout and "sees no CUDA device" in done.stdout
    assert ("cannot use the GPU" in done.stdout) == gpu_listed
    assert "pytest" not in done.stdout and "Traceback" not in done.stdout + done.stderr  # stopped before stage 3
    assert (RESULTS.stat().st_mtime_ns if RESULTS.exists() else None) == before


def test_race_defaults_are_the_issues() -> None:
    args = gpu.parse([])
    assert (args.model, args.batch, args.size, args.layer) == ("resnet50", 32, 224, "layer4")
    assert args.methods == ["gradcam", "scorecam", "ablationcam"]
    assert args.compiled == ["gradcam", "ablationcam"] and args.backend == "inductor" and args.device == "cuda"
    assert gpu.parse(["--compiled"]).compiled == []
    with pytest.raises(SystemExit):
        gpu.parse(["--batch", "0"])


@NO_CUDA
def test_race_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.run([]) == 0
    assert capsys.readouterr().out.startswith("no CUDA: torch")


def test_race_wiring_on_cpu(tmp_path: pathlib.Path) -> None:
    preamble = tmp_path / "tests.md"
    preamble.write_text("## CUDA tests\n\n- result: 3 passed")
    out = tmp_path / "gpu.md"
    argv = ["--device", "cpu", "--model", "resnet18", "--batch", "2", "--size", "64", "--methods", "gradcam"]
    assert gpu.run([*argv, "--repeats", "1", "--compiled", "--preamble", str(preamble), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# GPU check: CUDA tests and a short race\n\n## CUDA tests\n\n- result: 3 passed")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `gradcam`")]
    assert [(r[1], r[2]) for r in rows] == [("camfn", "eager"), ("grad-cam", "eager"), ("torchcam", "eager")]
    assert float(rows[1][7]) < 1e-4  # grad-cam's maps against camfn's, both in [0, 1] at the input size
