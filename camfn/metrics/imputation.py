r"""Noisy linear imputation (Rong et al., ROAD, ICML 2022): the solver behind :func:`camfn.metrics.road`.

Each removed pixel is the weighted mean of its in-image 8 neighbours (1/6 for the 4 direct, 1/12 for the 4
diagonal ones, renormalised at the border), removed neighbours being unknowns too. The system is a Dirichlet
graph Laplacian (symmetric positive definite); two solvers give the same values (to the CG tolerance):

* ``"direct"`` (default where scipy is installed): all masks of a call as one block-diagonal sparse matrix,
  built vectorised, factorised by SuperLU (``scipy.sparse.linalg.splu``) in groups of 8 masks and solved for
  every channel at once. Cost grows linearly with the number of masks, so large chunks are not slower per image.
* ``"cg"``: matrix-free conjugate gradients with 3x3 convolutions, started from the half-resolution solution
  (pure torch, any device; used where scipy is missing, and on MPS in float32).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, OptionError
from ..noise import Seed, gaussian

__all__ = ["impute"]

Solver = Literal["auto", "direct", "cg"]

COARSE_TOL = 1e-3  # the half-resolution CG solve is only a starting point
NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
DIRECT_GROUP = 8  # masks per sparse factorisation (larger blocks order worse: measured 1.4x slower at 72)
_OFFSETS = tuple((dr, dc, NEIGHBOURS[dr + 1][dc + 1]) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)


def _solver_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


# ------------------------------------------------------------------------------------------ direct
def _direct(known: Tensor, removed: Tensor) -> Tensor:
    """:func:`_direct_group` on groups of ``DIRECT_GROUP`` masks (one factorisation each: flat cost per mask)."""
    parts = [
        _direct_group(known[i : i + DIRECT_GROUP], removed[i : i + DIRECT_GROUP])
        for i in range(0, len(known), DIRECT_GROUP)
    ]
    return torch.cat(parts)


def _direct_group(known: Tensor, removed: Tensor) -> Tensor:
    """Removed pixels' values ``(N, C, H, W)`` (0 elsewhere) by one sparse LU of the block-diagonal system.

    ``known``: ``(N, C, H, W)`` float64 images with removed pixels zeroed; ``removed``: ``(N, H, W)`` bool.
    Masks with every pixel removed have nothing to interpolate from and give 0.
    """
    import numpy as np
    import scipy.sparse
    import scipy.sparse.linalg

    c, h, w = known.shape[1:]
    out = torch.zeros_like(known)
    solvable = removed.flatten(1).any(1) & ~removed.flatten(1).all(1)
    if not bool(solvable.any()):
        return out
    mask = removed[solvable].cpu()
    img = known[solvable].cpu()
    m = mask.shape[0]
    flat = mask.reshape(-1)
    ids = torch.full((flat.numel(),), -1, dtype=torch.long)
    count = int(flat.sum())
    ids[flat] = torch.arange(count)
    ids = ids.reshape(m, h, w)
    sample, row, col = mask.nonzero(as_tuple=True)
    me = ids[sample, row, col]
    diagonal = torch.zeros(count, dtype=torch.float64)
    rhs = torch.zeros(count, c, dtype=torch.float64)
    rows, cols, vals = [me], [me], []
    for dr, dc, weight in _OFFSETS:
        r, q = row + dr, col + dc
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        s, r, q, i = sample[inside], r[inside], q[inside], me[inside]
        diagonal.index_add_(0, i, torch.full((i.numel(),), weight, dtype=torch.float64))
        other = mask[s, r, q]
        rows.append(i[other])
        cols.append(ids[s[other], r[other], q[other]])
        vals.append(torch.full((int(other.sum()),), -weight, dtype=torch.float64))
        k = ~other
        rhs.index_add_(0, i[k], weight * img[s[k], :, r[k], q[k]])
    data = torch.cat([diagonal, *vals]).numpy()
    matrix = scipy.sparse.csc_matrix(
        (data, (torch.cat(rows).numpy(), torch.cat(cols).numpy())), shape=(count, count), dtype=np.float64
    )
    lu = scipy.sparse.linalg.splu(
        matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
    )
    values = lu.solve(rhs.numpy())
    values = torch.from_numpy(np.ascontiguousarray(values)).reshape(count, c)
    filled = torch.zeros(m, h, w, c, dtype=torch.float64)
    filled[sample, row, col] = values
    out[solvable] = filled.permute(0, 3, 1, 2).to(out.device)
    return out


# ---------------------------------------------------------------------------------------------- CG
def _conjugate_gradient(known: Tensor, u: Tensor, v: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """Solve the imputation system for the removed pixels ``u`` (``(N, 1, H, W)``) by CG, starting at ``v``."""
    h, w = u.shape[-2:]
    kernel = torch.tensor(NEIGHBOURS, dtype=u.dtype, device=u.device).reshape(1, 1, 3, 3)

    def neighbours(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, padding=1)

    weight = neighbours(torch.ones(1, 1, h, w, dtype=u.dtype, device=u.device))

    def system(t: Tensor) -> Tensor:
        return u * (weight * t - neighbours(u * t))

    b = u * neighbours(known)
    v = u * v
    r = b - system(v)
    direction = r.clone()
    rs = (r * r).sum((1, 2, 3), keepdim=True)
    stop = (tol**2) * (b * b).sum((1, 2, 3), keepdim=True)
    for _ in range(h * w if max_iter is None else max_iter):
        if bool((rs <= stop).all()):
            break
        step = system(direction)
        curvature = (direction * step).sum((1, 2, 3), keepdim=True)
        alpha = torch.where(curvature > 0, rs / torch.where(curvature > 0, curvature, 1.0), 0.0)
        v = v + alpha * direction
        r = r - alpha * step
        new = (r * r).sum((1, 2, 3), keepdim=True)
        direction = r + torch.where(rs > 0, new / torch.where(rs > 0, rs, 1.0), 0.0) * direction
        rs = new
    return v


def _harmonic_fill(known: Tensor, u: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """Values of the removed pixels: CG started from the (recursively solved) half-resolution problem."""
    h, w = u.shape[-2:]
    start = torch.zeros_like(u)
    if min(h, w) >= 16 and bool((u > 0).any()) and bool((u < 1).any()):
        kept = 1 - u
        count = F.avg_pool2d(kept, 2, ceil_mode=True, divisor_override=1)
        total = F.avg_pool2d(known, 2, ceil_mode=True, divisor_override=1)
        coarse_u = (count == 0).to(u.dtype)
        coarse_known = torch.where(count > 0, total / count.clamp_min(1), 0.0)
        coarse = coarse_known + coarse_u * _harmonic_fill(coarse_known, coarse_u, max(tol, COARSE_TOL), max_iter)
        start = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return _conjugate_gradient(known, u, start, tol, max_iter)


def _pick_solver(solver: Solver, x: Tensor) -> str:
    if solver not in ("auto", "direct", "cg"):
        raise OptionError(f"solver={solver!r}: use 'auto', 'direct' (scipy sparse LU) or 'cg' (torch, any device)")
    has_scipy = importlib.util.find_spec("scipy") is not None
    if solver == "direct" and not has_scipy:
        raise OptionError("solver='direct' needs scipy (pip install scipy); use solver='cg' without it")
    if solver == "auto":
        return "direct" if has_scipy and x.device.type != "mps" else "cg"
    return solver


def impute(
    x: Tensor,
    mask: Tensor,
    *,
    noise: float = 0.01,
    seed: Seed = 0,
    solver: Solver = "auto",
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    r"""Noisy linear imputation (Rong et al., ROAD, 2022) of the pixels where ``mask`` is True.

    .. math:: \Big(\sum_{j \in N(i)} w_{ij}\Big) v_i - \sum_{j \in N(i) \cap R} w_{ij} v_j
              = \sum_{j \in N(i) \setminus R} w_{ij} x_j, \quad i \in R; \qquad
              \hat x_i = v_i + \varepsilon_i, \ \varepsilon_i \sim N(0, \text{noise}^2)

    ``w`` is 1/6 for the 4 direct and 1/12 for the 4 diagonal in-image neighbours. ``solver``: ``"direct"``
    (sparse LU in float64, exact; the default when scipy is importable), ``"cg"`` (conjugate gradients in
    float64, float32 on MPS, to a relative residual ``tol``, at most ``max_iter`` iterations, default ``H * W``)
    or ``"auto"``. When every pixel is removed the values are 0 (plus noise). Noise comes from ``seed`` (an
    int or a ``torch.Generator``) via :func:`camfn.noise.gaussian`, one draw of shape ``x.shape[1:]`` shared by
    the batch, so a sample's result does not depend on the rest of the batch. Kept pixels are unchanged.

    Args:
        x: images ``(B, C, H, W)``, or ``(..., B, C, H, W)``.
        mask: removed pixels, ``(B, H, W)`` or ``(..., B, H, W)`` bool.

    Example:
        >>> import torch
        >>> from camfn.metrics import impute
        >>> ramp = torch.arange(5.0).expand(1, 1, 5, 5)  # x_ij = j is harmonic: reproduced exactly
        >>> mask = torch.zeros(1, 5, 5, dtype=torch.bool)
        >>> mask[:, 1:4, 1:4] = True
        >>> bool(torch.allclose(impute(ramp, mask, noise=0.0), ramp))
        True
    """
    if not isinstance(x, Tensor) or not isinstance(mask, Tensor):
        raise InputError("impute needs tensors: images (..., B, C, H, W) and a bool mask (..., B, H, W)")
    if x.ndim < 4 or mask.shape != (*x.shape[:-3], *x.shape[-2:]):
        raise InputError(
            f"impute needs images (..., B, C, H, W) and a mask (..., B, H, W); got {tuple(x.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise OptionError(f"noise={noise!r}: use a standard deviation >= 0")
    mask = mask.to(torch.bool)
    h, w = x.shape[-2:]
    c = x.shape[-3]
    dtype = _solver_dtype(x)
    if _pick_solver(solver, x) == "direct":
        flat_mask = mask.reshape(-1, h, w)
        known = x.reshape(-1, c, h, w).to(torch.float64) * ~flat_mask.unsqueeze(1)
        filled = (known + _direct(known, flat_mask)).reshape(x.shape).to(x.dtype)
    else:
        u = mask.unsqueeze(-3).expand(x.shape).reshape(-1, 1, h, w).to(dtype)
        known = x.reshape(-1, 1, h, w).to(dtype) * (1 - u)
        v = _harmonic_fill(known, u, tol, max_iter)
        filled = (known + u * v).reshape(x.shape).to(x.dtype)
    if noise > 0:
        eps = gaussian(x.shape[-3:], std=noise, seed=seed, dtype=x.dtype, device=x.device)
        filled = filled + mask.unsqueeze(-3).to(x.dtype) * eps
    return torch.where(mask.unsqueeze(-3), filled, x)
