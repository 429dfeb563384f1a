"""LowRankOperator's exact spectrum against a dense float64 eigendecomposition."""

from __future__ import annotations

import numpy as np
import torch

from curvscope.operators.lowrank import LowRankOperator


def test_eigenvalues_are_the_dense_nonzero_spectrum():
    g = torch.Generator().manual_seed(0)
    columns = torch.randn(30, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([2.0, 0.5, 1.0, 0.0], dtype=torch.float64)  # rank 3
    op = LowRankOperator(columns, weights)
    dense = (columns * weights) @ columns.T
    expected = np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1][:4]
    values = op.eigenvalues()
    assert values.shape == (4,) and np.all(np.diff(values) <= 0)
    # float64 eigensolvers on a 30 x 30 and a 4 x 4 matrix: agreement to ~1e-13 relative.
    np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-10 * expected[0])
    torch.testing.assert_close(op @ torch.eye(30, dtype=torch.float64), dense)
