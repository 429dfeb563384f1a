"""The ``summary`` of a saved result's ``.json``: the eigenvalues, residuals and density numbers
a reader of the ``.json`` alone wants, equal to the arrays of the ``.npz``; files written before
it existed (no ``summary``) load as before, and a damaged one is refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_result_loaders import assert_same, symmetric

from curvscope.analysis import (
    GradientOverlap,
    SpectrumStructure,
    gradient_overlap,
    spectrum_structure,
)
from curvscope.linalg import Eigenpairs, SpectralDensity, spectral_density, top_eigenpairs


def read_json(base: Path) -> dict:
    return json.loads(Path(f"{base}.json").read_text())


def test_density_summary_holds_its_numbers(tmp_path):
    A = symmetric()
    density = spectral_density(A, num_iters=12, num_probes=4, seed=1)
    density.save(tmp_path / "density")
    summary = read_json(tmp_path / "density")["summary"]
    nodes, weights = density.flat()
    assert summary["lambda_max"] == float(np.max(nodes))
    assert summary["lambda_min"] == float(np.min(nodes))
    assert summary["negative_mass"] == pytest.approx(float(weights[nodes < 0].sum()), rel=1e-15)
    assert 0 < summary["negative_mass"] < 1  # the planted spectrum has eigenvalues down to -0.5
    # The first moment is exact for 12 Lanczos steps: tr(A)/n up to the probes' variance.
    assert summary["mean_eigenvalue"] == pytest.approx(np.trace(A) / 40, rel=0.3)
    assert summary["trace"] == pytest.approx(40 * summary["mean_eigenvalue"], rel=1e-15)
    assert (summary["n"], summary["num_probes"], summary["num_steps"]) == (40, 4, 12)
    assert summary["num_products"] == 48
    assert summary == density.summary()


def test_eigenpairs_overlap_and_structure_summaries_equal_the_arrays(tmp_path):
    A = symmetric()
    pairs = top_eigenpairs(A, k=3)
    pairs.save(tmp_path / "top", with_vectors=False)
    summary = read_json(tmp_path / "top")["summary"]
    np.testing.assert_allclose(summary["values"], [9.0, 5.0, 3.0], rtol=1e-10)
    assert summary["values"] == pairs.values.tolist()
    assert summary["residuals"] == pairs.residuals.tolist()
    assert summary["converged"] == [True, True, True] and summary["k"] == 3

    gradient = torch.from_numpy(np.random.default_rng(2).standard_normal(40))
    overlap = gradient_overlap(A, gradient, k=3, eigenpairs=pairs)
    overlap.save(tmp_path / "overlap")
    summary = read_json(tmp_path / "overlap")["summary"]
    assert summary == {"eigenvalues": pairs.values.tolist(), "shares": overlap.shares.tolist()}

    structure = spectrum_structure(spectral_density(A, num_iters=20, num_probes=4, seed=1))
    structure.save(tmp_path / "structure")
    summary = read_json(tmp_path / "structure")["summary"]
    assert summary["outliers"] == structure.outliers.tolist()
    assert len(summary["outliers"]) == structure.num_outliers >= 1
    assert summary["outliers_low_mass"] == structure.outliers_low_mass.tolist()


def drop_summary(base: Path) -> None:
    path = Path(f"{base}.json")
    meta = json.loads(path.read_text())
    del meta["summary"]
    path.write_text(json.dumps(meta))


def test_files_without_summary_load_as_before(tmp_path):
    """Results saved before the summary existed: the same object comes back."""
    A = symmetric()
    density = spectral_density(A, num_iters=12, num_probes=4, seed=1)
    pairs = top_eigenpairs(A, k=2)
    gradient = torch.from_numpy(np.random.default_rng(2).standard_normal(40))
    cases = [
        (density, SpectralDensity),
        (pairs, Eigenpairs),
        (spectrum_structure(density), SpectrumStructure),
        (gradient_overlap(A, gradient, k=2, eigenpairs=pairs), GradientOverlap),
    ]
    for i, (result, cls) in enumerate(cases):
        base = tmp_path / f"r{i}"
        result.save(base)
        drop_summary(base)
        loaded = cls.load(base)
        assert "summary" not in getattr(loaded, "meta", getattr(loaded, "params", {}))
        assert_same(result, loaded)


def test_a_summary_that_is_no_object_is_refused(tmp_path):
    density = spectral_density(symmetric(), num_iters=6, num_probes=2, seed=1)
    density.save(tmp_path / "density")
    path = tmp_path / "density.json"
    meta = json.loads(path.read_text())
    meta["summary"] = [1, 2]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"density\.json: field 'summary' must be a JSON object"):
        SpectralDensity.load(tmp_path / "density")
