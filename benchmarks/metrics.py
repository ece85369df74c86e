"""Speed of camfn's perturbation metrics against Quantus 0.6: deletion, insertion and ROAD, one process, same data.

Run from the repository root::

    python -m benchmarks.metrics                  # 64 shapes images at 64 px, 9 ROAD fractions (~1 minute)
    python -m benchmarks.metrics --markdown       # also write benchmarks/results/metrics.md

What is measured, on the shipped shapes model (``camfn.shapes.load()``, float32, eval) and ``--n`` test images
(``camfn.shapes.TEST_SEED``) with their Grad-CAM maps at ``camfn.shapes.LAYER``, the true class as target:

1. ROAD, fractions 0.1..0.9 (MoRF), noise 0.01: ``camfn.metrics.road`` in one call of all images (default
   ``chunk_size="auto"``, the direct sparse solver), in calls of 8 images, and with ``solver="cg"`` (the earlier
   conjugate-gradient solver) on the first 8 images; against Quantus 0.6 ``ROAD``'s loop: per fraction, its
   ``noisy_linear_imputation`` on each image then one forward of the batch. Quantus's own ``ROAD`` cannot run
   here: it broadcasts the map to every channel and indexes the ``H*W`` pixel mask with ``C*H*W`` feature
   indices (``IndexError`` on RGB), so its loop is rerun with pixel indices. The scores are compared at noise 0
   (max absolute difference of the class probabilities).
2. Deletion, 32 steps, baseline 0: ``camfn.metrics.deletion`` against Quantus ``PixelFlipping`` with
   ``features_in_step = H*W / 32`` (the same 32 perturbed forwards; Quantus orders the map broadcast to every
   channel and has no unperturbed point, so its curve differs slightly).
3. Insertion, 32 steps, blur 5: camfn only (Quantus 0.6 has no insertion metric).

Each case runs once untimed (tracing, imports), then ``--repeats`` times; the minimum wall time is reported
with the ratio Quantus / camfn. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import camfn
from camfn import metrics, shapes

from .speed import write_report

RESULTS = "benchmarks/results/metrics.md"
FRACTIONS = tuple(f / 10 for f in range(1, 10))


def best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def quantus_road(
    model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, y: torch.Tensor, noise: float
) -> torch.Tensor:
    """Quantus 0.6 ROAD's loop with pixel indices: class probabilities ``(B, F)``."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    xs, order = x.numpy(), np.argsort(-maps.flatten(1).numpy(), axis=1, kind="stable")
    pixels = maps[0].numel()
    scores = []
    for f in FRACTIONS:
        k = int(np.floor(f * pixels + 0.5))
        batch = np.stack(
            [noisy_linear_imputation(arr=xi, indices=oi[:k], noise=noise) for xi, oi in zip(xs, order, strict=True)]
        )
        with torch.no_grad():
            out = model(torch.as_tensor(batch, dtype=x.dtype)).softmax(1)
        scores.append(out.gather(1, y[:, None])[:, 0])
    return torch.stack(scores, 1)


def quantus_deletion(
    model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, y: torch.Tensor, steps: int
) -> object:
    import quantus

    metric = quantus.PixelFlipping(features_in_step=maps[0].numel() // steps, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True)  # fmt: skip
    return metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), device="cpu",
                  softmax=True)  # fmt: skip


def run(n: int, repeats: int) -> str:
    torch.manual_seed(0)
    model = shapes.load()
    p = camfn.params(model)
    data = shapes.make(n, seed=shapes.TEST_SEED)
    x, y = data.images, data.labels
    maps = camfn.gradcam(model, p, x, shapes.LAYER, y)
    rows = []

    def road_chunks(size: int) -> torch.Tensor:
        parts = [
            metrics.road(model, p, x[i : i + size], maps[i : i + size], y[i : i + size], fractions=FRACTIONS).scores
            for i in range(0, n, size)
        ]
        return torch.cat(parts)

    t_one, _ = best(lambda: metrics.road(model, p, x, maps, y, fractions=FRACTIONS), repeats)
    t_eight, _ = best(lambda: road_chunks(8), repeats)
    t_q, _ = best(lambda: quantus_road(model, x, maps, y, 0.01), repeats)
    t_cg, _ = best(lambda: metrics.road(model, p, x[:8], maps[:8], y[:8], fractions=FRACTIONS, solver="cg"), 1)
    ours = metrics.road(model, p, x, maps, y, fractions=FRACTIONS, noise=0.0).scores
    diff = float((ours - quantus_road(model, x, maps, y, 0.0)).abs().max())
    rows.append(("ROAD, one call of all images", t_one, t_q))
    rows.append(("ROAD, calls of 8 images", t_eight, t_q))
    rows.append(("ROAD, solver='cg', first 8 images only", t_cg, None))
    t_del, _ = best(lambda: metrics.deletion(model, p, x, maps, y, steps=32), repeats)
    t_qdel, _ = best(lambda: quantus_deletion(model, x, maps, y, 32), repeats)
    rows.append(("deletion, 32 steps", t_del, t_qdel))
    t_ins, _ = best(lambda: metrics.insertion(model, p, x, maps, y, steps=32), repeats)
    rows.append(("insertion, 32 steps", t_ins, None))
    lines = [
        f"{n} shapes test images at 64 x 64, model `camfn.shapes.load()`, Grad-CAM maps at `{shapes.LAYER}`, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); minimum of {repeats} timed calls; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end.",
        "",
        f"Reproduce: `python -m benchmarks.metrics --n {n} --repeats {repeats} --markdown`",
        "",
        "| case | camfn s | Quantus 0.6 s | Quantus / camfn |",
        "|---|---:|---:|---:|",
    ]
    for name, ours_t, theirs in rows:
        ratio = f"{theirs / ours_t:.1f}x" if theirs else "-"
        lines.append(f"| {name} | {ours_t:.2f} | {f'{theirs:.2f}' if theirs else '-'} | {ratio} |")
    lines += [
        "",
        f"ROAD scores at noise 0, camfn vs Quantus's imputation: max |difference| {diff:.1e}.",
        "Quantus's ROAD loop is rerun with pixel indices (its own ROAD raises IndexError on RGB input); Quantus "
        "has no insertion; its deletion is PixelFlipping with the same number of forwards.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per case (default: %(default)s)")
    parser.add_argument("--markdown", action="store_true", help=f"write {RESULTS}")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    text = run(args.n, args.repeats)
    print(text)
    if args.markdown:
        write_report(RESULTS, "Metrics: camfn against Quantus 0.6", text)


if __name__ == "__main__":
    sys.exit(main())
