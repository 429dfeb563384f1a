"""Planted spectra with known answers, applied as diagonal operators.

For Gaussian start vectors, Lanczos on diag(lambda) and on Q diag(lambda) Q^T (any orthogonal
Q) give Ritz values and weights with the same distribution, since Q^T v is again Gaussian; the
diagonal form costs O(n) a product. Bulks are eigenvalues of real random matrices (Wishart:
Marchenko-Pastur; GOE: semicircle), scaled into [0, 1], so the tests see the edge fluctuations a
real bulk has.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from curvscope.linalg import SpectralDensity, spectral_density

N = 400
PLANTED = np.array([20.0, 12.0, 8.0, 5.0])


class Diagonal:
    """diag(values) behind the operator interface (shape, dtype, device, matmat)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = torch.as_tensor(np.asarray(values, dtype=np.float64))
        self.shape = (self.values.numel(), self.values.numel())
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.values[:, None] * V


def bulk(kind: str, n: int, seed: int) -> np.ndarray:
    """n eigenvalues of a random matrix, scaled so that the bulk spans [0, 1]."""
    rng = np.random.default_rng(seed)
    if kind == "marchenko-pastur":
        X = rng.standard_normal((n, 2 * n))
        values = np.linalg.eigvalsh(X @ X.T / (2 * n))
        return values / values.max()
    A = rng.standard_normal((n, n))
    values = np.linalg.eigvalsh((A + A.T) / math.sqrt(2 * n))
    return (values - values.min()) / (values.max() - values.min())


def density_of(values: np.ndarray, num_iters: int, num_probes: int, seed: int) -> SpectralDensity:
    return spectral_density(Diagonal(values), num_iters=num_iters, num_probes=num_probes, seed=seed)


def with_outliers(kind: str, seed: int, outliers: np.ndarray) -> np.ndarray:
    values = bulk(kind, N, seed)
    return np.r_[values[: N - outliers.size], outliers]
