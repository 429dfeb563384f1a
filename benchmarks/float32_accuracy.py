"""Accuracy of float32 products (the GPU path) against float64 products, same algorithms.

On CUDA curvscope runs Hessian products in the model's dtype (float32, with TF32 and bf16
switched off during products, see :mod:`curvscope.operators.precision`) and every Lanczos,
SLQ, eigensolver and trace recurrence in float64. This script measures what that costs in
accuracy, against the same computation with float64 products on the CPU, on models from
:mod:`curvscope.zoo` (digits; no downloads):

- ``HVP``: ||H32 v - H64 v|| / ||H64 v||, median and max over 5 Gaussian vectors;
- ``top``: |lambda32 - lambda64| / |lambda64| of the largest eigenvalue (each at tol 1e-6),
  and the float32 pair's relative residual measured with the float64 operator;
- ``density``: SLQ with the same probes (seed 0, m steps x P probes): the Wasserstein-1
  distance between the two quadrature measures / spectral width, and the largest node
  difference / ||H||;
- ``trace``: Hutch++ with the same probes and 30 products, relative difference.

``--device cuda`` (the default when CUDA is available) runs the float32 products on the GPU;
``--tf32`` adds a row per model with ``allow_tf32=True`` (TF32 convolutions and matmuls where
the device has them), to show what the default protects against. On the CPU the float32 row
measures IEEE float32 arithmetic with another summation order than a GPU's.

Run from the repository root::

    .venv/bin/python benchmarks/float32_accuracy.py              # ~1 minute on 1 CPU thread
    .venv/bin/python benchmarks/float32_accuracy.py --device cuda --tf32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from scipy.stats import wasserstein_distance
from torch import nn
from torch.nn import functional as F

from curvscope import zoo
from curvscope.linalg import spectral_density, top_eigenpairs, trace
from curvscope.operators import HessianOperator


def problems() -> dict[str, Callable[[], tuple[nn.Module, list]]]:
    """name -> builder of (model in the mode analysed, batches); all on the digits."""

    def mlp() -> tuple[nn.Module, list]:
        return zoo.trained_digits_mlp(), zoo.digits_data()

    def cnn_bn_train() -> tuple[nn.Module, list]:
        data = zoo.digits_data(batch_size=256, num_samples=1024)
        model = zoo.train(zoo.digits_cnn(batchnorm=True), data, steps=150)
        return model.train(), data  # BatchNorm in train mode: batch statistics

    def wide_mlp() -> tuple[nn.Module, list]:
        data = zoo.digits_data(batch_size=300, num_samples=600)
        return zoo.train(zoo.digits_mlp(hidden=(512, 512)), data, steps=100), data

    return {
        "MLP 64-32-32-10 (trained)": mlp,
        "CNN + BatchNorm, train mode": cnn_bn_train,
        "MLP 64-512-512-10": wide_mlp,
    }


def measure(
    reference: HessianOperator, candidate: HessianOperator, steps: int, probes: int
) -> dict[str, float]:
    n = reference.num_params
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(n, 5, dtype=torch.float64, generator=generator)
    exact = reference.matmat(V)
    approx = candidate.matmat(V.to(candidate.dtype)).to(torch.float64)
    hvp_errors = ((approx - exact).norm(dim=0) / exact.norm(dim=0)).tolist()

    top64 = top_eigenpairs(reference, k=1, tol=1e-6)
    top32 = top_eigenpairs(candidate, k=1, tol=1e-6)
    lam64, lam32 = float(top64.values[0]), float(top32.values[0])
    u = torch.from_numpy(top32.vectors[:, :1])
    residual = float((reference.matmat(u) - lam32 * u).norm()) / abs(lam64)

    d64 = spectral_density(reference, num_iters=steps, num_probes=probes, seed=0)
    d32 = spectral_density(candidate, num_iters=steps, num_probes=probes, seed=0)
    nodes64, weights64 = d64.flat()
    nodes32, weights32 = d32.flat()
    width = float(nodes64.max() - nodes64.min())
    w1 = wasserstein_distance(nodes64, nodes32, weights64, weights32) / width
    top_nodes = abs(float(nodes64.max() - nodes32.max())) / abs(lam64)

    t64 = trace(reference, num_probes=30, method="hutch++", seed=0).value
    t32 = trace(candidate, num_probes=30, method="hutch++", seed=0).value
    return {
        "hvp_median": statistics.median(hvp_errors),
        "hvp_max": max(hvp_errors),
        "top": abs(lam32 - lam64) / abs(lam64),
        "top_residual": residual,
        "w1": w1,
        "top_node": top_nodes,
        "trace": abs(t32 - t64) / abs(t64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="device of the float32 products")
    parser.add_argument("--tf32", action="store_true", help="also run with allow_tf32=True")
    parser.add_argument("--steps", type=int, default=60, help="Lanczos steps of the density")
    parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__} | float32 products on {device} ({name or 'cpu'}) | "
        f"float64 reference products on cpu | density m = {args.steps} x P = {args.probes}"
    )
    variants = [("float32", False)] + ([("float32 + TF32", True)] if args.tf32 else [])
    header = (
        f"{'model':30} {'products':16} {'HVP med':>9} {'HVP max':>9} {'top':>9} "
        f"{'top res.':>9} {'W1/width':>9} {'top node':>9} {'trace':>9} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for title, build in problems().items():
        model, data = build()
        reference = HessianOperator(model, F.cross_entropy, data, dtype=torch.float64)
        for label, tf32 in variants:
            candidate = HessianOperator(
                model.to(device),
                F.cross_entropy,
                data,
                dtype=torch.float32,
                device=device,
                allow_tf32=tf32,
            )
            started = time.perf_counter()
            result = measure(reference, candidate, args.steps, args.probes)
            seconds = time.perf_counter() - started
            model.to("cpu")
            print(
                f"{title:30} {label:16} {result['hvp_median']:9.1e} {result['hvp_max']:9.1e} "
                f"{result['top']:9.1e} {result['top_residual']:9.1e} {result['w1']:9.1e} "
                f"{result['top_node']:9.1e} {result['trace']:9.1e} {seconds:6.1f}",
                flush=True,
            )
    print(
        "columns: relative HVP error (median, max of 5), top eigenvalue relative error, the "
        "float32 pair's residual under float64 products / lambda_max, W1 between the SLQ "
        "measures / width, largest-node difference / lambda_max, Hutch++ trace relative "
        "difference (same probes)"
    )


if __name__ == "__main__":
    main()
