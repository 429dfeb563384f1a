"""Small explicit operators: a weighted low-rank matrix and linear combinations of operators."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import CurvatureOperator


class LowRankOperator(CurvatureOperator):
    """A = M diag(w) M^T for explicit columns M (n, r) and weights w (r,).

    Products cost two thin matrix products; no data pass.
    """

    def __init__(self, columns: torch.Tensor, weights: torch.Tensor) -> None:
        if columns.ndim != 2 or weights.shape != (columns.shape[1],):
            raise ValueError(
                f"columns must be (n, r) and weights (r,), got {tuple(columns.shape)} and "
                f"{tuple(weights.shape)}"
            )
        super().__init__(columns.shape[0], columns.dtype, columns.device)
        self.columns = columns
        self.weights = weights.to(columns)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.columns @ (self.weights[:, None] * (self.columns.T @ V))

    def eigenvalues(self) -> np.ndarray:
        """The nonzero spectrum, exactly, in descending order, without Lanczos.

        For non-negative weights the eigenvalues of M diag(w) M^T (n x n) are those of the
        r x r matrix diag(sqrt w) M^T M diag(sqrt w); negative weights count as 0.

        Returns:
            float64 array of shape (r,), largest first (zeros where the rank is below r).
        """
        columns = self.columns.detach().to("cpu", torch.float64).numpy()
        weights = self.weights.detach().to("cpu", torch.float64).numpy()
        root = np.sqrt(np.clip(weights, 0.0, None))
        gram = root[:, None] * (columns.T @ columns) * root[None, :]
        return np.sort(np.linalg.eigvalsh(gram))[::-1]


class LinearCombination(CurvatureOperator):
    """sum_i c_i A_i of operators with one shape, dtype and device."""

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]]) -> None:
        if not terms:
            raise ValueError("a linear combination needs at least one term")
        first = terms[0][1]
        for _, op in terms:
            if op.shape != first.shape or op.dtype != first.dtype:
                raise ValueError(
                    f"cannot combine {op!r} with {first!r}: shapes and dtypes must agree"
                )
        super().__init__(first.shape[0], first.dtype, first.device)
        self.terms = list(terms)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(V)
        for coefficient, op in self.terms:
            total.add_(op.matmat(V), alpha=coefficient)
        return total
