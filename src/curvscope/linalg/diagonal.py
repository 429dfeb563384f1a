"""Stochastic estimates of diag(A) with per-entry standard errors: Hutchinson, Diag++, XDiag.

- Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad 2007): diag(A) = E[z * A z] for
  Rademacher z (* entrywise), so the mean over s probes is unbiased, with variance
  sum_{j != i} A_ij^2 / s for entry i. An exactly diagonal A is recovered from one probe.
- Diag++ (Baston & Nakatsukasa 2022), the diagonal counterpart of Hutch++: a sketch Q of A's
  dominant range (QR of A S for k Rademacher columns S) takes the large eigenvalues out
  exactly, and Hutchinson estimates only what is left. Here the remainder is deflated on both
  sides, as Hutch++ does for the trace: with P = Q Q^T and A symmetric,

      diag(A) = diag(PA + AP - PAP) + diag((I - P) A (I - P)),

  the first part exact from A Q (k more products), the second by Hutchinson with
  z * (I - P) A (I - P) z. Exact (to rounding) when rank(A) <= k.
- XDiag (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample", §4) uses
  each of m test vectors both for the low-rank part and for the remainder, by the
  exchangeability principle: estimate i takes the range of A Om without column i for the
  low-rank part and test vector i for Hutchinson on the rest; the result is their mean
  (2m products: A Om and A Q). Exact when rank(A) < m.

Standard errors: Hutchinson and Diag++, the sample standard deviation of the stochastic part
per entry over sqrt(its probes), as for :func:`~curvscope.trace` (the probes are independent
given the sketch; the sum of Hutchinson's diagonal is Hutchinson's trace estimate with the same
probes). XDiag, the spread of its m leave-one-out estimates over sqrt(m), as XTrace's error
estimate; these estimates share test vectors, and the standard error came out about 20% small
on planted spectra (root mean square of error / standard error 1.1-1.25, tests/linalg/
test_diagonal.py).

Which to use (docs/interop.md has the measurements): with a few dominant eigenvalues XDiag
and Diag++ are far more accurate than Hutchinson at equal products (XDiag the most); on a flat
spectrum at small budgets Hutchinson is best, as the sketch then buys little.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..results import ResultFile, environment_metadata, save_result
from .interface import LinearOperatorLike, apply_rows, as_operator, rademacher_rows

DiagonalMethod = Literal["xdiag", "diag++", "hutchinson"]
METHODS: tuple[str, ...] = ("xdiag", "diag++", "hutchinson")
#: A sketch A Om counts as rank-deficient below this relative singular value of its R factor.
_RANK_RCOND = 1e-10


@dataclass(frozen=True, eq=False)
class DiagonalEstimate:
    """An estimate of diag(A) with a standard error per entry.

    Attributes:
        values: Estimate of diag(A), float64, shape (n,).
        std_error: Standard error of each entry, float64, shape (n,) (0 where the low-rank
            part was exact and the remainder vanished).
        num_products: Operator products spent (columns multiplied): fewer than asked when
            XDiag's sketch showed rank(A) < m, or n when the diagonal was read off A I.
        method: "xdiag", "diag++" or "hutchinson".
        meta: probes (Hutchinson probes; 0 for XDiag), sketch size (Diag++'s k, XDiag's m),
            seed, dtype, versions, wall time.
    """

    values: np.ndarray
    std_error: np.ndarray
    num_products: int
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (values, std_error) and ``path.json`` (products, method, meta)."""
        arrays = {"values": self.values, "std_error": self.std_error}
        meta = {
            **self.meta,
            "num_products": self.num_products,
            "method": self.method,
            "kind": "Diagonal",
        }
        return save_result(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DiagonalEstimate:
        """Read an estimate written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field).
        """
        file = ResultFile(path, "Diagonal", "DiagonalEstimate.save")
        values = file.array("values", shape=(None,))
        std_error = file.array(
            "std_error", shape=values.shape, like="as 'values'", nan=True, minimum=0.0
        )
        num_products = file.integer("num_products", minimum=1)
        method = file.meta.pop("method", None)
        if method not in METHODS:
            raise ValueError(
                f"{file.json_path}: field 'method' must be one of {METHODS}, got {method!r}"
            )
        return cls(values, std_error, num_products, method, file.meta)

    def __repr__(self) -> str:
        return (
            f"DiagonalEstimate(n={self.values.size}, method={self.method!r}, "
            f"num_products={self.num_products}, "
            f"median_relative_se={self.median_relative_se():.3g})"
        )

    def median_relative_se(self) -> float:
        """Median over entries of std_error / |value| (entries with value 0 left out)."""
        nonzero = self.values != 0
        if not nonzero.any():
            return float("nan")
        return float(np.median(self.std_error[nonzero] / np.abs(self.values[nonzero])))


class _Moments:
    """Running mean and sum of squared deviations of (k, n) sample blocks (Chan et al. 1979).

    Keeps O(n) memory whatever the number of probes, and is free of the cancellation of
    sum-of-squares formulas when the mean is much larger than the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, samples: torch.Tensor) -> None:
        k = samples.shape[0]
        mean = samples.mean(dim=0)
        m2 = ((samples - mean) ** 2).sum(dim=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = k, mean, m2
            return
        total = self.count + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * k / total)
        self.count = total

    def standard_error(self) -> torch.Tensor:
        assert self.m2 is not None
        return (self.m2 / (self.count - 1)).sqrt() / np.sqrt(self.count)


_SKETCH, _PROBES = 0, 1


def _probes(op: LinearOperatorLike, stream: int, seed: int, first: int, count: int) -> torch.Tensor:
    """Rademacher rows ``first`` .. ``first + count - 1`` of a stream, (count, n) float64.

    Row i has its own seed (from ``seed``, the stream and i), so the probes do not depend on
    ``block``, and the sketch and the probes never share a row.
    """
    rows = []
    for i in range(first, first + count):
        row_seed = int(np.random.SeedSequence([seed, stream, i]).generate_state(1)[0])
        rows.append(rademacher_rows(1, op.shape[0], row_seed, op.device))
    return torch.cat(rows)


def _hutchinson(
    op: LinearOperatorLike, num_probes: int, seed: int, block: int, Q: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of z * B z over Rademacher z, B = (I-P) A (I-P) or A.

    ``Q`` (k, n): orthonormal rows spanning P's range, or None for B = A.
    """
    moments = _Moments()
    for start in range(0, num_probes, block):
        z = _probes(op, _PROBES, seed, start, min(block, num_probes - start))
        x = z if Q is None else z - (z @ Q.T) @ Q
        y = apply_rows(op, x)
        if Q is not None:
            y = y - (y @ Q.T) @ Q
        moments.add(z * y)
    assert moments.mean is not None
    return moments.mean, moments.standard_error()


def _xdiag(
    op: LinearOperatorLike, m: int, seed: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """XDiag with m test vectors: mean and standard error of the m leave-one-out estimates.

    Returns (values, std_error, products). The formulas are those of Epperly, Tropp & Webber
    2024 (Y = A Om = QR, Z = A Q, T = Z^T Om, S = R^-T with unit columns): estimate i is
    diag(QQ^T A) - (Q s_i) * (Z s_i) + om_i * (y_i - Q t_i + (Q s_i)(s_i . t_i)).
    """
    rows = [
        (z, apply_rows(op, z))
        for z in (_probes(op, _SKETCH, seed, s, min(block, m - s)) for s in range(0, m, block))
    ]
    Om = torch.cat([z for z, _ in rows]).T.contiguous()  # (n, m)
    Y = torch.cat([y for _, y in rows]).T.contiguous()  # (n, m)
    del rows
    Q, R = torch.linalg.qr(Y)
    U, sigma, _ = torch.linalg.svd(R)
    rank = int((sigma > _RANK_RCOND * sigma[0]).sum()) if sigma[0] > 0 else 0
    if rank < m:
        # A Om has rank r < m (A has rank r): every m - 1 test vectors already span A's
        # range, each leave-one-out basis is the whole range Q_r, and the estimate is
        # diag(Q_r Q_r^T A) + om_i * (I - Q_r Q_r^T) y_i with a remainder at rounding level.
        Q = Q @ U[:, :rank]
        Z = _apply_columns(op, Q, block)
        per = Om * (Y - Q @ (Q.T @ Y)) + (Q * Z).sum(dim=1, keepdim=True)
        return per.mean(dim=1), per.std(dim=1) / np.sqrt(m), m + rank
    Z = _apply_columns(op, Q, block)
    T = Z.T @ Om  # Q^T A Om, (m, m)
    S = torch.linalg.solve_triangular(R, torch.eye(m, dtype=R.dtype, device=R.device), upper=True)
    S = S.T / S.T.norm(dim=0, keepdim=True)  # columns s_i: R^-T e_i, normalised
    QS = Q @ S
    per = Y.sub_(Q @ T).add_(QS * (S * T).sum(dim=0)).mul_(Om)
    per.sub_(QS * (Z @ S)).add_((Q * Z).sum(dim=1, keepdim=True))
    return per.mean(dim=1), per.std(dim=1) / np.sqrt(m), 2 * m


def _diagpp(
    op: LinearOperatorLike, k: int, num_probes: int, seed: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diag++ with a sketch of k columns and ``num_probes`` Hutchinson probes: (values, se)."""
    Y = torch.cat(
        [
            apply_rows(op, _probes(op, _SKETCH, seed, s, min(block, k - s)))
            for s in range(0, k, block)
        ]
    )
    Q = torch.linalg.qr(Y.T).Q.T  # (k, n) orthonormal rows spanning the range of A S
    del Y
    W = torch.cat([apply_rows(op, Q[s : s + block]) for s in range(0, k, block)])
    M = Q @ W.T  # Q^T A Q, (k, k)
    M = 0.5 * (M + M.T)
    # diag(PA) = diag(AP) = rowsum(Q * AQ); diag(PAP) = rowsum((Q M) * Q) (columns here).
    exact = 2.0 * (Q * W).sum(dim=0) - ((M @ Q) * Q).sum(dim=0)
    rest, std_error = _hutchinson(op, num_probes, seed, block, Q)
    return exact + rest, std_error


def _apply_columns(op: LinearOperatorLike, Q: torch.Tensor, block: int) -> torch.Tensor:
    """A Q for orthonormal columns Q (n, k), float64, ``block`` columns per pass."""
    k = Q.shape[1]
    if k == 0:  # A Om = 0: nothing to apply
        return torch.zeros_like(Q)
    Qt = Q.T.contiguous()
    return torch.cat([apply_rows(op, Qt[s : s + block]) for s in range(0, k, block)]).T


def diagonal(
    op: LinearOperatorLike | torch.Tensor | np.ndarray,
    num_products: int = 99,
    method: DiagonalMethod = "xdiag",
    seed: int = 0,
    block: int = 10,
    sketch_size: int | None = None,
) -> DiagonalEstimate:
    """Estimate diag(A) of a symmetric operator, with a standard error per entry.

    Args:
        op: Symmetric operator (n, n) with ``matmat`` (a Hessian, GGN, any curvscope
            operator, a SciPy ``LinearOperator``), or a dense matrix.
        num_products: Operator products to spend (columns multiplied). Hutchinson uses them
            all as probes. XDiag uses m = num_products // 2 test vectors (A Om, then A Q).
            Diag++ spends ``sketch_size`` on the sketch A S, ``sketch_size`` on A Q and the
            rest on Hutchinson probes of the deflated remainder. A sketch that shows A to have
            rank r < m spends fewer (``num_products`` of the result says how many). With
            num_products >= n, XDiag and Diag++ read the diagonal off A I exactly (n products,
            standard error 0).
        method: "xdiag" (default; exchangeable: every product serves both the low-rank part
            and the remainder), "diag++" or "hutchinson".
        seed: Seed of the Rademacher sketch and probes; the same seed gives the same numbers,
            whatever ``block``.
        block: Columns per ``matmat`` (one data pass each).
        sketch_size: Diag++'s k; default num_products // 3 (Hutch++'s split). It must leave
            at least 2 probes. Only for "diag++".

    Returns:
        :class:`DiagonalEstimate` with values and standard errors of shape (n,).

    Raises:
        ValueError: An unknown method, too few products for a standard error, or a
            ``sketch_size`` for another method than "diag++".

    Example:
        A matrix of rank 2 is recovered exactly once the sketch spans its range; XDiag's 4
        test vectors show the rank, and A Q then costs 2 products, not 4:

        >>> import numpy as np
        >>> from curvscope.linalg import diagonal
        >>> u, v = np.ones(6), np.arange(6.0)
        >>> estimate = diagonal(np.outer(u, u) + np.outer(v, v), num_products=8, seed=0)
        >>> estimate.values.round(6).tolist(), bool(estimate.std_error.max() < 1e-10)
        ([1.0, 2.0, 5.0, 10.0, 17.0, 26.0], True)
        >>> estimate.num_products, estimate.method
        (6, 'xdiag')
    """
    op = as_operator(op)
    n = op.shape[0]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if sketch_size is not None and method != "diag++":
        raise ValueError(
            f"sketch_size is Diag++'s split; {method} takes none (xdiag uses num_products // 2 "
            "test vectors for both parts)"
        )
    minimum = {"xdiag": 4, "hutchinson": 2, "diag++": 4}[method]
    if num_products < minimum:
        why = {
            "xdiag": "two products per test vector, at least 2 test vectors",
            "hutchinson": "at least 2 probes",
            "diag++": "the sketch, A Q, and at least 2 probes",
        }[method]
        raise ValueError(
            f"{method} needs num_products >= {minimum} ({why} for a standard error), got "
            f"{num_products}"
        )
    sketch = num_products // 3 if sketch_size is None else int(sketch_size)
    if method == "diag++" and (sketch < 1 or num_products - 2 * sketch < 2):
        raise ValueError(
            f"diag++ needs num_products >= 2 * sketch_size + 2 with sketch_size >= 1 (the "
            f"sketch, A Q, and at least 2 probes); got num_products={num_products}, "
            f"sketch_size={sketch}: raise num_products or lower sketch_size"
        )
    started = time.perf_counter()
    num_probes = 0
    if method != "hutchinson" and num_products >= n:
        # The budget covers A I: read the diagonal off exactly, in n products.
        eye = torch.eye(n, dtype=torch.float64, device=op.device)
        values = torch.cat(
            [apply_rows(op, eye[s : s + block]).diagonal(offset=s) for s in range(0, n, block)]
        )
        std_error, spent, sketch = torch.zeros_like(values), n, 0
    elif method == "xdiag":
        sketch = num_products // 2
        values, std_error, spent = _xdiag(op, sketch, seed, block)
    elif method == "hutchinson":
        num_probes = spent = num_products
        sketch = 0
        values, std_error = _hutchinson(op, num_probes, seed, block, None)
    else:
        num_probes = num_products - 2 * sketch
        values, std_error = _diagpp(op, sketch, num_probes, seed, block)
        spent = num_products
    meta = {
        **environment_metadata(),
        "num_probes": num_probes,
        "sketch_size": sketch,
        "seed": seed,
        "operator_dtype": str(op.dtype).replace("torch.", ""),
        "operator": type(op).__name__,
        "wall_time_s": time.perf_counter() - started,
    }
    return DiagonalEstimate(
        values.cpu().numpy(),
        std_error.cpu().numpy(),
        spent,
        method,
        meta,
    )
