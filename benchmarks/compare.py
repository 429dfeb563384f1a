"""Side by side: curvscope vs PyHessian vs curvlinops vs hessian-eigenthings, on this CPU.

For each model (a small MLP whose exact Hessian is computable, a ~1M-parameter MLP, a small CNN
with BatchNorm in train mode; all on scikit-learn's digits) every tool does what it offers on
the same model, data, number of Lanczos steps, probes and products:

- ``density``: stochastic Lanczos quadrature, ``m`` steps x ``P`` probes;
- ``top``: the largest eigenvalue, each tool's convergent method at its tolerance;
- ``trace``: Hutch++ (Hutchinson for PyHessian, which has nothing else) with ``T`` products.

Measured: wall time (median over ``--repeats``), operator products, peak memory above the
process's resident set before the task, and accuracy against the exact spectrum where it is
computable (dense float64 Hessian built column by column with ``torch.autograd`` double
backward): relative error of the top eigenvalue and of the trace, and the Wasserstein-1
distance between each tool's quadrature measure (Ritz values and weights) and the exact
eigenvalue distribution. The table gives each tool's time as a ratio to curvscope's.

Each (tool, model, repeat) runs in a fresh child process (so one tool's allocator cache and
global state never touch another's), the tools' order rotates from one repeat to the next and
so does the order of the tasks inside a child. Peak memory per task is the kernel's high-water
mark of the resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each task;
``ru_maxrss`` of the child where that is unavailable) minus the resident set before the task.

What the competitors need to run on torch 2.13, all done here and printed in the output:

- PyHessian 0.1: ``density()`` calls ``torch.eig``, removed from torch; it is shimmed over
  ``torch.linalg.eig`` in PyHessian's child process only.
- PyHessian 0.1 calls ``model.eval()`` in its constructor: on the BatchNorm model it measures
  the eval-mode Hessian (running statistics), not the train-mode one the others measure.
- curvlinops 3.0.1 raises under torch.func on BatchNorm in train mode (in-place update of the
  running statistics); its copy of the model then gets ``track_running_stats=False`` (the same
  train-mode loss).

The comparison packages live in a separate environment (``make bench-env`` builds
``.venv-bench``; see benchmarks/requirements-bench.txt), never in curvscope's dependencies.

Run from the repository root::

    make bench-env                                        # once: .venv-bench
    .venv-bench/bin/python benchmarks/compare.py          # full run (see docs/comparison.md)
    .venv-bench/bin/python benchmarks/compare.py --quick  # smoke run, a few minutes
    .venv-bench/bin/python benchmarks/compare.py --models mlp-small --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "results" / "compare-cache"  # results/ is gitignored

TOOLS = ("curvscope-f64", "curvscope-f32", "pyhessian", "curvlinops", "eigenthings")
TOOL_TITLES = {
    "curvscope-f64": "curvscope f64",
    "curvscope-f32": "curvscope f32",
    "pyhessian": "PyHessian",
    "curvlinops": "curvlinops",
    "eigenthings": "h-eigenthings",
}
TOOL_DTYPES = {
    "curvscope-f64": "float64 (default)",
    "curvscope-f32": "float32 products, float64 recurrences",
    "pyhessian": "float32 (model's)",
    "curvlinops": "float32 (model's)",
    "eigenthings": "float32 (model's)",
}
TASKS = ("density", "top", "trace")
TOP_TOL = 1e-4  # relative tolerance where a tool takes one (curvscope, curvlinops, eigenthings)
CERTIFIED_TOL = 1e-8  # curvscope's default: the reference top eigenvalue where none is exact
PYHESSIAN_TOL = 1e-3  # PyHessian's default tolerance on successive power-iteration estimates

# Targets of issue 5 (this CPU): competitor time / curvscope time must be at least this.
TARGETS = {
    ("density", "pyhessian"): 2.0,
    ("density", "curvlinops"): 1.5,
    ("density", "eigenthings"): 1.5,
    ("top", "pyhessian"): 1.0,
    ("top", "curvlinops"): 1.0,
    ("top", "eigenthings"): 1.0,
    ("trace", "pyhessian"): 1.0,
    ("trace", "curvlinops"): 1.0,
    ("trace", "eigenthings"): 1.0,
}
ACCURACY_SLACK = 1.10  # "equal or better accuracy": curvscope's error <= 1.1 x the other's


# ---------------------------------------------------------------------------------------------
# Models and data (both processes)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark problem and the sizes every tool runs it with."""

    key: str
    kind: str  # "mlp" or "cnn"
    hidden: tuple[int, ...]  # MLP widths, or CNN channels
    num_samples: int
    batch_size: int
    train_steps: int
    batchnorm_train: bool
    exact: bool  # dense Hessian computable
    steps: int  # Lanczos steps m
    probes: int  # SLQ probes P
    trace_products: int  # T

    def title(self, n: int) -> str:
        if self.kind == "mlp":
            widths = "-".join(str(w) for w in (64, *self.hidden, 10))
            name = f"MLP {widths} tanh"
        else:
            name = f"CNN {self.hidden[0]}-{self.hidden[1]} ch + BatchNorm (train mode)"
        return f"{name}, n = {n:,}"

    def data_line(self) -> str:
        sizes = batch_sizes(self.num_samples, self.batch_size)
        return f"{self.num_samples} digits in {len(sizes)} batches of {'/'.join(map(str, sizes))}"


def full_specs(quick: bool) -> dict[str, ModelSpec]:
    """The three problems; ``quick`` shrinks them for a smoke run."""
    if quick:
        return {
            "mlp-small": ModelSpec("mlp-small", "mlp", (16,), 300, 100, 60, False, True, 20, 2, 12),
            "mlp-1m": ModelSpec("mlp-1m", "mlp", (256, 128), 200, 100, 30, False, False, 10, 2, 9),
            "cnn-bn": ModelSpec("cnn-bn", "cnn", (4, 8), 128, 64, 30, True, True, 12, 2, 9),
        }
    return {
        # 3,466 parameters, all 1797 digits in three even batches: exact Hessian in ~1 minute.
        "mlp-small": ModelSpec(
            "mlp-small", "mlp", (32, 32), 1797, 599, 300, False, True, 90, 5, 99
        ),
        # 993,930 parameters; one product over all 1797 digits costs ~1 s (float32) to 2 s
        # (float64) on one busy core, so 600 digits in two batches and a reduced budget
        # (m = 20 steps x P = 2 probes, 30 trace products) keep the whole run near 15 min.
        "mlp-1m": ModelSpec("mlp-1m", "mlp", (1024, 896), 600, 300, 60, False, False, 20, 2, 30),
        # 1,946 parameters; float64 convolution double-backward is slow on the CPU, so 512
        # digits in two batches of 256, m = 40 x P = 2, 30 trace products.
        "cnn-bn": ModelSpec("cnn-bn", "cnn", (8, 16), 512, 256, 150, True, True, 40, 2, 30),
    }


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    return [min(batch_size, num_samples - s) for s in range(0, num_samples, batch_size)]


def build_model(spec: ModelSpec) -> nn.Module:
    """Untrained model, weights drawn from seed 0 without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.kind == "mlp":
            layers: list[nn.Module] = []
            for fan_in, fan_out in itertools.pairwise((64, *spec.hidden)):
                layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
            layers.append(nn.Linear(spec.hidden[-1], 10))
            return nn.Sequential(*layers)
        c1, c2 = spec.hidden
        return nn.Sequential(  # on (b, 1, 8, 8) images
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 2 * 2, 10),
        )


def digits_tensors(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized digits in a fixed seeded order (every batch holds all classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    order = np.random.default_rng(0).permutation(len(digits.target))[: spec.num_samples]
    inputs = torch.tensor(x[order], dtype=torch.float32)
    if spec.kind == "cnn":
        inputs = inputs.reshape(-1, 1, 8, 8)
    return inputs, torch.tensor(digits.target[order], dtype=torch.long)


def make_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list:
    return [
        (inputs[s : s + batch_size], targets[s : s + batch_size])
        for s in range(0, len(targets), batch_size)
    ]


def train(model: nn.Module, batches: list, steps: int) -> None:
    """Adam (lr 3e-3) on the cross-entropy, batches in order, deterministic."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        inputs, targets = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load_problem(path: Path, spec: ModelSpec) -> tuple[nn.Module, list]:
    """The trained model (in the mode its Hessian is measured in) and its batches."""
    saved = torch.load(path, weights_only=True)
    model = build_model(spec)
    model.load_state_dict(saved["state"])
    model.train(spec.batchnorm_train)  # BatchNorm uses batch statistics; MLPs: mode moot
    return model, make_batches(saved["inputs"], saved["targets"], spec.batch_size)


# ---------------------------------------------------------------------------------------------
# Exact reference (parent process)
# ---------------------------------------------------------------------------------------------


def dense_hessian(model: nn.Module, batches: list) -> torch.Tensor:
    """Dense float64 Hessian of the mean cross-entropy, column by column, plain autograd.

    Each batch b enters with weight |b| / N; the model runs in its own mode (BatchNorm in
    train mode normalises with each batch's statistics). Nothing from curvscope.
    """
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    total = sum(len(t) for _, t in batches)
    H = torch.zeros(n, n, dtype=torch.float64)
    started = time.perf_counter()
    for b, (inputs, targets) in enumerate(batches):
        loss = F.cross_entropy(model(inputs.double()), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for j in range(n):
            row = torch.autograd.grad(flat[j], params, retain_graph=j < n - 1, allow_unused=True)
            H[j] += (len(targets) / total) * torch.cat(
                [
                    torch.zeros(p.numel(), dtype=torch.float64) if r is None else r.reshape(-1)
                    for p, r in zip(params, row, strict=True)
                ]
            )
        print(
            f"    exact Hessian: batch {b + 1}/{len(batches)} done "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    asym = float((H - H.T).abs().max() / H.abs().max())
    if asym > 1e-10:
        raise RuntimeError(f"dense Hessian not symmetric (relative {asym:.1e})")
    return (H + H.T) / 2


# ---------------------------------------------------------------------------------------------
# Child process: one tool on one model, all tasks
# ---------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark; False where it can't be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Peak resident set of a block above the resident set before it (MiB)."""

    def __init__(self) -> None:
        self.exact = _reset_peak() and _status_mb("VmHWM") is not None

    def __enter__(self) -> MemoryMeter:
        gc.collect()
        _malloc_trim()
        if self.exact:
            _reset_peak()
            self.before = _status_mb("VmRSS") or 0.0
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_mb("VmHWM") if self.exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_delta = max(0.0, peak - self.before)
        self.peak = peak


def torch_eig_shim(A: torch.Tensor, eigenvectors: bool = False):
    """The removed ``torch.eig`` in its old format: ((n, 2) real/imag eigenvalues, vectors)."""
    values, vectors = torch.linalg.eig(A)
    pairs = torch.stack([values.real, values.imag], dim=1)
    return pairs, (vectors.real if eigenvectors else A.new_empty(0))


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Run every task of one tool on one model; returns times, products, memory, results."""
    torch.set_num_threads(job["threads"])
    spec = ModelSpec(**{k: tuple(v) if k == "hidden" else v for k, v in job["spec"].items()})
    tool = job["tool"]
    model, batches = load_problem(Path(job["problem"]), spec)
    counter = {"products": 0}
    notes: list[str] = []
    m, P, T, seed = spec.steps, spec.probes, spec.trace_products, 0

    setup_started = time.perf_counter()
    if tool.startswith("curvscope"):
        from curvscope.linalg import spectral_density, top_eigenpairs, trace
        from curvscope.operators import HessianOperator

        dtype = torch.float64 if tool == "curvscope-f64" else torch.float32
        op = HessianOperator(model, F.cross_entropy, batches, dtype=dtype)
        raw_matmat = op.matmat

        def counted_matmat(V: torch.Tensor) -> torch.Tensor:
            counter["products"] += V.shape[1]
            return raw_matmat(V)

        op.matmat = counted_matmat  # type: ignore[method-assign]

        def density() -> dict:
            nodes, weights = spectral_density(op, num_iters=m, num_probes=P, seed=seed).flat()
            return {"nodes": nodes.tolist(), "weights": weights.tolist()}

        def top(tol: float = TOP_TOL) -> dict:
            pairs = top_eigenpairs(op, k=1, tol=tol, max_products=3000, seed=seed)
            return {"value": float(pairs.values[0]), "residual": float(pairs.residuals[0])}

        def trace_task() -> dict:
            estimate = trace(op, num_probes=T, method="hutch++", seed=seed)
            return {"value": estimate.value, "std_error": estimate.std_error}

        # PyHessian stops when successive estimates change by less than 1e-3: curvscope at
        # the same number as its (stricter) residual tolerance, timed in every repeat.
        extras: dict[str, Callable[[], dict]] = {"top-1e-3": lambda: top(PYHESSIAN_TOL)}
        if tool == "curvscope-f64" and job["repeat"] == 0:
            extras["top-certified"] = lambda: top(CERTIFIED_TOL)
            if spec.exact:
                extras["top10"] = lambda: {
                    "values": top_eigenpairs(op, k=10, tol=1e-6, seed=seed).values.tolist()
                }

    elif tool == "pyhessian":
        from pyhessian import hessian as PyHessian

        # torch.eig survives in torch 2.x only as a stub that raises: replace it here.
        torch.eig = torch_eig_shim  # type: ignore[attr-defined]
        notes.append("torch.eig (removed from torch) shimmed over torch.linalg.eig for density()")
        was_training = model.training
        hess = PyHessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        if was_training and not model.training:
            notes.append("PyHessian set model.eval(): BatchNorm uses running statistics")
        raw_product = hess.dataloader_hv_product

        def counted_product(v):
            counter["products"] += 1
            return raw_product(v)

        hess.dataloader_hv_product = counted_product

        def density() -> dict:
            torch.manual_seed(seed)
            eigen_lists, weight_lists = hess.density(iter=m, n_v=P)
            nodes = np.concatenate([np.asarray(e, dtype=np.float64) for e in eigen_lists])
            weights = np.concatenate([np.asarray(w, dtype=np.float64) for w in weight_lists])
            return {"nodes": nodes.tolist(), "weights": (weights / P).tolist()}

        def top() -> dict:
            torch.manual_seed(seed)
            values, _ = hess.eigenvalues(maxIter=100, tol=1e-3, top_n=1)  # its defaults
            return {"value": float(values[0])}

        def trace_task() -> dict:
            torch.manual_seed(seed)
            samples = hess.trace(maxIter=T, tol=0.0)  # tol=0: spend all T products
            return {"value": float(np.mean(samples))}

        extras = {}
        if job["repeat"] == 0 and spec.exact:

            def top_tight() -> dict:  # its power iteration asked for more accuracy
                torch.manual_seed(seed)
                values, _ = hess.eigenvalues(maxIter=100, tol=1e-6, top_n=1)
                return {"value": float(values[0])}

            extras["top-tight"] = top_tight

    elif tool == "curvlinops":
        from curvlinops import HessianLinearOperator, hutchpp_trace
        from curvlinops.papyan2020traces.spectrum import LanczosApproximateSpectrumCached
        from scipy.sparse.linalg import eigsh

        params = [p for p in model.parameters() if p.requires_grad]
        try:
            A = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches)
        except RuntimeError as error:
            if "mutate a captured Tensor" not in str(error):
                raise
            # torch.func refuses BatchNorm's in-place running-statistics update in train
            # mode. Without running statistics a train-mode BatchNorm computes the same
            # function (batch statistics), so drop them on this tool's copy of the model.
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.track_running_stats = False
            A = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches)
            notes.append(
                "HessianLinearOperator raised 'RuntimeError: During a grad (vjp, jvp, grad, "
                "etc) transform, the function provided attempted to call in-place operation "
                "(aten::add_.Tensor) that would mutate a captured Tensor' on BatchNorm in "
                "train mode; ran with track_running_stats=False (same train-mode loss)"
            )
        raw_matmat = A._matmat

        def counted_matmat(M):
            counter["products"] += M[0].shape[-1]
            return raw_matmat(M)

        A._matmat = counted_matmat

        def density() -> dict:
            torch.manual_seed(seed)
            cached = LanczosApproximateSpectrumCached(A, ncv=m)  # estimates the edges first
            cached.approximate_spectrum(num_repeats=P)
            nodes, weights = [], []
            for evals, evecs in cached._get_lanczos_iters(P):  # the P quadratures it made
                nodes.append(evals.double().numpy())
                weights.append((evecs[0, :] ** 2).double().numpy() / P)
            return {
                "nodes": np.concatenate(nodes).tolist(),
                "weights": np.concatenate(weights).tolist(),
            }

        def top() -> dict:
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
            values = eigsh(
                A.to_scipy(), k=1, which="LA", tol=TOP_TOL, v0=v0, return_eigenvectors=False
            )
            return {"value": float(values[0])}

        def trace_task() -> dict:
            torch.manual_seed(seed)
            return {"value": float(hutchpp_trace(A, T))}

        extras = {}

    elif tool == "eigenthings":
        import hessian_eigenthings as he

        H = he.HessianOperator(model, batches, he.supervised_loss(F.cross_entropy))
        raw_matvec = H.matvec

        def counted_matvec(v):
            counter["products"] += 1
            return raw_matvec(v)

        H.matvec = counted_matvec

        def density() -> dict:
            result = he.spectral_density(H, num_runs=P, lanczos_steps=m, seed=seed)
            nodes = result.raw_eigenvalues.double().numpy().reshape(-1)
            weights = result.raw_weights.double().numpy().reshape(-1) / P
            keep = np.isfinite(nodes)
            return {"nodes": nodes[keep].tolist(), "weights": weights[keep].tolist()}

        def top() -> dict:
            result = he.deflated_power_iteration(H, k=1, tol=TOP_TOL, seed=seed)  # max_iter 100
            return {"value": float(result.eigenvalues[0]), "converged": bool(result.converged[0])}

        def trace_task() -> dict:
            return {"value": he.trace(H, num_matvecs=T, seed=seed).estimate}  # Hutch++

        extras = {}
        if job["repeat"] == 0 and spec.exact:
            # Its Lanczos: README call (k=10 -> 20 steps, reorthogonalized) and 90 steps,
            # where reorthogonalization is off by default (it is on only for <= 50 steps).
            extras["top10"] = lambda: {
                "values": he.lanczos(H, k=10, seed=seed).eigenvalues.tolist()
            }
            extras["top10-m90"] = lambda: {
                "values": he.lanczos(H, k=10, max_iter=90, seed=seed).eigenvalues.tolist()
            }
            if not spec.batchnorm_train:
                # Batch weighting: the same digits in batches of sizes that do not divide N.
                uneven = make_batches(
                    torch.cat([x for x, _ in batches]),
                    torch.cat([t for _, t in batches]),
                    max(1, spec.batch_size * 5 // 6),
                )
                H_uneven = he.HessianOperator(model, uneven, he.supervised_loss(F.cross_entropy))
                probe = torch.randn(H.size, generator=torch.Generator().manual_seed(1))

                def weighting() -> dict:
                    return {
                        "batches": [len(t) for _, t in uneven],
                        "Hv_uneven": H_uneven.matvec(probe).double().tolist(),
                        "probe": probe.double().tolist(),
                    }

                extras["weighting"] = weighting
    else:
        raise ValueError(f"unknown tool {tool!r}")
    setup_s = time.perf_counter() - setup_started
    setup_products = counter["products"]

    tasks: dict[str, Callable[[], dict]] = {"density": density, "top": top, "trace": trace_task}
    order = list(tasks)
    shift = job["repeat"] % len(order)
    order = order[shift:] + order[:shift] + list(extras)
    tasks.update(extras)
    out: dict[str, Any] = {}
    for name in order:
        counter["products"] = 0
        meter = MemoryMeter()
        try:
            with meter:
                started = time.perf_counter()
                result = tasks[name]()
                seconds = time.perf_counter() - started
        except Exception as error:  # a tool's failure is a result
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        out[name] = {
            "time_s": seconds,
            "products": counter["products"],
            "peak_mb": meter.peak_delta,
            "result": result,
        }
    return {
        "tool": tool,
        "model": spec.key,
        "repeat": job["repeat"],
        "setup_s": setup_s,
        "setup_products": setup_products,
        "n": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "memory_exact": MemoryMeter().exact,
        "threads": torch.get_num_threads(),
        "notes": notes,
        "tasks": out,
    }


# ---------------------------------------------------------------------------------------------
# Parent: preparation, scheduling, accuracy, table
# ---------------------------------------------------------------------------------------------


def spec_hash(spec: ModelSpec) -> str:
    text = json.dumps(asdict(spec), sort_keys=True) + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare(spec: ModelSpec, cache: Path) -> tuple[Path, np.ndarray | None, np.ndarray | None]:
    """Train (or load) the model; exact eigenvalues and dense Hessian where computable."""
    cache.mkdir(parents=True, exist_ok=True)
    key = f"{spec.key}-{spec_hash(spec)}"
    problem = cache / f"{key}.pt"
    if not problem.exists():
        inputs, targets = digits_tensors(spec)
        model = build_model(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            train(model, make_batches(inputs, targets, spec.batch_size), spec.train_steps)
        torch.save({"state": model.state_dict(), "inputs": inputs, "targets": targets}, problem)
    if not spec.exact:
        return problem, None, None
    exact = cache / f"{key}-exact.npz"
    if not exact.exists():
        model, batches = load_problem(problem, spec)
        print(f"  computing the exact Hessian of {spec.key} (cached in {exact}) ...", flush=True)
        H = dense_hessian(model, batches)
        np.savez(exact, H=H.numpy(), eigenvalues=np.linalg.eigvalsh(H.numpy()))
    saved = np.load(exact)
    return problem, saved["eigenvalues"], saved["H"]


def exact_slq_band(H: np.ndarray, eigs: np.ndarray, spec: ModelSpec, draws: int = 16) -> dict:
    """W1 / width of SLQ in exact arithmetic with the benchmark's m and P, over ``draws``
    independent sets of P probes: how far from the exact density P probes land by chance.

    Lanczos runs on diag(eigenvalues) from the probes' coordinates in the eigenbasis (the same
    tridiagonal as on H), in float64 with full reorthogonalization, so only the choice of
    probes varies. Returns {probe kind: (10th percentile, median, 90th percentile)}.
    """
    from scipy.linalg import eigh_tridiagonal

    _, U = np.linalg.eigh(H)
    n, width = eigs.size, float(eigs[-1] - eigs[0])
    rng = np.random.default_rng(2024)
    band = {}
    for kind in ("gaussian", "rademacher"):
        values = []
        for _ in range(draws):
            if kind == "gaussian":
                V = rng.standard_normal((n, spec.probes))
            else:
                V = rng.choice([-1.0, 1.0], size=(n, spec.probes))
            coords = U.T @ V
            nodes, weights = [], []
            for p in range(spec.probes):
                q = coords[:, p] / np.linalg.norm(coords[:, p])
                basis, alphas, betas = [q], [], []
                for j in range(min(spec.steps, n)):
                    w = eigs * basis[-1]
                    alphas.append(float(w @ basis[-1]))
                    Q = np.array(basis)
                    for _ in range(2):
                        w -= Q.T @ (Q @ w)
                    beta = float(np.linalg.norm(w))
                    if j == spec.steps - 1 or beta < 1e-10 * max(abs(alphas[0]), 1e-300):
                        break
                    betas.append(beta)
                    basis.append(w / beta)
                theta, vecs = eigh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))
                nodes.append(theta)
                weights.append(vecs[0] ** 2 / spec.probes)
            values.append(
                wasserstein1(np.concatenate(nodes), np.concatenate(weights), eigs) / width
            )
        band[kind] = tuple(float(np.percentile(values, q)) for q in (10, 50, 90))
    return band


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(job["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "job.json"
        out_path = Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    str(spec_path),
                    "--child-out",
                    str(out_path),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"tool": job["tool"], "error": f"timed out after {timeout:.0f} s", "tasks": {}}
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"tool": job["tool"], "error": " | ".join(tail)[:300], "tasks": {}}
        return json.loads(out_path.read_text())


def wasserstein1(nodes, weights, exact: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    nodes, weights = np.asarray(nodes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(nodes) & (weights > 0)
    return float(wasserstein_distance(exact, nodes[keep], None, weights[keep]))


def count_duplicates(values: list[float], rel: float = 1e-3) -> int:
    """Values within ``rel`` (relative) of an earlier one: Lanczos ghosts when the exact
    eigenvalues are distinct."""
    values = sorted(values, reverse=True)
    return sum(1 for a, b in itertools.pairwise(values) if abs(a - b) <= rel * max(abs(a), abs(b)))


def fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def machine_line(threads: int) -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {platform.platform()} | {cpu} | os.cpu_count()={os.cpu_count()} | "
        f"python {platform.python_version()} | torch {torch.__version__} | "
        f"torch threads per tool process: {threads}"
    )


def load_line() -> str:
    try:
        loads = Path("/proc/loadavg").read_text().split()[:3]
        return "load average (1/5/15 min): " + " ".join(loads)
    except OSError:
        return "load average: ?"


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("curvscope", "PyHessian", "curvlinops-for-pytorch", "hessian-eigenthings"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} MISSING")
    return "versions: " + ", ".join(parts)


def median_of(runs: list[dict], task: str, field: str) -> float | None:
    values = [r["tasks"][task][field] for r in runs if field in r["tasks"].get(task, {})]
    return statistics.median(values) if values else None


def first_result(runs: list[dict], task: str) -> dict | None:
    for r in runs:
        if "result" in r["tasks"].get(task, {}):
            return r["tasks"][task]["result"]
    return None


def first_error(runs: list[dict], task: str) -> str | None:
    for r in runs:
        if "error" in r:
            return r["error"]
        if "error" in r["tasks"].get(task, {}):
            return r["tasks"][task]["error"]
    return None


def report_model(spec, n, runs_by_tool, eigs, H, tools, band) -> list[dict]:
    """Print one model's block; return rows for the targets summary."""
    ref = runs_by_tool.get("curvscope-f64", [])
    exact = eigs is not None
    lam_max = float(eigs[-1]) if exact else None
    tr_exact = float(eigs.sum()) if exact else None
    width = float(eigs[-1] - eigs[0]) if exact else None
    if not exact:
        certified = first_result(ref, "top-certified")
        lam_max = certified["value"] if certified else None
    print()
    print(f"== {spec.title(n)}; {spec.data_line()}")
    print(
        f"   density: m = {spec.steps} Lanczos steps x P = {spec.probes} probes; "
        f"trace: {spec.trace_products} products; top: tol {TOP_TOL:g} where a tool takes one "
        f"(PyHessian: its default 1e-3 on successive estimates, 100 iterations at most)"
    )
    if exact:
        print(
            f"   exact: lambda_max = {lam_max:.6g}, lambda_min = {eigs[0]:.4g}, "
            f"trace = {tr_exact:.6g} (dense float64 Hessian, {n:,} columns)"
        )
        if band:
            text = "; ".join(
                f"{kind} probes {lo:.1e} / {mid:.1e} / {hi:.1e}"
                for kind, (lo, mid, hi) in band.items()
            )
            print(
                f"   W1 / width of SLQ in exact arithmetic, same m and P, 16 draws of probes "
                f"(10% / median / 90%): {text}"
            )
    elif lam_max is not None:
        print(
            f"   no exact spectrum: top eigenvalue reference = curvscope float64 at relative "
            f"residual {CERTIFIED_TOL:g} ({lam_max:.8g}); no trace or density reference"
        )
    header = f"   {'task':<8} {'measure':<20}" + "".join(f"{TOOL_TITLES[t]:>15}" for t in tools)
    print(header)
    print("   " + "-" * (len(header) - 3))
    summary = []
    base = {task: median_of(ref, task, "time_s") for task in TASKS}
    for task in TASKS:
        cells: dict[str, dict[str, str]] = {}
        errors: dict[str, float | None] = {}
        for tool in tools:
            runs = runs_by_tool.get(tool, [])
            t = median_of(runs, task, "time_s")
            error = first_error(runs, task) if t is None else None
            res = first_result(runs, task)
            acc = None
            if res is not None:
                if task == "density" and exact:
                    acc = wasserstein1(res["nodes"], res["weights"], eigs) / width
                elif task == "top" and lam_max is not None:
                    acc = abs(res["value"] - lam_max) / abs(lam_max)
                elif task == "trace" and exact:
                    acc = abs(res["value"] - tr_exact) / abs(tr_exact)
            errors[tool] = acc
            ratio = t / base[task] if (t is not None and base[task]) else None
            cells[tool] = {
                "time": fmt(t, ".3g") if t is not None else ("ERROR" if error else "-"),
                "ratio": fmt(ratio, ".2f"),
                "products": fmt(median_of(runs, task, "products"), ".0f"),
                "peak": fmt(median_of(runs, task, "peak_mb"), ".0f"),
                "acc": fmt(acc, ".2e"),
                "value": fmt(res.get("value"), ".6g") if res and "value" in res else "-",
            }
            if error:
                cells[tool]["error"] = error
            summary.append(
                {
                    "model": spec.key,
                    "task": task,
                    "tool": tool,
                    "time": t,
                    "ratio": ratio,
                    "acc": acc,
                    "band_hi": max(b[2] for b in band.values()) if band else None,
                }
            )
        acc_name = {"density": "W1 / width", "top": "rel. error", "trace": "rel. error"}[task]
        lines = [
            ("time s (median)", "time"),
            ("x curvscope f64", "ratio"),
            ("products", "products"),
            ("peak dMiB", "peak"),
        ]
        if task != "density":
            lines.append(("estimate", "value"))
        lines.append((acc_name + (" (vs ref)" if not exact and task == "top" else ""), "acc"))
        for i, (label, key) in enumerate(lines):
            name = task if i == 0 else ""
            print(f"   {name:<8} {label:<20}" + "".join(f"{cells[t][key]:>15}" for t in tools))
        for tool in tools:
            if "error" in cells[tool]:
                print(f"   {'':<8} {TOOL_TITLES[tool]} failed: {cells[tool]['error']}")
    # curvscope with float32 products as the denominator: the like-for-like dtype comparison
    f32 = runs_by_tool.get("curvscope-f32", [])
    if f32:
        parts = []
        for task in TASKS:
            b32 = median_of(f32, task, "time_s")
            ratios = []
            for tool in ("pyhessian", "curvlinops", "eigenthings"):
                t = median_of(runs_by_tool.get(tool, []), task, "time_s")
                if t is not None and b32:
                    ratios.append(f"{TOOL_TITLES[tool]} {t / b32:.2f}")
            parts.append(f"{task}: " + ", ".join(ratios))
        print("   x curvscope f32 (like-for-like dtype): " + "; ".join(parts))
    setups = []
    for tool in tools:
        runs = runs_by_tool.get(tool, [])
        values = [r["setup_s"] for r in runs if "setup_s" in r]
        if values:
            setups.append(f"{TOOL_TITLES[tool]} {statistics.median(values):.2f}")
    print("   operator set-up s (median, not in the times above): " + ", ".join(setups))
    certified = first_result(ref, "top-certified")
    if certified is not None:
        cert_runs = [r for r in ref if "time_s" in r["tasks"].get("top-certified", {})]
        cert = cert_runs[0]["tasks"]["top-certified"]
        err = (
            f", rel. error {abs(certified['value'] - lam_max) / abs(lam_max):.1e}" if exact else ""
        )
        print(
            f"   curvscope f64 top at its default tol {CERTIFIED_TOL:g}: {cert['time_s']:.3g} s, "
            f"{cert['products']} products, residual {certified['residual']:.1e}{err} (one run)"
        )
    pyhessian_top = [
        r["tasks"]["top"]["time_s"]
        for r in runs_by_tool.get("pyhessian", [])
        if "time_s" in r["tasks"].get("top", {})
    ]
    for tool in ("curvscope-f64", "curvscope-f32"):
        runs = [
            r["tasks"]["top-1e-3"]
            for r in runs_by_tool.get(tool, [])
            if "time_s" in r["tasks"].get("top-1e-3", {})
        ]
        if not runs or lam_max is None:
            continue
        seconds = statistics.median(r["time_s"] for r in runs)
        value = runs[0]["result"]["value"]
        ratio = (
            f", PyHessian top / this = {statistics.median(pyhessian_top) / seconds:.2f}"
            if pyhessian_top
            else ""
        )
        print(
            f"   {TOOL_TITLES[tool]} top at tol {PYHESSIAN_TOL:g} (PyHessian's number): "
            f"{seconds:.3g} s (median), {runs[0]['products']} products, rel. error "
            f"{abs(value - lam_max) / abs(lam_max):.1e}{ratio}"
        )
    if exact:
        report_extras(spec, runs_by_tool, eigs, H)
    return summary


def report_extras(spec, runs_by_tool, eigs, H) -> None:
    for run in runs_by_tool.get("pyhessian", [])[:1]:
        tight = run["tasks"].get("top-tight", {})
        if "result" in tight:
            err = abs(tight["result"]["value"] - eigs[-1]) / abs(eigs[-1])
            print(
                f"   PyHessian top asked for tol 1e-6 (maxIter 100): {tight['time_s']:.3g} s, "
                f"{tight['products']} products, rel. error {err:.1e} (one run)"
            )
    exact10 = np.sort(eigs)[::-1][:10]
    lines = []
    for tool, task, label in [
        ("curvscope-f64", "top10", "curvscope top_eigenpairs(k=10)"),
        ("eigenthings", "top10", "h-eigenthings lanczos(k=10) [README: 20 steps, reorth]"),
        ("eigenthings", "top10-m90", "h-eigenthings lanczos(k=10, max_iter=90) [no reorth]"),
    ]:
        res = first_result(runs_by_tool.get(tool, []), task)
        if res is None:
            continue
        values = np.sort(np.asarray(res["values"]))[::-1]
        rel = np.abs(values[: len(exact10)] - exact10[: len(values)]) / np.abs(exact10[0])
        lines.append(
            f"   {label:<56} duplicates {count_duplicates(list(values))}/9, "
            f"max |err|/lambda_1 by rank {rel.max():.1e}; values "
            + " ".join(f"{v:.4g}" for v in values[:6])
            + " ..."
        )
    if lines:
        print(
            f"   top-10 (exact: {' '.join(f'{v:.4g}' for v in exact10[:6])} ...; exact "
            f"duplicates {count_duplicates(list(exact10))}/9):"
        )
        print("\n".join(lines))
    res = first_result(runs_by_tool.get("eigenthings", []), "weighting")
    if res is not None and H is not None:
        probe = np.asarray(res["probe"])
        exact_hv = H @ probe
        err = np.linalg.norm(np.asarray(res["Hv_uneven"]) - exact_hv) / np.linalg.norm(exact_hv)
        print(
            f"   h-eigenthings on uneven batches {res['batches']}: "
            f"||Hv - H_exact v|| / ||H_exact v|| = {err:.2e} "
            "(it averages batches with equal weights, not |b| / N)"
        )


def report_targets(summary: list[dict]) -> None:
    print()
    print("== targets (issue 5): competitor time / curvscope f64 time, accuracy at least equal")
    print(
        f"   (accuracy 'equal or better' = curvscope's error <= {ACCURACY_SLACK} x the other's; "
        "for the density also: W1 within the 90th percentile of exact-arithmetic SLQ)"
    )
    index = {(r["model"], r["task"], r["tool"]): r for r in summary}
    models = sorted({r["model"] for r in summary}, key=[*full_specs(False)].index)
    for model in models:
        for (task, tool), target in TARGETS.items():
            other = index.get((model, task, tool))
            mine = index.get((model, task, "curvscope-f64"))
            mine32 = index.get((model, task, "curvscope-f32"))
            if not other or not mine or other["ratio"] is None:
                continue
            acc_ok = None
            if other["acc"] is not None and mine["acc"] is not None:
                acc_ok = mine["acc"] <= ACCURACY_SLACK * other["acc"]
                if task == "density" and mine["band_hi"] is not None:
                    # W1 of P probes is mostly the luck of the probes: as good as exact
                    # arithmetic allows (within its 90th percentile) counts as equal.
                    acc_ok = acc_ok or mine["acc"] <= mine["band_hi"]
            speed_ok = other["ratio"] >= target
            verdict = "met" if speed_ok and acc_ok is not False else "MISSED"
            r32 = (other["time"] / mine32["time"]) if mine32 and mine32["time"] else None
            acc_text = (
                "-"
                if acc_ok is None
                else f"{'ok' if acc_ok else 'WORSE'} ({fmt(mine['acc'], '.1e')} vs "
                f"{fmt(other['acc'], '.1e')})"
            )
            print(
                f"   {model:<10} {task:<8} vs {TOOL_TITLES[tool]:<14} "
                f"x{other['ratio']:.2f} (target >= {target:g}; vs f32: x{fmt(r32, '.2f')})  "
                f"accuracy {acc_text:<28} {verdict}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool (default 3)")
    parser.add_argument(
        "--models",
        default="mlp-small,mlp-1m,cnn-bn",
        help="comma-separated subset of mlp-small, mlp-1m, cnn-bn",
    )
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each tool's process (default 1; 0: torch's default)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument(
        "--cache",
        type=Path,
        default=CACHE_DIR,
        help="trained models and exact spectra (default results/compare-cache)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_child(json.loads(Path(args.child).read_text()))
        Path(args.child_out).write_text(json.dumps(result))
        return

    specs = full_specs(args.quick)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for name, known in (("model", specs), ("tool", TOOLS)):
        bad = [x for x in (models if name == "model" else tools) if x not in known]
        if bad:
            parser.error(f"unknown {name}(s) {bad}; choose from {list(known)}")
    if "curvscope-f64" not in tools:
        parser.error("the ratios need curvscope-f64 among --tools")
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    started = time.perf_counter()
    print(machine_line(threads))
    print(load_line() + " at start")
    print(versions_line())
    print("dtypes: " + "; ".join(f"{TOOL_TITLES[t]}: {TOOL_DTYPES[t]}" for t in tools))
    print(
        f"{repeats} repeat(s), medians; one child process per tool, model and repeat; tools' "
        f"order rotated per repeat{'; QUICK smoke run' if args.quick else ''}"
    )
    summary: list[dict] = []
    notes: set[str] = set()
    for key in models:
        spec = specs[key]
        print(f"\npreparing {key} ...", flush=True)
        problem, eigs, H = prepare(spec, args.cache)
        band = exact_slq_band(H, eigs, spec) if eigs is not None else {}
        runs_by_tool: dict[str, list[dict]] = {t: [] for t in tools}
        for repeat in range(repeats):
            shift = repeat % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                job = {
                    "tool": tool,
                    "spec": asdict(spec),
                    "problem": str(problem),
                    "repeat": repeat,
                    "threads": threads,
                }
                t0 = time.perf_counter()
                out = run_job(job, args.timeout)
                runs_by_tool[tool].append(out)
                notes.update(f"{TOOL_TITLES[tool]}: {note}" for note in out.get("notes", []))
                status = out.get("error") or ", ".join(
                    f"{task} {v['time_s']:.2f}s" if "time_s" in v else f"{task} ERROR"
                    for task, v in out["tasks"].items()
                )
                print(
                    f"  {key} repeat {repeat + 1}/{repeats} {tool:<14} "
                    f"({time.perf_counter() - t0:.0f} s): {status}",
                    flush=True,
                )
        n = next((r["n"] for runs in runs_by_tool.values() for r in runs if "n" in r), 0)
        summary += report_model(spec, n, runs_by_tool, eigs, H, tools, band)
    report_targets(summary)
    print()
    for note in sorted(notes):
        print(f"note: {note}")
    print(load_line() + " at end")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
