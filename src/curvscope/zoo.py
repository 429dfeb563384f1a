"""Built-in default problems on scikit-learn's digits (1797 8x8 images, 10 classes).

The data ship with scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
Every factory is deterministic: the same arguments give the same tensors, bit for bit, and
none of them touches the caller's global random state. Each is usable as a CLI import path,
e.g. ``--model curvscope.zoo:digits_cnn --data curvscope.zoo:digits_data``.

Default problem (``curvscope`` with no ``--model``/``--data``): :func:`trained_digits_mlp`
(64-32-32-10 tanh MLP, 3,466 parameters, trained on all 1797 digits) with the full digits
set in batches of 256 and the cross-entropy loss.
"""

from __future__ import annotations

import importlib.metadata
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from curvscope.model_cache import cached_arrays, cached_training, source_digest

NUM_FEATURES = 64
NUM_CLASSES = 10

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def digits_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits, standardized, in a fixed order drawn from ``seed``.

    Returns:
        (inputs float32 of shape (1797, 64), targets int64 of shape (1797,)). Each pixel is
        standardized to mean 0 and standard deviation 1 over the whole set; pixels that are
        constant (always 0) stay 0. The order is a permutation drawn from ``seed`` so that
        every batch holds all classes. Kept in the model cache (:mod:`curvscope.model_cache`)
        after the first call, which spares later processes the import of scikit-learn.
    """

    def compute() -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data.astype(np.float64)
        y = digits.target.astype(np.int64)
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
        order = np.random.default_rng(seed).permutation(len(y))
        return x[order].astype(np.float32), y[order]

    arguments = {"seed": int(seed), "scikit-learn": importlib.metadata.version("scikit-learn")}
    x, y = cached_arrays("digits", arguments, source_digest(__file__), compute)
    return x, y


def digits_data(batch_size: int = 256, num_samples: int | None = None, seed: int = 0) -> Batches:
    """The digits as a list of (inputs, targets) batches, fixed and deterministic.

    Args:
        batch_size: Samples per batch; the last batch holds the remainder.
        num_samples: Use only the first ``num_samples`` of the seeded order (default: all
            1797).
        seed: Seed of the sample order (see :func:`digits_arrays`).

    Returns:
        List of (inputs float32 (b, 64), targets int64 (b,)) pairs; a list can be walked any
        number of times, as curvature products need.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    x, y = digits_arrays(seed)
    if num_samples is not None:
        if not 1 <= num_samples <= len(y):
            raise ValueError(f"num_samples must be in [1, {len(y)}], got {num_samples}")
        x, y = x[:num_samples], y[:num_samples]
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    return [
        (inputs[i : i + batch_size], targets[i : i + batch_size])
        for i in range(0, len(y), batch_size)
    ]


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {name!r}")
    return _ACTIVATIONS[name]()


def _seeded_build(seed: int, build):
    """Run ``build()`` with torch's global RNG seeded, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def digits_mlp(
    hidden: Sequence[int] = (32, 32),
    activation: str = "tanh",
    batchnorm: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """An untrained MLP 64 -> hidden... -> 10 for the digits (PyTorch's default init).

    Args:
        hidden: Widths of the hidden layers; the default (32, 32) has 3,466 parameters.
        activation: "tanh", "relu", "gelu", "softplus" or "sigmoid".
        batchnorm: Put a ``BatchNorm1d`` after each hidden linear layer. The model is
            returned in train mode, where BatchNorm normalises with each batch's statistics
            (see docs/usage.md for what that means for the Hessian).
        seed: Seed of the initial weights.

    Returns:
        ``nn.Sequential`` taking (b, 64) float inputs and returning (b, 10) logits.
    """
    widths = [NUM_FEATURES, *[int(h) for h in hidden]]
    if any(w < 1 for w in widths):
        raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")

    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers.append(nn.Linear(fan_in, fan_out))
            if batchnorm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(_activation(activation))
        layers.append(nn.Linear(widths[-1], NUM_CLASSES))
        return nn.Sequential(*layers)

    return _seeded_build(seed, build)


def digits_cnn(batchnorm: bool = False, activation: str = "tanh", seed: int = 0) -> nn.Sequential:
    """An untrained small CNN for the 8x8 digits (1,898 parameters without BatchNorm).

    conv 3x3 (1 -> 8) -> act -> avg-pool 2 -> conv 3x3 (8 -> 16) -> act -> avg-pool 2 ->
    linear (64 -> 10). It takes the same flat (b, 64) inputs as the MLP and reshapes them to
    (b, 1, 8, 8) itself, so :func:`digits_data` feeds both.

    Args:
        batchnorm: Put a ``BatchNorm2d`` after each convolution (returned in train mode).
        activation: As in :func:`digits_mlp`.
        seed: Seed of the initial weights.
    """

    def build() -> nn.Sequential:
        def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
            block: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)]
            if batchnorm:
                block.append(nn.BatchNorm2d(c_out))
            return [*block, _activation(activation), nn.AvgPool2d(2)]

        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            *conv_block(1, 8),
            *conv_block(8, 16),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, NUM_CLASSES),
        )

    return _seeded_build(seed, build)


def train(
    model: nn.Module,
    data: Batches,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with Adam on the cross-entropy, cycling through ``data``.

    Deterministic: batches are visited in their fixed order, and any randomness in the
    model (dropout) is drawn from ``seed`` without touching the caller's global RNG state.

    Returns:
        The model, in eval mode (BatchNorm then uses the running statistics it gathered).
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            inputs, targets = data[step % len(data)]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


def trained_digits_mlp(
    steps: int = 200,
    seed: int = 0,
    hidden: Sequence[int] = (32, 32),
    activation: str = "tanh",
    batchnorm: bool = False,
    cache: bool = True,
) -> nn.Sequential:
    """:func:`digits_mlp` trained with Adam (lr 3e-3) for ``steps`` batches of 256 digits.

    The default problem of the ``curvscope`` command. Training runs on all 1797 digits of
    :func:`digits_data` (so the Hessian the CLI measures is that of the training loss); the
    result is the same on every call. The trained weights are kept in the model cache
    (:mod:`curvscope.model_cache`: ``~/.cache/curvscope`` unless ``CURVSCOPE_CACHE_DIR`` or
    ``CURVSCOPE_NO_CACHE`` say otherwise), so later calls, in any process, skip the training.

    Args:
        steps: Adam steps, one batch of 256 each.
        seed: Seed of the initial weights and of the data order.
        hidden: As in :func:`digits_mlp`.
        activation: As in :func:`digits_mlp`.
        batchnorm: As in :func:`digits_mlp`.
        cache: False trains afresh and neither reads nor writes the cache.

    Returns:
        The trained model in eval mode.
    """
    arguments = {
        "steps": int(steps),
        "seed": int(seed),
        "hidden": [int(h) for h in hidden],
        "activation": activation,
        "batchnorm": bool(batchnorm),
    }

    def build() -> nn.Sequential:
        return digits_mlp(hidden=hidden, activation=activation, batchnorm=batchnorm, seed=seed)

    def fit(model: nn.Module) -> nn.Module:
        return train(model, digits_data(seed=seed), steps=steps, seed=seed)

    return cached_training(
        "trained_digits_mlp", arguments, source_digest(__file__), build, fit, enabled=cache
    )


def accuracy(model: nn.Module, data: Batches) -> float:
    """Fraction of samples of ``data`` that ``model`` classifies correctly."""
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in data:
            correct += int((model(inputs).argmax(dim=1) == targets).sum())
            total += int(targets.numel())
    return correct / total


# --------------------------------------------------------------------------------------------
# Training-dynamics problems (``curvscope track`` and experiments/): the Cohen et al. 2021
# setting scaled down


def digits_subset(num_samples: int = 1000, batch_size: int | None = None, seed: int = 0) -> Batches:
    """The first ``num_samples`` digits of the seeded order, by default as one full batch.

    The default training set of ``curvscope track``: with a tanh :func:`digits_mlp` and the
    mean-squared error on one-hot targets (``--loss mse``) it is the edge-of-stability setting
    of Cohen et al. 2021 (tanh MLP, MSE, a 5,000-image CIFAR-10 subset) at CPU scale.

    Args:
        num_samples: Samples kept (1 to 1797).
        batch_size: Samples per batch of the returned list (default: all in one batch). The
            batches only split the data for the curvature products; the batch size of SGD is
            ``curvscope track --batch-size``.
        seed: Seed of the sample order (see :func:`digits_arrays`).

    Returns:
        List of (inputs float32 (b, 64), targets int64 (b,)) pairs.
    """
    return digits_data(batch_size=batch_size or num_samples, num_samples=num_samples, seed=seed)


def digits_sign_data(
    num_samples: int = 1000, batch_size: int | None = None, seed: int = 0
) -> Batches:
    """A scalar regression target on the digits: +1 for the digits 0-4, -1 for 5-9.

    With one output per sample the Gauss-Newton part of each sample's Hessian has rank one,
    the setting of the stochastic edge of stability (Agarwala & Pennington 2024), whose noise
    kernel norm K (:mod:`curvscope.analysis.stochastic_edge`) is defined for one output per
    sample.

    Returns:
        List of (inputs float32 (b, 64), targets float32 (b, 1)) pairs; one batch by default.
    """
    x, y = digits_arrays(seed)
    if not 1 <= num_samples <= len(y):
        raise ValueError(f"num_samples must be in [1, {len(y)}], got {num_samples}")
    batch_size = batch_size or num_samples
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    inputs = torch.from_numpy(x[:num_samples])
    targets = torch.from_numpy(np.where(y[:num_samples] < 5, 1.0, -1.0).astype(np.float32))
    targets = targets[:, None]
    return [
        (inputs[i : i + batch_size], targets[i : i + batch_size])
        for i in range(0, num_samples, batch_size)
    ]


def digits_regressor(
    hidden: Sequence[int] = (32, 32), activation: str = "tanh", seed: int = 0
) -> nn.Sequential:
    """An untrained MLP 64 -> hidden... -> 1 for :func:`digits_sign_data` (default init).

    The default (32, 32) has 3,169 parameters.
    """
    widths = [NUM_FEATURES, *[int(h) for h in hidden]]
    if any(w < 1 for w in widths):
        raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")

    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), _activation(activation)]
        layers.append(nn.Linear(widths[-1], 1))
        return nn.Sequential(*layers)

    return _seeded_build(seed, build)
