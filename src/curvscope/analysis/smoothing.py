"""Smoothed pictures of an SLQ density: two published conventions and the log|lambda| density.

Everything here works on the stored quadrature (per-probe Ritz values and weights) of a
:class:`~curvscope.linalg.SpectralDensity`, so a new convention or kernel width never needs new
operator products; the kernel is :func:`curvscope.linalg.density.gaussian_mixture`.

* :func:`smoothed_density`: Ghorbani, Krishnan & Xiao 2019 (google/spectral-density) and
  Papyan 2020 (``LanczosApproxSpec``, JMLR §D.2).
* :func:`log_abs_density`: the density of log10|lambda| for spectra spanning many decades.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..linalg.density import SpectralDensity, gaussian_mixture

Convention = Literal["ghorbani", "papyan"]

#: Papyan 2020 §D.2: kappa = 3 in sigma = 2 / (M - 1) / sqrt(8 ln kappa), margin 5 %. His
#: released code (deep-lab/DeepnetHessian hessian.py) hard-codes kappa = 1.25, a 2.22x wider
#: kernel; we follow the paper (docs/structure.md, smoothing conventions).
PAPYAN_KAPPA = 3.0
PAPYAN_MARGIN = 0.05


def papyan_map(d: SpectralDensity, margin: float = PAPYAN_MARGIN) -> tuple[float, float]:
    """Centre c and half-width h of Papyan's map t = (lambda - c) / h onto [-1, 1].

    The interval is [lambda_min, lambda_max] (the extreme Ritz values over all probes) widened
    by ``margin`` times its width on each side (Papyan 2020, Algorithm ``LanczosApproxSpec``,
    §D.2: "5% margin"). A zero-width spectrum gets half-width max(1, |lambda|) * 1e-3 so the map
    stays defined.
    """
    lo, hi = d.lambda_min, d.lambda_max
    width = hi - lo
    lo, hi = lo - margin * width, hi + margin * width
    half = (hi - lo) / 2.0
    if half <= 0:
        half = 1e-3 * max(1.0, abs(lo))
    return (hi + lo) / 2.0, half


def papyan_sigma(num_steps: int, kappa: float = PAPYAN_KAPPA) -> float:
    """Papyan's kernel width in normalised units: sigma = 2 / (M - 1) / sqrt(8 ln kappa).

    M is the number of Lanczos steps (nodes per probe); kappa = 3 (Papyan 2020, §D.2): each
    Gaussian falls to 1/kappa of its peak at half the spacing 2 / (M - 1). Papyan's code uses
    kappa = 1.25 (``Hessian.LanczosLoop`` in deep-lab/DeepnetHessian), a sqrt(ln 3 / ln 1.25)
    = 2.22x wider kernel; pass it here to draw his code's curves.
    """
    if num_steps < 2:
        raise ValueError(
            f"Papyan's kernel width 2/(M-1)/sqrt(8 ln 3) needs M >= 2 Lanczos steps, got "
            f"M = {num_steps}: run spectral_density with num_iters >= 2"
        )
    if kappa <= 1:
        raise ValueError(f"kappa must exceed 1, got {kappa}")
    return 2.0 / (num_steps - 1) / math.sqrt(8.0 * math.log(kappa))


def smoothed_density(
    d: SpectralDensity,
    convention: Convention = "ghorbani",
    grid: np.ndarray | None = None,
    num: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed eigenvalue density in natural units, in one of two conventions.

    * ``"ghorbani"`` (Ghorbani, Krishnan & Xiao 2019; google/spectral-density ``density.py``):
      kernel *variance* 1e-5 * max(1, lambda_max - lambda_min) in natural units, as
      :meth:`SpectralDensity.density` by default. Default grid: :meth:`SpectralDensity.grid`.
      The paper plots it on a log y-axis.
    * ``"papyan"`` (Papyan 2020, ``LanczosApproxSpec``, §D.2): the spectrum is mapped to
      [-1, 1] by t = (lambda - c) / h from the extreme Ritz values widened by a 5% margin of
      the width on each side (:func:`papyan_map`); each node gets a Gaussian of standard
      deviation sigma_t = 2 / (M - 1) / sqrt(8 ln 3) in t (M = Lanczos steps); the density is
      returned in lambda with the Jacobian dt/dlambda = 1/h, i.e. a Gaussian of standard
      deviation h * sigma_t in lambda. Default grid: Papyan's interval [c - h, c + h], widened
      where needed so that the Gaussians of the extreme nodes are whole (5 sigma).

    Args:
        d: The SLQ result.
        convention: "ghorbani" or "papyan".
        grid: Points lambda in natural units, shape (g,); default as above.
        num: Number of points of the default grid.

    Returns:
        (grid, density), each of shape (g,); density in 1/(units of lambda), integrating to 1
        over the line (to the grid's resolution when the grid covers the spectrum).

    Example:
        >>> import numpy as np
        >>> from curvscope import spectral_density
        >>> from curvscope.analysis import smoothed_density
        >>> values = np.r_[np.linspace(0.0, 1.0, 50), 10.0]
        >>> density = spectral_density(np.diag(values), num_iters=20, num_probes=3)
        >>> for convention in ("ghorbani", "papyan"):
        ...     grid, p = smoothed_density(density, convention)
        ...     print(convention, grid.shape, round(float(np.trapezoid(p, grid)), 3))
        ghorbani (10000,) 1.0
        papyan (10000,) 1.0
    """
    if convention == "ghorbani":
        if grid is None:
            grid = d.grid(num)
        return d.density(grid)
    if convention != "papyan":
        raise ValueError(f"convention must be 'ghorbani' or 'papyan', not {convention!r}")
    centre, half = papyan_map(d)
    sigma_t = papyan_sigma(int(np.max(d.num_steps)))
    if grid is None:
        lo = min(centre - half, d.lambda_min - 5.0 * sigma_t * half)
        hi = max(centre + half, d.lambda_max + 5.0 * sigma_t * half)
        grid = np.linspace(lo, hi, num)
    grid = np.asarray(grid, dtype=np.float64)
    # Smooth in normalised units t, then p(lambda) = p_t(t(lambda)) * dt/dlambda.
    nodes, weights = d.flat()
    t_nodes = (nodes - centre) / half
    t_grid = (grid - centre) / half
    p_t = gaussian_mixture(t_grid, t_nodes, weights, sigma_t)
    return grid, p_t / half


@dataclass(frozen=True)
class LogAbsDensity:
    """Density of t = log10|lambda| from the SLQ quadrature.

    Attributes:
        grid: Points t in decades, shape (g,).
        density: Density of t over all kept nodes, shape (g,), in 1/decade; it integrates to
            ``1 - dropped_mass``.
        density_positive: The part from positive nodes, shape (g,).
        density_negative: The part from negative nodes (plotted at log10|lambda|), shape (g,);
            ``density_positive + density_negative == density``.
        sigma: Kernel standard deviation in decades.
        threshold: Nodes with |lambda| <= threshold were dropped (natural units).
        dropped_mass: Quadrature mass of the dropped near-zero nodes.
    """

    grid: np.ndarray
    density: np.ndarray
    density_positive: np.ndarray
    density_negative: np.ndarray
    sigma: float
    threshold: float
    dropped_mass: float


def log_abs_density(
    d: SpectralDensity,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    eps: float = 1e-8,
    num: int = 10_000,
) -> LogAbsDensity:
    """Density of log10|lambda| for spectra that span many decades.

    Each quadrature node moves to t = log10|lambda| and keeps its weight (a change of variable
    of the discrete measure, so no Jacobian enters); the moved measure is then smoothed with a
    Gaussian in t. Papyan 2020 §C.7 takes log(|lambda| + eps) instead, which piles all
    near-zero eigenvalues at log(eps); here nodes with |lambda| <= eps * max|lambda| are dropped
    and their quadrature mass is reported as ``dropped_mass`` (the density then integrates to
    ``1 - dropped_mass``), so the picture shows only resolved scales and says how much it left
    out.

    Args:
        d: The SLQ result.
        grid: Points t in decades, shape (g,); default from the smallest kept t to the
            largest, widened by 5 sigma on each side.
        sigma: Kernel standard deviation in decades; default Ghorbani et al.'s rule applied
            in t: sqrt(1e-5 * max(1, t_max - t_min)).
        eps: Relative threshold under which nodes count as zero.
        num: Number of points of the default grid.

    Returns:
        :class:`LogAbsDensity`.
    """
    nodes, weights = d.flat()
    scale = float(np.max(np.abs(nodes))) if nodes.size else 0.0
    threshold = eps * scale
    keep = np.abs(nodes) > threshold
    dropped = float(np.sum(weights[~keep]))
    if not np.any(keep):
        raise ValueError(
            "every node is within eps * max|lambda| of zero (or the operator is zero): "
            "there is no log-scale density to draw; lower eps"
        )
    t = np.log10(np.abs(nodes[keep]))
    w = weights[keep]
    positive = nodes[keep] > 0
    t_min, t_max = float(t.min()), float(t.max())
    if sigma is None:
        sigma = math.sqrt(1e-5 * max(1.0, t_max - t_min))
    sigma = float(sigma)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        grid = np.linspace(t_min - 5 * sigma, t_max + 5 * sigma, num)
    grid = np.asarray(grid, dtype=np.float64)
    dens_pos = gaussian_mixture(grid, t[positive], w[positive], sigma)
    dens_neg = gaussian_mixture(grid, t[~positive], w[~positive], sigma)
    return LogAbsDensity(grid, dens_pos + dens_neg, dens_pos, dens_neg, sigma, threshold, dropped)
