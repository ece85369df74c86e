"""What every benchmark script shares: environment facts, report options and files, timing, tables, memory.

The one module the benchmark scripts import from each other (no other benchmark module imports a benchmark
module), so that each script can be read, run and changed on its own.

>>> fmt(0.0123), fmt(12.3), fmt(None)
('12 ms', '12.3 s', '-')
>>> print(table([["a", "1"]], ["name", "n"], markdown=True))
| name | n |
|---|---|
| a | 1 |
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import camfn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (report paths are relative to it)."""

BUSY = 0.6
"""Below this share of (threads x wall time) the CPUs were shared with other processes."""


# ------------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``/proc/loadavg`` gives them."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def version(dist: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def revision() -> str:
    """The repository's commit, marked dirty when camfn has uncommitted changes (what was measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "camfn"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in camfn/" if dirty else "")


def environment() -> list[str]:
    """Two report lines: the library versions and camfn's commit; the CPU, torch threads and load."""
    return [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, camfn {camfn.__version__}, "
        f"grad-cam {version('grad-cam')}, torchcam {version('torchcam')}, python {platform.python_version()}, "
        f"camfn at {revision()}",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch threads: {torch.get_num_threads()}, "
        f"load average at start: {loadavg()}",
    ]


# ------------------------------------------------------------------------------------------ reports
def report_options(parser: argparse.ArgumentParser, results: str, results_quick: str) -> None:
    """``--markdown [PATH]``, ``--threads`` and ``--seed``, as the race, scaling and overhead scripts take them."""
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help=f"also write the report to PATH [{results}; --quick: {results_quick}]",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [torch's default]")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and classes [0]")


def write_report(path: str, title: str, text: str) -> None:
    """Write ``# title`` and ``text`` to ``path`` (relative to the repository root unless absolute)."""
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{text}\n")
    print(f"written to {os.path.relpath(path, ROOT)}", file=sys.stderr)


def publish(head: list[str], body: list[str], path: str | None, title: str) -> str:
    """Print ``body`` (``head`` was printed when the run started); with a ``path``, write both; return both."""
    text = "\n".join([*head, *body])
    print("\n".join(body))
    if path is not None:
        write_report(path, title, text)
    return text


def fmt(seconds: float | None) -> str:
    """Milliseconds below 10 s, else seconds; ``-`` for no time."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(rows: list[list[str]], head: list[str], markdown: bool) -> str:
    """``rows`` under ``head`` as a markdown table, or as aligned plain text."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def maxdiff(a: Any, b: Any) -> float:
    """Max abs difference of two maps of the same shape (numpy or tensor)."""
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


# ------------------------------------------------------------------------------------------ timing
class Timings:
    """Summaries of ``times`` (wall seconds per call) and ``cpu`` (process CPU seconds per call)."""

    times: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


@dataclass
class Case(Timings):
    """One timed thing. ``group`` is "1" (one target per image), "T" (many) or "floor"."""

    name: str
    group: str
    fn: Callable[[], object]
    note: str = ""
    warm: bool = True  # call once untimed before the repeats (False: the code path is already warm)
    slow: bool = False  # timed only in the first --slow-repeats rounds
    first: float | None = None
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per call (all threads)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """Wall seconds (``time.perf_counter``), process CPU seconds and the result of ``fn()``."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None``: unchanged); the old count is restored after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Share:
    """The share of (threads x wall time) this process used since it was made: ``Share().used()``.

    Other processes on the machine lower it; below :data:`BUSY` timings are noisy.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def used(self) -> float:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        return (time.process_time() - self.cpu) / (wall * torch.get_num_threads())


def many_forwards(method: str) -> bool:
    """Whether a camfn method runs many perturbed forwards per call (it chunks them: ``chunk_size="auto"``).

    >>> many_forwards("scorecam"), many_forwards("gradcam")
    (True, False)
    """
    chunk = camfn.METHODS[method].spec.options.get("chunk_size")
    return chunk is not None and chunk.default == "auto"


def last_module(model: nn.Module, path: str) -> nn.Module:
    """grad-cam's usual target: the last block of a Sequential (``model.layer4[-1]``), else the module."""
    module = model.get_submodule(path)
    return module[-1] if isinstance(module, nn.Sequential) and len(module) else module


# ------------------------------------------------------------------------------------------ memory
def status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1))


@functools.cache
def _trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (freed heap memory back to the system), or a no-op elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: 0


def settle() -> int:
    """Collect garbage, trim the heap; the resident set size in KiB."""
    gc.collect()
    _trim()(0)
    return status("VmRSS")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def can_reset_peak() -> bool:
    """Whether :func:`reset_peak` works here (``/proc/self/clear_refs`` writable, ``VmHWM`` readable)."""
    try:
        reset_peak()
        status("VmHWM")
    except OSError:
        return False
    return True


def mib(kib: float) -> float:
    return kib / 1024


class Meter:
    """Times one call and, with ``clear_refs``, its peak resident memory above the RSS before it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, object, float | None]:
        before = settle() if self.enabled else 0
        if self.enabled:
            reset_peak()
        seconds, cpu_seconds, out = timed(fn, torch.device("cpu"))
        peak = mib(status("VmHWM") - before) if self.enabled else None
        return seconds, cpu_seconds, out, peak
