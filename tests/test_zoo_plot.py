"""Built-in digits problems (curvscope.zoo) and the density figure (curvscope.plot)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import curvscope
from curvscope import DenseOperator, spectral_density, zoo
from curvscope.plot import DENSITY_FLOOR, plot_density

# --------------------------------------------------------------------------- zoo


def test_digits_data_shapes_dtypes_and_order():
    batches = zoo.digits_data()
    sizes = [len(t) for _, t in batches]
    assert sizes == [256] * 7 + [1797 - 7 * 256]
    inputs, targets = batches[0]
    assert inputs.dtype == torch.float32 and inputs.shape == (256, 64)
    assert targets.dtype == torch.int64 and set(targets.tolist()) == set(range(10))
    x = torch.cat([b[0] for b in batches]).double()
    # Standardized per pixel: mean 0, std 1 (constant pixels stay 0).
    assert x.mean(dim=0).abs().max() < 1e-5
    stds = x.std(dim=0, unbiased=False)
    assert torch.all(((stds - 1).abs() < 1e-4) | (stds == 0))


def test_digits_data_is_deterministic_and_seeded():
    first, again = zoo.digits_data(batch_size=100), zoo.digits_data(batch_size=100)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = zoo.digits_data(batch_size=100, seed=1)
    assert not torch.equal(first[0][1], other[0][1])
    small = zoo.digits_data(batch_size=64, num_samples=100)
    assert [len(t) for _, t in small] == [64, 36]
    assert torch.equal(small[0][0], first[0][0][:64])
    with pytest.raises(ValueError, match="num_samples"):
        zoo.digits_data(num_samples=0)


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    "factory, num_params",
    [
        (zoo.digits_mlp, 3466),
        (lambda seed: zoo.digits_mlp(hidden=(16,), activation="relu", seed=seed), 1210),
        (lambda seed: zoo.digits_mlp(batchnorm=True, seed=seed), 3466 + 2 * 64),
        (zoo.digits_cnn, 1898),
        (lambda seed: zoo.digits_cnn(batchnorm=True, seed=seed), 1898 + 2 * 24),
    ],
)
def test_factories_are_seeded_and_shaped(factory, num_params):
    rng_before = torch.get_rng_state()
    model, again, other = factory(seed=0), factory(seed=0), factory(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "a factory changed the global RNG"
    assert _same_params(model, again)
    assert not _same_params(model, other)
    assert sum(p.numel() for p in model.parameters()) == num_params
    inputs, _ = zoo.digits_data(batch_size=5)[0]
    assert model(inputs).shape == (5, 10)


def test_bad_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        zoo.digits_mlp(activation="swish")


def test_trained_mlp_is_deterministic_and_learns():
    rng_before = torch.get_rng_state()
    model, again = zoo.trained_digits_mlp(steps=60), zoo.trained_digits_mlp(steps=60)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_params(model, again)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert zoo.accuracy(model, zoo.digits_data()) > 0.9


def test_public_api_exports():
    assert curvscope.plot_density is plot_density
    assert curvscope.zoo is zoo
    assert {"plot_density", "zoo"} <= set(curvscope.__all__)


# --------------------------------------------------------------------------- plot


@pytest.fixture(scope="module")
def planted_density():
    """SLQ of a 60 x 60 matrix with a bulk near 0 and three outliers."""
    eigenvalues = np.concatenate([np.linspace(-0.5, 1.0, 57), [5.0, 8.0, 12.0]])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((60, 60)))
    matrix = torch.from_numpy((q * eigenvalues) @ q.T)
    return spectral_density(DenseOperator(matrix), num_iters=30, num_probes=3, seed=0)


def test_plot_density_writes_png_with_two_panels(tmp_path, planted_density):
    path = tmp_path / "sub" / "density.png"
    figure = plot_density(planted_density, path, top_eigenvalues=[12.0, 8.0, 5.0])
    assert isinstance(figure, Figure)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    linear, log = figure.axes
    assert len(figure.axes) == 2
    assert linear.get_yscale() == "linear" and log.get_yscale() == "log"
    curve = log.get_lines()[0].get_ydata()
    assert curve.min() >= DENSITY_FLOOR
    marks = [line for line in linear.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in marks) == [5.0, 8.0, 12.0]


def test_plot_density_draws_into_given_axes(planted_density):
    figure = Figure()
    axes = figure.subplots(1, 2)
    assert plot_density(planted_density, ax=axes, sigma=0.1) is figure
    with pytest.raises(ValueError, match="two axes"):
        plot_density(planted_density, ax=[axes[0]])
