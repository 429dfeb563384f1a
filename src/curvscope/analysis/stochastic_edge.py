"""The stochastic edge of stability of SGD (Agarwala & Pennington 2024).

Setting: SGD on least squares with Gaussian features, loss (1/2) E[(x.(w - w*))^2], Hessian
H = E[x x^T] with eigenvalues lambda_a, each step a batch of B samples drawn with
replacement. With e = w - w* and m_a = E[e_a^2] in H's eigenbasis, Isserlis' theorem
(E[x x^T A x x^T] = 2 H A H + tr(A H) H) gives the exact second-moment recursion

    m_a' = [(1 - eta lambda_a)^2 + eta^2 lambda_a^2 / B] m_a
           + (eta^2 / B) lambda_a sum_b lambda_b m_b.

Its spectral radius is below 1 iff every diagonal factor is below 1,
eta lambda_a (1 + 1/B) < 2 for all a, AND the rank-one coupling is small enough:

    K = (eta / B) sum_a lambda_a / (2 - eta lambda_a (1 + 1/B)) < 1,

which for eta lambda << 1 is K ~ eta tr(H) / (2 B). For a network the features are the rows of
its Jacobian, so with ONE output per sample and the loss (1/2N) sum_i (f_i - y_i)^2, near a
minimum H ~ J^T J / N and K ~ eta tr(NTK) / (2 B N). With ``F.mse_loss`` (mean over the N*C
entries, no 1/2) it reads eta tr(NTK) / (B N C). With C > 1 outputs per sample the samples'
C rows are not independent features and K overstates (by up to C): the measurement warns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ..linalg.density import SpectralDensity


@dataclass(frozen=True)
class StochasticEdge:
    """Where SGD's second moment stands.

    Attributes:
        K: The coupling sum (inf when some eta lambda (1 + 1/B) >= 2).
        max_diagonal: max_a eta lambda_a (1 + 1/B) / 2: below 1 for each mode to be stable.
        stable: K < 1 and max_diagonal < 1.
        K_trace: The small-eta approximation eta tr(H) / (2 B).
    """

    K: float
    max_diagonal: float
    stable: bool
    K_trace: float


def _terms(eigenvalues: np.ndarray, weights: np.ndarray, eta: float, batch_size: int):
    lam = np.asarray(eigenvalues, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    factor = eta * lam * (1.0 + 1.0 / batch_size)
    max_diagonal = float(np.max(factor) / 2.0) if lam.size else 0.0
    if max_diagonal >= 1.0:
        K = float("inf")
    else:
        K = float(eta / batch_size * np.sum(w * lam / (2.0 - factor)))
    trace = float(np.sum(w * lam))
    return StochasticEdge(
        K, max_diagonal, K < 1.0 and max_diagonal < 1.0, eta * trace / (2 * batch_size)
    )


def stochastic_edge(eigenvalues: np.ndarray, eta: float, batch_size: int) -> StochasticEdge:
    """K and the per-mode condition from all Hessian eigenvalues (shape (n,))."""
    _check(eta, batch_size)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return _terms(lam, np.ones_like(lam), eta, batch_size)


def stochastic_edge_from_density(
    density: SpectralDensity, eta: float, batch_size: int
) -> StochasticEdge:
    """K from an SLQ density: sum_a f(lambda_a) = n * integral of f against the density.

    Negative Ritz values (non-convex losses) enter as they are; the theory assumes
    lambda >= 0, so read K as a diagnostic there.
    """
    _check(eta, batch_size)
    nodes, weights = density.flat()
    return _terms(nodes, density.n * weights, eta, batch_size)


def critical_learning_rate(eigenvalues: np.ndarray, batch_size: int) -> float:
    """The largest eta at which SGD's second moment is stable: min of the per-mode bound
    2 / (lambda_max (1 + 1/B)) and the root of K(eta) = 1 (K grows with eta)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    lam = lam[lam > 0]
    if lam.size == 0:
        return float("inf")
    mode_bound = 2.0 / (lam.max() * (1.0 + 1.0 / batch_size))

    def excess(eta: float) -> float:
        return min(_terms(lam, np.ones_like(lam), eta, batch_size).K, 1e300) - 1.0

    upper = mode_bound * (1.0 - 1e-12)
    if excess(upper) < 0:
        return float(mode_bound)
    return float(brentq(excess, 0.0, upper, xtol=1e-14 * mode_bound, rtol=1e-12))


def _check(eta: float, batch_size: int) -> None:
    if eta <= 0:
        raise ValueError(f"the learning rate must be positive, got {eta}")
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
