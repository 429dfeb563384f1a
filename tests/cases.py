"""Small seeded problems shared by the tests, and dense float64 references built from scratch.

Every case has fewer than ~130 parameters and 21 samples in batches of 8, 8 and 5 (an uneven
last batch), so a dense Hessian costs a few hundred tiny backward passes. Builders draw from
their own seeds inside ``torch.random.fork_rng`` so building a case never moves the global RNG.

The reference :func:`dense_hessian` uses nothing from curvscope and no ``torch.func``: it
differentiates each entry of the gradient of a float64 deep copy of the model with plain
``torch.autograd`` (with BatchNorm in train mode, ``torch.func.hessian`` returned a Hessian
about 20% off without an error on torch 2.13). Each batch enters with weight |b| / N, the
model runs in its own mode (BatchNorm in train mode normalises with each batch's statistics).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH_SIZES = (8, 8, 5)
NUM_SAMPLES = sum(BATCH_SIZES)


@dataclass
class Case:
    """A model, a mean-reduced loss and a list of (inputs, targets) batches.

    Attributes:
        X, Y: All samples, so a ``TensorDataset``/``DataLoader`` can serve the same data.
        batchnorm_train: True when some BatchNorm layer uses batch statistics.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    X: torch.Tensor
    Y: torch.Tensor
    batchnorm_train: bool = False

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, start = [], 0
        for size in BATCH_SIZES:
            out.append((self.X[start : start + size], self.Y[start : start + size]))
            start += size
        return out

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _seeded(seed: int):
    """Run a builder with the global RNG seeded and restored afterwards."""

    def wrap(builder):
        @functools.wraps(builder)
        def build() -> Case:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return builder()

        return build

    return wrap


def _classes(num_classes: int) -> torch.Tensor:
    return torch.randint(0, num_classes, (NUM_SAMPLES,))


@_seeded(0)
def tanh_mlp_ce() -> Case:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return Case(
        "tanh_mlp_ce", model, nn.CrossEntropyLoss(), torch.randn(NUM_SAMPLES, 4), _classes(3)
    )


@_seeded(1)
def relu_mlp_mse() -> Case:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return Case(
        "relu_mlp_mse", model, F.mse_loss, torch.randn(NUM_SAMPLES, 4), torch.randn(NUM_SAMPLES, 2)
    )


@_seeded(2)
def cnn_ce() -> Case:
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    return Case("cnn_ce", model, F.cross_entropy, torch.randn(NUM_SAMPLES, 1, 6, 6), _classes(3))


def _randomise_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial affine parameters and running statistics (defaults are 1, 0, 0, 1)."""
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.3 * torch.randn_like(bn.weight))
        bn.bias.copy_(0.3 * torch.randn_like(bn.bias))
        bn.running_mean.copy_(0.5 * torch.randn_like(bn.running_mean))
        bn.running_var.copy_(0.5 + torch.rand_like(bn.running_var))
        bn.num_batches_tracked.fill_(7)


@_seeded(3)
def bn_train_mse() -> Case:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    _randomise_batchnorm(model[1])
    model.train()
    X, Y = torch.randn(NUM_SAMPLES, 4), torch.randn(NUM_SAMPLES, 3)
    return Case("bn_train_mse", model, nn.MSELoss(), X, Y, batchnorm_train=True)


@_seeded(4)
def bn_eval_ce() -> Case:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    _randomise_batchnorm(model[1])
    model.eval()
    return Case(
        "bn_eval_ce", model, nn.CrossEntropyLoss(), torch.randn(NUM_SAMPLES, 4), _classes(3)
    )


@_seeded(5)
def cnn_bn_train_ce() -> Case:
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )
    _randomise_batchnorm(model[1])
    model.train()
    X = torch.randn(NUM_SAMPLES, 1, 6, 6)
    return Case(
        "cnn_bn_train_ce", model, nn.CrossEntropyLoss(), X, _classes(3), batchnorm_train=True
    )


BUILDERS: dict[str, Callable[[], Case]] = {
    "tanh_mlp_ce": tanh_mlp_ce,
    "relu_mlp_mse": relu_mlp_mse,
    "cnn_ce": cnn_ce,
    "bn_train_mse": bn_train_mse,
    "bn_eval_ce": bn_eval_ce,
    "cnn_bn_train_ce": cnn_bn_train_ce,
}
CASE_NAMES = list(BUILDERS)
NO_BATCHNORM_TRAIN = [name for name in CASE_NAMES if "bn_train" not in name]


def make_case(name: str) -> Case:
    """A fresh copy of case ``name`` (same numbers every call)."""
    return BUILDERS[name]()


# ----- a model with two inputs, fed from dict batches through unpack_batch -----------------


class TwoInputNet(nn.Module):
    """out = head(tanh(a_layer(a) + b_layer(b))); called as ``model(a, b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a_layer = nn.Linear(3, 5)
        self.b_layer = nn.Linear(2, 5, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a_layer(a) + self.b_layer(b)))


def unpack_dict(batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (batch["a"], batch["b"]), batch["label"]


def two_input_case() -> tuple[nn.Module, Callable, list[dict[str, torch.Tensor]]]:
    """(model, loss_fn, dict batches) for the ``unpack_batch`` hook."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = TwoInputNet()
        a, b = torch.randn(NUM_SAMPLES, 3), torch.randn(NUM_SAMPLES, 2)
        label = _classes(3)
    batches, start = [], 0
    for size in BATCH_SIZES:
        part = slice(start, start + size)
        batches.append({"a": a[part], "b": b[part], "label": label[part]})
        start += size
    return model, F.cross_entropy, batches


# ----- dense references -------------------------------------------------------------------


def _to_float64(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {key: _to_float64(value) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(item) for item in obj)
    return obj


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _pair(batch: Any) -> tuple[Any, Any]:
    inputs, targets = batch
    return inputs, targets


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Sequence[Any],
    params: Sequence[str] | None = None,
    unpack: Callable[[Any], tuple[Any, Any]] = _pair,
) -> torch.Tensor:
    """Dense float64 Hessian of the mean loss over all samples of ``batches``.

    Args:
        params: Parameter names to differentiate by (flat order = ``named_parameters``
            order); default every parameter with ``requires_grad``.

    Returns:
        (n, n) float64 tensor; row i is d(grad_i)/d theta, not symmetrised.
    """
    ref = copy.deepcopy(model).double()  # keeps every submodule's train/eval mode
    wanted = set(params) if params is not None else None
    leaves = []
    for name, p in ref.named_parameters():
        use = p.requires_grad if wanted is None else name in wanted
        p.requires_grad_(use)
        if use:
            leaves.append(p)
    n = sum(p.numel() for p in leaves)
    sizes = [int(unpack(batch)[1].shape[0]) for batch in batches]
    total = sum(sizes)
    H = torch.zeros(n, n, dtype=torch.float64)
    with torch.enable_grad():
        for batch, size in zip(batches, sizes, strict=True):
            inputs, targets = unpack(batch)
            loss = loss_fn(_call(ref, _to_float64(inputs)), _to_float64(targets))
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            for i in range(n):
                if not flat[i].requires_grad:
                    continue  # this gradient entry is constant: its Hessian row is zero
                row = torch.autograd.grad(
                    flat[i], leaves, retain_graph=True, allow_unused=True, materialize_grads=True
                )
                H[i] += (size / total) * torch.cat([r.reshape(-1) for r in row])
    return H


@functools.cache
def _cached_dense_hessian(name: str) -> torch.Tensor:
    case = make_case(name)
    return dense_hessian(case.model, case.loss_fn, case.batches)


def dense_hessian_of(name: str) -> torch.Tensor:
    """Dense Hessian of case ``name`` (computed once per session; a fresh copy each call)."""
    return _cached_dense_hessian(name).clone()


@functools.cache
def _cached_eigh(name: str) -> tuple[np.ndarray, np.ndarray]:
    H = _cached_dense_hessian(name).numpy()
    return np.linalg.eigh(0.5 * (H + H.T))


def dense_eigh_of(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues (n,) and eigenvectors (n, n) of case ``name``'s dense Hessian."""
    values, vectors = _cached_eigh(name)
    return values.copy(), vectors.copy()


# ----- dense matrices with planted spectra -------------------------------------------------


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """Haar-ish orthogonal (n, n) matrix from the QR of a seeded Gaussian matrix."""
    gauss = np.random.default_rng(seed).standard_normal((n, n))
    Q, R = np.linalg.qr(gauss)
    return Q * np.sign(np.diag(R))


def planted(eigenvalues: Sequence[float] | np.ndarray, seed: int = 0) -> torch.Tensor:
    """Symmetric float64 matrix U diag(eigenvalues) U^T with a seeded random orthogonal U."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    U = random_orthogonal(values.size, seed)
    A = (U * values) @ U.T
    return torch.from_numpy(0.5 * (A + A.T))


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64."""
    approx, exact = approx.double(), exact.double()
    return float((approx - exact).norm() / exact.norm())


def tiny_problem(seed: int = 0):
    """A float64 tanh MLP (3 -> 4 -> 3, n = 31) with cross-entropy over 21 samples in batches
    of 8, 8 and 5: (model, loss_fn, batches)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        X = torch.randn(NUM_SAMPLES, 3, dtype=torch.float64)
        Y = torch.randint(0, 3, (NUM_SAMPLES,))
    batches, start = [], 0
    for size in BATCH_SIZES:
        batches.append((X[start : start + size], Y[start : start + size]))
        start += size
    return model, nn.CrossEntropyLoss(), batches
