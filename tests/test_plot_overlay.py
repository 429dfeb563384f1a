"""``plot_density`` with several densities: one labelled, coloured line per density on every
panel, on one grid with one kernel width, so that the curves can be compared."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from curvscope.linalg import spectral_density
from curvscope.linalg.density import ghorbani_variance
from curvscope.plot import DENSITY_FLOOR, plot_density


def planted(outlier: float, seed: int = 0) -> np.ndarray:
    eigenvalues = np.concatenate([np.linspace(-0.5, 1.0, 37), [outlier, 2 * outlier, 3.0]])
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((40, 40)))
    return (q * eigenvalues) @ q.T


@pytest.fixture(scope="module")
def two():
    early = spectral_density(planted(4.0), num_iters=20, num_probes=3, seed=0)
    late = spectral_density(planted(9.0, seed=1), num_iters=20, num_probes=3, seed=0)
    return early, late


def test_several_densities_share_a_grid_and_are_labelled(two, tmp_path):
    early, late = two
    path = tmp_path / "both.png"
    figure = plot_density(
        [early, late],
        path,
        labels=["step 0", "step 900"],
        colors=["tab:blue", "tab:orange"],
        dpi=50,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    linear, log = figure.axes
    assert linear.get_yscale() == "linear" and log.get_yscale() == "log"
    sigma = np.sqrt(ghorbani_variance(early.lambda_min, late.lambda_max))
    for panel in (linear, log):
        lines = panel.get_lines()
        assert [line.get_label() for line in lines] == ["step 0", "step 900"]
        assert [line.get_color() for line in lines] == ["tab:blue", "tab:orange"]
        grid = lines[0].get_xdata()
        np.testing.assert_array_equal(grid, lines[1].get_xdata())  # one grid
        assert grid[0] < early.lambda_min and grid[-1] > late.lambda_max  # spans both
        texts = [t.get_text() for t in panel.get_legend().get_texts()]
        assert texts == ["step 0", "step 900"]
    for line, density in zip(linear.get_lines(), two, strict=True):
        _, expected = density.density(line.get_xdata(), sigma)  # one kernel width
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)
    # The late density has its outlier at 18, the early one nothing there.
    grid, (a, b) = linear.get_lines()[0].get_xdata(), [ln.get_ydata() for ln in linear.get_lines()]
    near = np.abs(grid - 18.0) < 0.05
    assert b[near].max() > 1e-3 and a[near].max() < 1e-12
    assert min(line.get_ydata().min() for line in log.get_lines()) >= DENSITY_FLOOR
    assert "step 0, step 900" in figure._suptitle.get_text()


def test_a_mapping_gives_the_labels_and_one_log_panel_is_possible(two):
    early, late = two
    figure = plot_density({"H": early, "G": late}, panels="log", top_eigenvalues=[18.0])
    (panel,) = figure.axes
    assert panel.get_yscale() == "log"
    curves = [line for line in panel.get_lines() if line.get_linestyle() == "-"]
    assert [line.get_label() for line in curves] == ["H", "G"]
    assert [to_rgba(line.get_color()) for line in curves] == [to_rgba("C0"), to_rgba("C1")]
    marks = [line for line in panel.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in marks] == [18.0]


def test_one_density_draws_as_before(two):
    early, _ = two
    figure = plot_density(early)
    linear, _ = figure.axes
    (line,) = linear.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), early.grid(10_000))
    assert linear.get_legend() is None  # no label, no marks: no legend


def test_bad_arguments_are_refused(two):
    early, late = two
    with pytest.raises(ValueError, match=r"labels must be one per density \(2\), got 1"):
        plot_density([early, late], labels=["a"])
    with pytest.raises(ValueError, match=r"colors must be one per density \(2\), got 3"):
        plot_density([early, late], colors=["r", "g", "b"])
    with pytest.raises(ValueError, match="no densities to plot"):
        plot_density([])
    with pytest.raises(ValueError, match="panels must be one of both, linear, log"):
        plot_density(early, panels="loglog")
    with pytest.raises(ValueError, match="must be SpectralDensity results, got ndarray"):
        plot_density([early, np.zeros(3)])
    axes = Figure().subplots(1, 2)
    with pytest.raises(ValueError, match=r"ax must be one axes \(log\), got 2"):
        plot_density(early, ax=axes, panels="log")
    assert plot_density(early, ax=axes[0], panels="linear") is axes[0].get_figure()
