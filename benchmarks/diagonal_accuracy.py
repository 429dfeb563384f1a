"""Accuracy of the diagonal estimators at equal products: XDiag, Diag++ and Hutchinson.

For each matrix and budget (operator products), over seeds 0..S-1: the mean relative error
||d_hat - diag(A)|| / ||diag(A)||, and the fraction of entries within 4 of their reported
standard errors (over all seeds). Matrices:

- ``digits MLP, trained`` / ``untrained``: the float64 Hessian of the cross-entropy of
  ``zoo.digits_mlp(hidden=(16,))`` (n = 1,210; trained by ``zoo.trained_digits_mlp``) over
  512 digits, built once column by column with ``HessianOperator.to_dense``; the estimators
  then run on that dense matrix (they see only products, and give the operator's numbers to
  rounding, tests/linalg/test_diagonal.py), which keeps the run to a minute;
- planted spectra, n = 1,000, random eigenvectors: eigenvalues 1/i^2, exp(-i/30), and a bulk
  uniform in [-1, 2] with 10 outliers 10..100 (Hessian-like).

Run from the repository root::

    .venv/bin/python benchmarks/diagonal_accuracy.py          # ~1-2 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch.nn import functional as F

from curvscope import HessianOperator, diagonal, zoo

METHODS = ("xdiag", "diag++", "hutchinson")


def planted(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """U diag(values) U^T with a seeded random orthogonal U."""
    gauss = np.random.default_rng(seed).standard_normal((values.size, values.size))
    Q, R = np.linalg.qr(gauss)
    Q = Q * np.sign(np.diag(R))
    A = (Q * values) @ Q.T
    return 0.5 * (A + A.T)


def digits_hessian(trained: bool) -> np.ndarray:
    model = zoo.trained_digits_mlp(hidden=(16,)) if trained else zoo.digits_mlp(hidden=(16,))
    H = HessianOperator(model, F.cross_entropy, zoo.digits_data(num_samples=512))
    dense = H.to_dense().numpy()
    return 0.5 * (dense + dense.T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 99, 300])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 1000
    i = np.arange(n)
    started = time.perf_counter()
    matrices = {
        "digits MLP, trained": digits_hessian(True),
        "digits MLP, untrained": digits_hessian(False),
        "planted 1/i^2": planted(1.0 / (i + 1.0) ** 2),
        "planted exp(-i/30)": planted(np.exp(-i / 30.0)),
        "planted bulk + 10 outliers": planted(
            np.r_[np.linspace(-1.0, 2.0, n - 10), np.linspace(10.0, 100.0, 10)]
        ),
    }
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, float64, "
        f"1 thread, seeds 0..{args.seeds - 1}; relative error (fraction within 4 SE)"
    )
    header = f"| matrix | n | products | {' | '.join(METHODS)} |"
    print(header)
    print("|" + " --- |" * (3 + len(METHODS)))
    for name, A in matrices.items():
        exact = np.diag(A)
        for budget in args.budgets:
            cells = []
            for method in METHODS:
                errors, within = [], []
                for seed in range(args.seeds):
                    estimate = diagonal(A, num_products=budget, method=method, seed=seed)
                    error = np.abs(estimate.values - exact)
                    errors.append(np.linalg.norm(error) / np.linalg.norm(exact))
                    within.append(np.mean(error <= 4 * estimate.std_error + 1e-12))
                cells.append(f"{np.mean(errors):.3f} ({np.mean(within):.3f})")
            print(f"| {name} | {A.shape[0]} | {budget} | {' | '.join(cells)} |")
    print(f"# wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
