"""Localisation and faithfulness of every camfn method on the shapes benchmark, against two baselines.

Run from the repository root::

    nice -n 10 python -m benchmarks.quality                 # 256 test images
    nice -n 10 python -m benchmarks.quality --quick         # 64 test images, coarser curves
    nice -n 10 python -m benchmarks.quality --markdown benchmarks/results/quality.md

What is measured: the shipped model (``camfn.shapes.load()``) on the test split
(``camfn.shapes.make(n, seed=camfn.shapes.TEST_SEED)``), each map explaining the ground-truth class at
``camfn.shapes.LAYER`` with camfn's default output (ReLU, bilinear resize to 64 x 64, min-max). Metrics from
``camfn.metrics``, averaged over the images:

- pointing game (``pointing_game``, tolerance ``shapes.tolerance(64)`` = 4 px, i.e. 15 px at 224 px) and
  energy pointing game (``energy_pointing_game``, share of map mass inside the object's box): higher is better;
- deletion AUC (pixels set to 0, the dataset mean after normalisation; lower is better) and insertion AUC
  (from a Gaussian blur of std 5 px; higher is better), ``--steps`` increments;
- average drop (``average_drop``, in %; lower is better) and increase in confidence (%; higher is better).

Baselines: ``random`` (i.i.d. uniform pixels, seeded) and ``centre`` (an isotropic Gaussian of std
``size / 4`` at the image centre, the same for every image).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import camfn
from camfn import metrics, shapes

# Fewer noise samples / bigger chunks than the defaults, to keep the run to minutes on 2 CPU cores.
OPTIONS: dict[str, dict] = {
    "smooth_gradcampp": {"n": 4},
    "ablationcam": {"chunk_size": 256},
    "scorecam": {"chunk_size": 256},
    "sscam": {"n": 4, "chunk_size": 256},
    "iscam": {"n": 4, "chunk_size": 256},
}
COLUMNS = ("pointing game ↑", "energy PG ↑", "deletion AUC ↓", "insertion AUC ↑", "avg drop % ↓", "increase % ↑")


def random_map(x: Tensor, seed: int = 0) -> Tensor:
    """Baseline: i.i.d. uniform pixels ``(B, H, W)``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape[0], *x.shape[2:], generator=g)


def centre_map(x: Tensor) -> Tensor:
    """Baseline: ``exp(-((r - c)^2 + (q - c)^2) / (2 s^2))`` with ``s = size / 4``, the same for every image."""
    h, w = x.shape[2:]
    rows = torch.arange(h) + 0.5 - h / 2
    cols = torch.arange(w) + 0.5 - w / 2
    sigma = min(h, w) / 4
    g = torch.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * sigma**2))
    return g.expand(x.shape[0], h, w).contiguous()


def explainers() -> dict[str, Callable[[torch.nn.Module, dict, Tensor, Tensor], Tensor]]:
    """Every method in ``camfn.METHODS`` (with :data:`OPTIONS`) and the two baselines, by name."""
    table: dict[str, Callable] = {}
    for name, fn in camfn.METHODS.items():
        options = OPTIONS.get(name, {})
        table[name] = lambda m, p, x, y, fn=fn, options=options: fn(m, p, x, shapes.LAYER, y, **options)
    table["random (baseline)"] = lambda m, p, x, y: random_map(x)
    table["centre (baseline)"] = lambda m, p, x, y: centre_map(x)
    return table


def score(model: torch.nn.Module, p: dict, batch: shapes.Batch, maps: Tensor, steps: int) -> dict[str, Tensor]:
    """Per-image values of every column for one batch of maps."""
    x, y, boxes = batch.images, batch.labels, batch.boxes
    return {
        COLUMNS[0]: metrics.pointing_game(maps, boxes, tolerance=shapes.tolerance(x.shape[-1])).float(),
        COLUMNS[1]: metrics.energy_pointing_game(maps, boxes),
        COLUMNS[2]: metrics.deletion(model, p, x, maps, y, steps=steps, chunk_size=512).auc,
        COLUMNS[3]: metrics.insertion(model, p, x, maps, y, steps=steps, chunk_size=512).auc,
        COLUMNS[4]: 100 * metrics.average_drop(model, p, x, maps, y),
        COLUMNS[5]: 100 * metrics.increase_in_confidence(model, p, x, maps, y),
    }


def evaluate(n: int, batch_size: int, steps: int) -> tuple[dict[str, dict[str, float]], dict[str, float], float]:
    """Mean of every column per method, seconds per method, and the model's accuracy on the split."""
    model = shapes.load()
    p = camfn.params(model)
    test = shapes.make(n, seed=shapes.TEST_SEED)
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name, explain in explainers().items():
        sums = dict.fromkeys(COLUMNS, 0.0)
        start, spent = time.perf_counter(), 0.0
        for lo in range(0, n, batch_size):
            part = shapes.Batch(*(t[lo : lo + batch_size] for t in test))
            t0 = time.perf_counter()
            maps = explain(model, p, part.images, part.labels)
            spent += time.perf_counter() - t0
            for column, values in score(model, p, part, maps, steps).items():
                sums[column] += float(values.sum())
        results[name] = {column: total / n for column, total in sums.items()}
        seconds[name] = spent
        print(f"{name:<22} done in {time.perf_counter() - start:5.1f}s", file=sys.stderr, flush=True)
    return results, seconds, accuracy


def markdown(results: dict[str, dict[str, float]], n: int, steps: int, accuracy: float, command: str) -> str:
    """The results as a markdown table, with what was run and how to reproduce it."""
    lines = [
        f"Shapes benchmark, {n} test images (64 x 64, `camfn.shapes.TEST_SEED`), model `camfn.shapes.load()` "
        f"(test accuracy {accuracy:.3f}), layer `{shapes.LAYER}`, target: the true class. "
        f"Pointing-game tolerance {shapes.tolerance(64)} px; deletion/insertion with {steps} steps. "
        "Options that differ from the defaults: "
        + ", ".join(f"`{k}` {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in OPTIONS.items())
        + ".",
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, row in results.items():
        cells = [f"{row[c]:.3f}" if "%" not in c else f"{row[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    random_pg = results["random (baseline)"][COLUMNS[0]]
    centre_pg = results["centre (baseline)"][COLUMNS[0]]
    methods = [k for k in results if "baseline" not in k]
    below_random = [k for k in methods if results[k][COLUMNS[0]] <= random_pg]
    below_centre = {
        c: [k for k in methods if _worse(results[k][c], results["centre (baseline)"][c], c)] for c in COLUMNS
    }
    lines += ["", f"Pointing game: random map {random_pg:.3f}, centre map {centre_pg:.3f}."]
    lines.append(
        "Methods not above the random map on pointing game: "
        + (", ".join(below_random) if below_random else "none")
        + "."
    )
    for column, names in below_centre.items():
        if names:
            lines.append(f"Not better than the centre baseline on {column.rstrip(' ↑↓')}: {', '.join(names)}.")
    noise = results["random (baseline)"]
    for column in COLUMNS[1:]:
        names = [k for k in methods if _worse(results[k][column], noise[column], column)]
        if names:
            lines.append(f"Not better than the random map on {column.rstrip(' ↑↓')}: {', '.join(names)}.")
    return "\n".join(lines) + "\n"


def _worse(value: float, baseline: float, column: str) -> bool:
    """``value`` is no better than ``baseline`` for this column's direction (ties count as not better)."""
    if math.isnan(value):
        return True
    return value >= baseline if column.endswith("↓") else value <= baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="test images")
    parser.add_argument("--steps", type=int, default=16, help="deletion / insertion increments")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 images, 8 steps")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps = 64, 8
    torch.set_num_threads(args.threads)
    results, seconds, accuracy = evaluate(args.n, args.batch, args.steps)
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else f" --n {args.n} --steps {args.steps}")
    text = markdown(results, args.n, args.steps, accuracy, command)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)
    print("seconds computing the maps: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
