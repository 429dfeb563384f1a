"""Non-normal matrices: eigenvector condition number, pseudospectral radius, bounds on ||T^k||.

For a diagonalisable T = V D V^-1 with spectral radius rho,

    Kreiss:  sup_{k>=0} ||T^k|| >= (rho_eps - 1) / eps      for every eps > 0,
    upper:   ||T^k|| <= kappa(V) rho^k,

where rho_eps = max{|z| : sigma_min(zI - T) <= eps} is the eps-pseudospectral radius and
kappa(V) = ||V|| ||V^-1|| (Trefethen & Embree, "Spectra and Pseudospectra", 2005, §16). A normal
T has kappa(V) = 1 and ||T^k|| = rho^k; a non-normal one can grow transiently before it decays.

Everything here works on small dense matrices (numpy/scipy, float64 or complex128): the
linearised update operator restricted to a few top Hessian directions, not the full network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
from scipy.optimize import minimize_scalar
from scipy.sparse.linalg import LinearOperator

from ..results import ResultFile, environment_metadata, save_result

#: Default eps values of the Kreiss bound, relative to max(||T||_2, tiny).
DEFAULT_RELATIVE_EPS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _square(T: Any) -> np.ndarray:
    """``T`` as a 2-D square numpy array (float64 or complex128).

    Accepted besides arrays: torch tensors, SciPy sparse matrices and ``LinearOperator`` s
    (applied to the identity), and matrix-free operators with ``shape`` and ``matmat`` such
    as :class:`~curvscope.operators.update.UpdateOperator` (applied to the identity in their
    dtype). Everything here is dense linear algebra: only for small n.
    """
    if scipy.sparse.issparse(T):
        T = T.toarray()
    elif isinstance(T, LinearOperator) or (hasattr(T, "matmat") and hasattr(T, "shape")):
        shape = tuple(T.shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
            raise ValueError(f"expected a non-empty square operator, got shape {shape}")
        if isinstance(T, LinearOperator):
            T = T.matmat(np.eye(shape[0]))
        else:
            T = T.matmat(torch.eye(shape[0], dtype=T.dtype, device=T.device))
    if hasattr(T, "detach"):
        T = T.detach().cpu().numpy()
    T = np.asarray(T)
    if T.ndim != 2 or T.shape[0] != T.shape[1] or T.shape[0] == 0:
        raise ValueError(f"expected a non-empty square matrix, got shape {T.shape}")
    dtype = np.complex128 if np.iscomplexobj(T) else np.float64
    T = T.astype(dtype, copy=False)
    if not np.all(np.isfinite(T)):
        raise ValueError("the matrix has inf or nan entries")
    return T


def spectral_radius(T: Any) -> float:
    """max |lambda_i(T)| of a square matrix (n, n)."""
    return float(np.max(np.abs(scipy.linalg.eigvals(_square(T)))))


def eigenvector_condition(T: Any, rcond: float = 1e-13) -> float:
    """kappa(V) = ||V||_2 ||V^-1||_2 for the eigenvector matrix V of T with unit-norm columns.

    Computed as sigma_max(V) / sigma_min(V) from the singular values of V.

    Args:
        T: Square matrix (n, n), real or complex.
        rcond: V counts as singular, and the result is ``inf``, when
            sigma_min(V) <= rcond * sigma_max(V). An exactly defective T is seen by LAPACK as
            nearly defective (eigenvectors at an angle of about sqrt(machine eps)), so expect a
            huge finite value (~1e8) there rather than ``inf``.

    Returns:
        kappa(V) >= 1 (1 exactly for a normal matrix with distinct eigenvalues). With repeated
        eigenvalues V is not unique and the value depends on LAPACK's choice of basis; it is
        then an upper bound on the smallest kappa over admissible V.
    """
    T = _square(T)
    _, V = scipy.linalg.eig(T)
    V = V / np.linalg.norm(V, axis=0, keepdims=True)
    s = scipy.linalg.svd(V, compute_uv=False)
    if s[-1] <= rcond * s[0]:
        return float("inf")
    return float(s[0] / s[-1])


def power_norms(T: Any, num_steps: int, log: bool = False) -> np.ndarray:
    """||T^k||_2 for k = 0, ..., num_steps, shape (num_steps + 1,).

    T^k is built by repeated multiplication and each norm is the largest singular value, so
    the cost is num_steps dense products and SVDs of an (n, n) matrix. The power is rescaled
    to norm 1 after every product and the scales are summed in the log domain, so nothing
    overflows however far rho(T)^k leaves the float range: norms beyond it are ``inf``
    (``log=True`` gives log ||T^k|| instead, finite while T^k != 0), never NaN.

    Args:
        T: Square matrix (n, n).
        num_steps: K, the last power.
        log: Return natural logarithms (-inf where T^k = 0).
    """
    T = _square(T)
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    logs = np.full(num_steps + 1, -np.inf)
    norms = np.zeros(num_steps + 1)
    logs[0], norms[0] = 0.0, 1.0
    P = np.eye(T.shape[0], dtype=T.dtype)
    log_scale, scale = 0.0, np.float64(1.0)
    for k in range(1, num_steps + 1):
        P = T @ P
        norm = float(np.linalg.norm(P, 2))
        if norm == 0.0:  # nilpotent: every later power is zero too
            break
        log_scale += np.log(norm)
        with np.errstate(over="ignore"):
            scale = scale * norm  # the norm of the unscaled power, inf once out of range
        logs[k], norms[k] = log_scale, scale
        P = P / norm
    return logs if log else norms


def sigma_min(z: complex, T: Any) -> float:
    """Smallest singular value of zI - T."""
    T = _square(T)
    A = z * np.eye(T.shape[0]) - T
    return float(scipy.linalg.svd(A, compute_uv=False)[-1])


def _ray_radius(T: np.ndarray, eps: float, theta: float) -> float:
    """Largest r >= 0 with sigma_min(r e^{i theta} I - T) = eps.

    -1 if the ray misses the eps-pseudospectrum.

    With A = e^{-i theta} T, eps is a singular value of r I - A (r real) iff r is a real
    eigenvalue of K = [[A, eps I], [eps I, A^H]] (from (rI - A) v = eps u,
    (rI - A)^H u = eps v). Beyond the largest real eigenvalue of K no singular value equals
    eps and sigma_min -> infinity, so at that eigenvalue sigma_min = eps exactly: it is the
    outer boundary point on the ray (Mengi & Overton 2005, radial search).
    """
    n = T.shape[0]
    A = np.exp(-1j * theta) * T
    eye = eps * np.eye(n)
    K = np.block([[A, eye], [eye, A.conj().T]])
    values = scipy.linalg.eigvals(K)
    scale = max(np.max(np.abs(values)), eps)
    real = np.sort(values.real[np.abs(values.imag) <= 1e-7 * scale])[::-1]
    for r in real:
        if r < 0:
            break
        # A near-real eigenvalue from a complex pair (near tangency) is kept only if the
        # singular value there really is eps.
        if sigma_min(r * np.exp(1j * theta), T) <= eps * (1 + 1e-6) + 1e-14 * scale:
            return float(r)
    if sigma_min(0.0, T) <= eps:
        return 0.0
    return -1.0


def pseudospectral_radius(
    T: Any, eps: float, num_angles: int = 180, num_refine: int = 4, xtol: float = 1e-10
) -> float:
    """rho_eps(T) = max{|z| : sigma_min(zI - T) <= eps} of a small dense matrix.

    Method: for an angle theta the outermost point of the eps-pseudospectrum on the ray
    z = r e^{i theta} is found exactly from the real eigenvalues of a 2n x 2n matrix
    (:func:`_ray_radius`); the radius r(theta) is evaluated on ``num_angles`` equally spaced
    angles plus the arguments of T's eigenvalues (so every eigenvalue's eps-disc is hit), and
    the ``num_refine`` best angles are refined by bounded Brent maximisation of r(theta)
    within one grid spacing. For real T only the upper half plane is searched (the
    pseudospectrum is symmetric about the real axis).

    Accuracy: each r(theta) is exact to rounding (~1e-12 relative); near a maximiser r(theta)
    is quadratic in theta, so an angular error xtol costs O(xtol^2). The result is a lower
    bound on rho_eps, and equals it (to ~1e-10 relative) unless the global maximiser lies in
    a peak narrower than the grid spacing not adjacent to an eigenvalue's argument, which
    would need a pseudospectral component far from every eigenvalue; raise ``num_angles``
    when in doubt. It always satisfies rho_eps >= rho(T) + eps. Cost: about
    (num_angles + n + 30 num_refine) eigenvalue solves of size 2n.

    Args:
        T: Square matrix (n, n), real or complex.
        eps: Perturbation size, > 0.
        num_angles: Angles of the coarse grid.
        num_refine: Best grid angles refined locally.
        xtol: Angular tolerance of the refinement, radians.

    Returns:
        rho_eps as a float.
    """
    T = _square(T)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    real = not np.iscomplexobj(T)
    if real:
        grid = np.linspace(0.0, np.pi, num_angles)
        spacing = np.pi / max(num_angles - 1, 1)
    else:
        grid = np.linspace(0.0, 2 * np.pi, num_angles, endpoint=False)
        spacing = 2 * np.pi / num_angles
    args = np.angle(scipy.linalg.eigvals(T))
    args = np.abs(args) if real else np.mod(args, 2 * np.pi)
    angles = np.unique(np.concatenate([grid, args]))
    radii = np.array([_ray_radius(T, eps, t) for t in angles])
    best = float(np.max(radii))
    for i in np.argsort(-radii)[:num_refine]:
        lo, hi = angles[i] - spacing, angles[i] + spacing
        if real:
            lo, hi = max(lo, 0.0), min(hi, np.pi)
        found = minimize_scalar(
            lambda t: -_ray_radius(T, eps, t),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": xtol},
        )
        best = max(best, -float(found.fun))
    return best


def kreiss_lower_bound(T: Any, eps: float, **kwargs: Any) -> float:
    """(rho_eps(T) - 1) / eps, a lower bound on sup_{k>=0} ||T^k|| for every eps > 0.

    ``kwargs`` go to :func:`pseudospectral_radius`. Negative values (rho_eps < 1) are
    returned as they are: they only say the bound is void for that eps.
    """
    return (pseudospectral_radius(T, eps, **kwargs) - 1.0) / eps


@dataclass(frozen=True)
class TransientBounds:
    """What the spectrum, the eigenvectors and the pseudospectra say about ||T^k||.

    Attributes:
        rho: Spectral radius of T.
        kappa: Eigenvector condition number kappa(V) (unit columns); inf if defective.
        power_norms: Measured ||T^k||_2 for k = 0..K, shape (K + 1,).
        upper: kappa * rho^k, shape (K + 1,): ||T^k|| <= upper[k] (void when kappa = inf).
        eps_values: eps of the Kreiss bound, shape (m,).
        pseudospectral_radii: rho_eps for each eps, shape (m,).
        kreiss: (rho_eps - 1) / eps for each eps, shape (m,).
        kreiss_lower: max of ``kreiss``: sup_{k>=0} ||T^k|| >= kreiss_lower.
        measured_max: max_{k<=K} ||T^k||.
        measured_argmax: the k where it is reached.
        meta: n, num_steps, versions.
    """

    rho: float
    kappa: float
    power_norms: np.ndarray
    upper: np.ndarray
    eps_values: np.ndarray
    pseudospectral_radii: np.ndarray
    kreiss: np.ndarray
    kreiss_lower: float
    measured_max: float
    measured_argmax: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def transient_growth(self) -> bool:
        """True when some ||T^k|| with k >= 1 exceeds 1 while rho < 1."""
        return bool(self.rho < 1 and self.measured_max > 1 + 1e-12)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (the arrays) and ``path.json`` (the numbers and metadata)."""
        arrays = {
            "power_norms": self.power_norms,
            "upper": self.upper,
            "eps_values": self.eps_values,
            "pseudospectral_radii": self.pseudospectral_radii,
            "kreiss": self.kreiss,
        }
        scalars = {
            "rho": self.rho,
            "kappa": self.kappa,
            "kreiss_lower": self.kreiss_lower,
            "measured_max": self.measured_max,
            "measured_argmax": self.measured_argmax,
        }
        return save_result(path, arrays, {**self.meta, **scalars, "kind": "TransientBounds"})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TransientBounds:
        """Read bounds written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                power_norms and upper not of one length K + 1, the eps arrays not of one
                length, eps_values not positive, norms or rho negative, measured_argmax not
                in [0, K], n not a positive integer.
        """
        file = ResultFile(path, "TransientBounds", "TransientBounds.save")
        power_norms = file.array("power_norms", shape=(None,), minimum=0.0)
        if power_norms.size == 0:
            raise ValueError(f"{file.npz_path}: power_norms is empty (it holds k = 0..K)")
        upper = file.array("upper", shape=power_norms.shape, like="as power_norms")
        eps_values = file.array("eps_values", shape=(None,), nan=False, inf=False)
        if np.any(eps_values <= 0):
            raise ValueError(f"{file.npz_path}: eps_values must be > 0, got {eps_values}")
        radii = file.array("pseudospectral_radii", shape=eps_values.shape, like="as eps_values")
        kreiss = file.array("kreiss", shape=eps_values.shape, like="as eps_values")
        file.check_optional("n", lambda name: file.integer(name, minimum=1))
        return cls(
            rho=file.number("rho", nan=False, minimum=0.0),
            kappa=file.number("kappa", nan=False, minimum=0.0),
            power_norms=power_norms,
            upper=upper,
            eps_values=eps_values,
            pseudospectral_radii=radii,
            kreiss=kreiss,
            kreiss_lower=file.number("kreiss_lower"),
            measured_max=file.number("measured_max", minimum=0.0),
            measured_argmax=file.integer("measured_argmax", 0, power_norms.size - 1),
            meta=file.meta,
        )


def transient_bounds(
    T: Any,
    num_steps: int = 200,
    eps: float | Sequence[float] | None = None,
    **kwargs: Any,
) -> TransientBounds:
    """Spectral radius, kappa(V), the bounds on ||T^k|| and the measured ||T^k||, k <= K.

    Args:
        T: Square matrix (n, n), small (each eps costs a few hundred 2n x 2n eigensolves).
        num_steps: K, the last power measured.
        eps: Perturbation sizes of the Kreiss bound; default ``DEFAULT_RELATIVE_EPS`` times
            ||T||_2.
        kwargs: Passed to :func:`pseudospectral_radius`.

    Returns:
        :class:`TransientBounds`. For diagonalisable T:
        kreiss_lower <= sup_k ||T^k|| and power_norms[k] <= upper[k].
    """
    T = _square(T)
    norm = max(float(np.linalg.norm(T, 2)), np.finfo(np.float64).tiny)
    eps_values = np.atleast_1d(
        np.asarray(eps if eps is not None else np.array(DEFAULT_RELATIVE_EPS) * norm, float)
    )
    if np.any(eps_values <= 0):
        raise ValueError(f"eps values must be > 0, got {eps_values}")
    rho = spectral_radius(T)
    kappa = eigenvector_condition(T)
    norms = power_norms(T, num_steps)
    with np.errstate(over="ignore", invalid="ignore"):
        upper = kappa * rho ** np.arange(num_steps + 1, dtype=float)
    radii = np.array([pseudospectral_radius(T, e, **kwargs) for e in eps_values])
    kreiss = (radii - 1.0) / eps_values
    meta = {**environment_metadata(), "n": T.shape[0], "num_steps": num_steps}
    return TransientBounds(
        rho=rho,
        kappa=kappa,
        power_norms=norms,
        upper=upper,
        eps_values=eps_values,
        pseudospectral_radii=radii,
        kreiss=kreiss,
        kreiss_lower=float(np.max(kreiss)),
        measured_max=float(np.max(norms)),
        measured_argmax=int(np.argmax(norms)),
        meta=meta,
    )
