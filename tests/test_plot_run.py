"""Figures of a tracked run (curvscope.plot): sharpness, density evolution, traces.

The runs are written directly with a RunStore (no training), with planted series, so each
figure can be checked against the numbers that went in.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from curvscope.linalg import SpectralDensity
from curvscope.plot import (
    DENSITY_FLOOR,
    density_matrix,
    plot_density_evolution,
    plot_sharpness,
    plot_traces,
)
from curvscope.tracking import RunStore, load_run

STEPS = [0, 10, 20, 40, 80]
LR = 0.5


def planted_density(top: float) -> SpectralDensity:
    """Two probes: a bulk near 0 and one outlier at ``top`` (n = 100)."""
    nodes = np.array([[-0.1, 0.0, 0.05, top], [-0.05, 0.01, 0.1, top]])
    weights = np.array([[0.2, 0.5, 0.29, 0.01], [0.3, 0.4, 0.29, 0.01]])
    return SpectralDensity(nodes, weights, np.array([4, 4]), 100)


@pytest.fixture
def full_run(tmp_path):
    """GD at lr 0.5: sharpness rising to 2/eta = 4 and hovering; traces, K (inf at the end)."""
    sharpness = [1.0, 2.5, 3.8, 4.1, 3.9]
    with RunStore(tmp_path / "run", config={"schedule": "every:10"}) as store:
        for i, step in enumerate(STEPS):
            scalars = {
                "lr": LR,
                "loss": 1.0 / (1 + step),
                "lambda_max": sharpness[i],
                "lambda_2": sharpness[i] / 2,
                "sharpness": sharpness[i],
                "stability_threshold": 2 / LR,
                "trace": 10.0 + step,
                "trace_std_error": 0.5,
                "ntk_trace": 100.0 + step,
                "ntk_trace_std_error": 2.0,
                "stochastic_K": 0.1 * (i + 1) if i < 4 else float("inf"),
                "stochastic_K_trace": 0.05 * (i + 1),
            }
            store.write_snapshot(step, scalars, {"density": planted_density(sharpness[i])})
    return load_run(tmp_path / "run")


@pytest.fixture
def bare_run(tmp_path):
    """Only lambda_max and lr (a Tracker with measurements=('top',)); no density, no traces."""
    with RunStore(tmp_path / "bare", config={}) as store:
        for step in STEPS:
            store.write_snapshot(step, {"lr": LR, "lambda_max": 1.0 + step / 100})
    return load_run(tmp_path / "bare")


def test_plot_sharpness_draws_sharpness_threshold_and_loss(full_run, tmp_path):
    path = tmp_path / "out" / "sharpness.png"
    figure = plot_sharpness(full_run, path)
    assert isinstance(figure, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top, bottom = figure.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    np.testing.assert_array_equal(lines["sharpness"].get_xdata(), STEPS)
    np.testing.assert_allclose(lines["sharpness"].get_ydata(), [1.0, 2.5, 3.8, 4.1, 3.9])
    threshold = lines["2/η"]  # threshold * lr == 2: labelled as GD's 2/eta
    assert threshold.get_linestyle() == "--"
    np.testing.assert_allclose(threshold.get_ydata(), 4.0)
    assert len(top.get_lines()) == 3  # sharpness, lambda_2, threshold
    assert bottom.get_yscale() == "log"


def test_plot_sharpness_shares_axes_between_runs(full_run, bare_run):
    figure = Figure()
    ax = figure.add_subplot()
    plot_sharpness(full_run, ax=ax, label="run a", color="C1")
    assert plot_sharpness(bare_run, ax=ax, label="run b", color="C2") is figure
    labels = [line.get_label() for line in ax.get_lines()]
    assert "run a" in labels and "run b" in labels
    # The bare run has no stability_threshold: 2/lr from its learning rate stands in.
    assert "2/η (run b)" in labels
    with pytest.raises(ValueError, match=r"one axes .* or two"):
        plot_sharpness(full_run, ax=[ax, ax, ax])


def test_plot_density_evolution_is_a_log_heat_map_on_a_common_grid(full_run, tmp_path):
    path = tmp_path / "evolution.png"
    figure = plot_density_evolution(full_run, path, sigma=0.05)
    assert path.is_file()
    ax = figure.axes[0]
    (mesh,) = ax.collections
    assert isinstance(mesh.norm, LogNorm) and mesh.norm.vmin == DENSITY_FLOOR
    values = np.asarray(mesh.get_array()).reshape(-1, len(STEPS))  # (grid, steps)
    assert values.min() >= DENSITY_FLOOR
    grid, expected, sigma = density_matrix(
        [full_run.densities[s] for s in STEPS], sigma=0.05, num_points=600
    )
    assert sigma == 0.05
    np.testing.assert_allclose(values, np.maximum(expected, DENSITY_FLOOR).T)
    # The outlier at lambda_max moves up the map column by column.
    peaks = [grid[np.argmax(np.where(grid > 0.5, column, 0))] for column in expected]
    np.testing.assert_allclose(peaks, [1.0, 2.5, 3.8, 4.1, 3.9], atol=grid[1] - grid[0])
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["λ_max (top)", "threshold"]


def test_plot_traces_has_one_panel_per_quantity(full_run, bare_run):
    figure = plot_traces(full_run)
    trace, ntk, k = figure.axes[:3]
    assert [a.get_ylabel() for a in (trace, ntk, k)] == ["tr(H)", "tr(NTK)", "stochastic-edge K"]
    assert len(trace.collections) == 1  # the standard-error band
    labels = [line.get_label() for line in k.get_lines()]
    assert "η tr(H) / 2B" in labels and "K = 1" in labels
    marks = [line for line in k.get_lines() if line.get_marker() == "x"]
    assert marks and list(marks[0].get_xdata()) == [80]  # K = inf at the last snapshot
    with pytest.raises(ValueError, match="no 'trace', 'ntk_trace' or 'stochastic_K'"):
        plot_traces(bare_run)


def test_missing_series_are_reported(bare_run, tmp_path):
    with pytest.raises(ValueError, match="has no densities"):
        plot_density_evolution(bare_run)
    with RunStore(tmp_path / "loss_only", config={}) as store:
        store.write_snapshot(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="no 'sharpness' or 'lambda_max'"):
        plot_sharpness(load_run(tmp_path / "loss_only"))
