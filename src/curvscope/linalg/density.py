"""The spectral density result of stochastic Lanczos quadrature (SLQ).

Keeps the raw quadrature (per-probe Ritz values and weights) and derives densities from it, so
smoothing with another width needs no new products.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..results import ResultFile, save_result


def ghorbani_variance(lambda_min: float, lambda_max: float) -> float:
    """Gaussian kernel *variance* 1e-5 * max(1, lambda_max - lambda_min).

    The default of Ghorbani, Krishnan & Xiao 2019 (google/spectral-density, density.py).
    """
    return 1e-5 * max(1.0, lambda_max - lambda_min)


def gaussian_mixture(
    x: np.ndarray, centres: np.ndarray, weights: np.ndarray, sigma: float, chunk: int = 2048
) -> np.ndarray:
    """Weighted sum of Gaussians sum_i weights[i] N(x; centres[i], sigma^2) at the points x.

    The one smoothing kernel of curvscope: :meth:`SpectralDensity.density` and the
    conventions of :mod:`curvscope.analysis.smoothing` all call it.

    Args:
        x: Points, shape (g,).
        centres: Gaussian means (quadrature nodes), shape (c,).
        weights: Their weights, shape (c,); the result integrates to ``weights.sum()``.
        sigma: Standard deviation, in the units of x.
        chunk: Points evaluated at once (bounds memory to chunk x c).

    Returns:
        The mixture at x, shape (g,), float64.

    Example:
        One standard Gaussian, at its centre and one sigma away:

        >>> import numpy as np
        >>> from curvscope.linalg.density import gaussian_mixture
        >>> p = gaussian_mixture(np.array([0.0, 1.0]), np.array([0.0]), np.array([1.0]), 1.0)
        >>> p.round(6).tolist()
        [0.398942, 0.241971]
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    for start in range(0, x.size, chunk):
        block = x[start : start + chunk, None]
        out[start : start + chunk] = norm * (
            np.exp(-0.5 * ((block - centres[None, :]) / sigma) ** 2) @ weights
        )
    return out


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature of a symmetric operator's eigenvalue density from SLQ.

    The estimated spectral measure is (1/P) sum_p sum_i weights[p, i] delta(x - nodes[p, i]):
    each probe's Gauss quadrature has weights summing to 1.

    Attributes:
        nodes: Ritz values, shape (P, m); NaN past ``num_steps[p]``.
        weights: Squared first components of the Ritz vectors, shape (P, m); 0 past
            ``num_steps[p]``.
        num_steps: Lanczos steps per probe (fewer than m after a breakdown), shape (P,).
        n: Dimension of the operator.
        meta: Metadata: dtype, iterations, probes, seed, versions, wall time, ...
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_steps: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_probes(self) -> int:
        """Number of probes P."""
        return int(self.nodes.shape[0])

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """All probes' (nodes, weights) as one measure of total mass 1 (finite nodes only)."""
        mask = np.isfinite(self.nodes)
        return self.nodes[mask], self.weights[mask] / self.num_probes

    @property
    def lambda_min(self) -> float:
        """Smallest Ritz value over all probes (an upper bound of the true minimum)."""
        return float(np.nanmin(self.nodes))

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over all probes (a lower bound of the true maximum)."""
        return float(np.nanmax(self.nodes))

    def default_variance(self) -> float:
        """Ghorbani et al.'s kernel variance 1e-5 * max(1, lambda_max - lambda_min)."""
        return ghorbani_variance(self.lambda_min, self.lambda_max)

    def grid(self, num: int = 10_000, margin: float | None = None) -> np.ndarray:
        """Evenly spaced grid over [lambda_min, lambda_max] widened by ``margin`` each side.

        Default margin: 5 kernel widths, so the edge Gaussians are whole.
        """
        if margin is None:
            margin = 5.0 * float(np.sqrt(self.default_variance()))
        return np.linspace(self.lambda_min - margin, self.lambda_max + margin, num)

    def density(
        self,
        grid: np.ndarray | None = None,
        sigma: float | None = None,
        chunk: int = 2048,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-smoothed density on ``grid``.

        Args:
            grid: Points x, shape (g,); default :meth:`grid`.
            sigma: Kernel standard deviation; default sqrt of Ghorbani et al.'s variance
                1e-5 * max(1, lambda_max - lambda_min).
            chunk: Grid points evaluated at once (bounds memory to chunk x P x m).

        Returns:
            (grid, density), each of shape (g,); the density integrates to 1 over the line.
        """
        grid = self.grid() if grid is None else np.asarray(grid, dtype=np.float64)
        sigma = float(np.sqrt(self.default_variance())) if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        nodes, weights = self.flat()
        return grid, gaussian_mixture(grid, nodes, weights, sigma, chunk)

    def moment(self, power: int) -> float:
        """Estimate of (1/n) tr(A^power) from the quadrature (exact for power < 2m)."""
        nodes, weights = self.flat()
        return float(np.sum(weights * nodes**power))

    def negative_mass(self) -> float:
        """Quadrature mass on Ritz values below 0: the estimated share of negative eigenvalues."""
        nodes, weights = self.flat()
        return float(weights[nodes < 0].sum())

    def summary(self) -> dict[str, Any]:
        """The density's numbers as a JSON-able dict, from the stored quadrature (no products).

        Keys: ``lambda_min`` and ``lambda_max`` (extreme Ritz values), ``negative_mass``
        (:meth:`negative_mass`), ``mean_eigenvalue`` (tr(A)/n, the first moment) and
        ``trace`` (n times it: Hutchinson's estimate from the P probes, as noisy as P
        probes make it), ``n``, ``num_probes``, ``num_steps`` (the most Lanczos steps
        of a probe) and ``num_products`` (all probes' steps). Saved as the ``summary`` of the
        ``.json`` (:meth:`save`).
        """
        finite = bool(np.isfinite(self.nodes).any())
        mean = self.moment(1) if finite else math.nan
        return {
            "lambda_min": self.lambda_min if finite else math.nan,
            "lambda_max": self.lambda_max if finite else math.nan,
            "negative_mass": self.negative_mass(),
            "mean_eigenvalue": mean,
            "trace": self.n * mean,
            "n": self.n,
            "num_probes": self.num_probes,
            "num_steps": int(self.num_steps.max()) if self.num_steps.size else 0,
            "num_products": int(self.num_steps.sum()),
        }

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (nodes, weights, num_steps) and ``path.json`` (metadata).

        The ``.json`` also carries :meth:`summary` as ``summary`` (``load`` reads the arrays
        from the ``.npz`` and skips it).
        """
        arrays = {"nodes": self.nodes, "weights": self.weights, "num_steps": self.num_steps}
        meta = {**self.meta, "n": self.n, "summary": self.summary(), "kind": "SpectralDensity"}
        return save_result(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpectralDensity:
        """Read a density written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                nodes not (P, m) or infinite, weights not (P, m), negative or not finite,
                num_steps not integers in [0, m], n not a positive integer.
        """
        file = ResultFile(path, "SpectralDensity", "SpectralDensity.save")
        nodes = file.array("nodes", shape=(None, None), inf=False)
        probes, steps = nodes.shape
        weights = file.array(
            "weights", shape=nodes.shape, like="as nodes", nan=False, inf=False, minimum=0.0
        )
        num_steps = file.array(
            "num_steps", "int", shape=(probes,), like="(one per probe)", minimum=0, maximum=steps
        )
        n = file.integer("n", minimum=1)
        return cls(nodes, weights, num_steps, n, file.meta)
