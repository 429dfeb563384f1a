"""How many Lanczos steps and probes an SLQ density needs: errors against the exact spectrum.

On the built-in digits MLP (:func:`curvscope.zoo.trained_digits_mlp`, tanh 64-32-32-10, n = 3,466,
cross-entropy over all 1,797 digits) the dense float64 Hessian is small enough to build and
diagonalise. It is built row by row with plain ``torch.autograd`` double backward over the whole
data set (one batch: the model has no BatchNorm, so this is the Hessian of the mean loss), checked
against :class:`curvscope.HessianOperator` products, and its eigenvalues are the truth.

Then :func:`curvscope.spectral_density` runs on that matrix (the same Lanczos, reorthogonalization
and quadrature code as on the matrix-free operator; one run on the operator itself checks that
the two agree to rounding) for every (Lanczos steps m, probes P), over several seeds, and the
script prints the median over seeds of

- ``W1/width``: Wasserstein-1 distance between the SLQ quadrature measure (Ritz values and
  weights of all probes) and the exact eigenvalue distribution, divided by the spectral width
  lambda_max - lambda_min (worst seed in brackets);
- ``lmax err``: |lambda_max - largest Ritz value| / lambda_max (worst seed in brackets);
- ``lmin err``: |smallest Ritz value - lambda_min| / |lambda_min|;
- ``neg<0``: the quadrature mass on negative nodes (:attr:`SpectrumStructure.negative_mass`);
  the exact share of negative eigenvalues is printed in the header;
- ``neg<-band``: the quadrature mass below -band (:attr:`SpectrumStructure.negative_mass_band`,
  band = the quadrature's resolution), then the exact share below the same band;
- ``trace err``: |n * (first moment of the quadrature) - tr(H)| / tr(H);
- ``outliers``: :func:`curvscope.analysis.spectrum_structure`'s count of outliers above the bulk
  (the same rule applied to the exact eigenvalues is printed in the header).

A second table puts the trace of SLQ beside :func:`curvscope.trace` (Hutch++ and Hutchinson) at
the same number of products: SLQ's trace is a Hutchinson estimate with P probes, whatever m.

Run from the repository root (about 2 minutes on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/slq_guidance.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/slq_guidance.py --steps 20 90 --probes 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch.nn import functional as F

from curvscope import HessianOperator, SpectralDensity, spectral_density, trace
from curvscope.analysis import spectrum_structure
from curvscope.zoo import digits_data, trained_digits_mlp


def dense_hessian(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> np.ndarray:
    """Dense float64 Hessian of the mean cross-entropy over (inputs, targets), row by row."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    n = flat.numel()
    H = torch.empty(n, n, dtype=torch.float64)
    for j in range(n):
        row = torch.autograd.grad(flat[j], params, retain_graph=j < n - 1)
        H[j] = torch.cat([r.reshape(-1) for r in row])
    H = H.numpy()
    asym = float(np.abs(H - H.T).max() / np.abs(H).max())
    if asym > 1e-10:
        raise RuntimeError(f"dense Hessian not symmetric (relative {asym:.1e})")
    return (H + H.T) / 2


def exact_structure_count(eigs: np.ndarray) -> int:
    """Outliers above the bulk by spectrum_structure's rule applied to the exact eigenvalues."""
    n = eigs.size
    exact = SpectralDensity(eigs[None, :], np.full((1, n), 1.0 / n), np.array([n]), n)
    return spectrum_structure(exact).num_outliers


def measure(d: SpectralDensity, eigs: np.ndarray, H_trace: float) -> dict[str, float]:
    """The errors of one SLQ result against the exact eigenvalues."""
    nodes, weights = d.flat()
    lam_min, lam_max = float(eigs[0]), float(eigs[-1])
    s = spectrum_structure(d)
    return {
        "w1": wasserstein_distance(eigs, nodes, None, weights) / (lam_max - lam_min),
        "lmax": abs(lam_max - d.lambda_max) / lam_max,
        "lmin": abs(d.lambda_min - lam_min) / abs(lam_min),
        "neg0": s.negative_mass,
        "negband": s.negative_mass_band,
        "negband_exact": float(np.mean(eigs < -s.band)),
        "trace": abs(d.n * d.moment(1) - H_trace) / H_trace,
        "outliers": float(s.num_outliers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 120])
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 3, 10, 30])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..SEEDS-1 per setting")
    parser.add_argument("--trace-products", type=int, nargs="+", default=[30, 99, 300, 999])
    args = parser.parse_args()
    started = time.perf_counter()

    model = trained_digits_mlp()
    data = digits_data()
    inputs = torch.cat([x for x, _ in data]).double()
    targets = torch.cat([t for _, t in data])
    t0 = time.perf_counter()
    H = dense_hessian(model.double(), inputs, targets)
    dense_s = time.perf_counter() - t0
    n = H.shape[0]

    # The dense matrix is the operator's Hessian (batches of 256 weighted by size).
    op = HessianOperator(trained_digits_mlp(), F.cross_entropy, data)
    V = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    HV = op.matmat(V)
    op_check = float((HV - torch.from_numpy(H) @ V).norm() / HV.norm())
    d_op = spectral_density(op, num_iters=40, num_probes=3, seed=0)
    d_dense = spectral_density(H, num_iters=40, num_probes=3, seed=0)
    slq_check = float(np.nanmax(np.abs(d_op.nodes - d_dense.nodes)) / np.abs(H).max())

    eigs = np.linalg.eigvalsh(H)
    H_trace = float(np.trace(H))
    print(
        f"machine: {platform.platform()} | {platform.processor() or '?'} | "
        f"torch {torch.__version__} | threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    print(
        f"problem: trained_digits_mlp(), cross-entropy over {len(targets):,} digits, n = {n:,}; "
        f"dense Hessian by double backward in {dense_s:.0f} s"
    )
    print(
        f"check: ||H_op V - H V|| / ||H_op V|| = {op_check:.1e} (4 Gaussian columns); "
        f"SLQ on HessianOperator vs on the dense H (40 steps x 3 probes, seed 0): "
        f"max node difference / max|H_ij| = {slq_check:.1e}"
    )
    print(
        f"exact: lambda_max = {eigs[-1]:.6g}, lambda_min = {eigs[0]:.6g}, tr(H) = {H_trace:.6g}, "
        f"share of eigenvalues < 0 = {np.mean(eigs < 0):.3f}, "
        f"outliers by spectrum_structure's rule = {exact_structure_count(eigs)}"
    )
    print(f"median over seeds 0..{args.seeds - 1} (worst seed in brackets); products = m x P")
    header = (
        f"{'m':>4} {'P':>3} {'products':>8}  {'W1/width':>17}  {'lmax err':>17}  "
        f"{'lmin err':>8}  {'neg<0':>6}  {'neg<-band (exact)':>17}  {'trace err':>9}  "
        f"{'outliers':>8}"
    )
    print(header)
    print("-" * len(header))
    for m in args.steps:
        for P in args.probes:
            runs = [
                measure(spectral_density(H, num_iters=m, num_probes=P, seed=s), eigs, H_trace)
                for s in range(args.seeds)
            ]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            def worst(key: str, runs: list[dict[str, float]] = runs) -> float:
                return max(r[key] for r in runs)

            print(
                f"{m:>4} {P:>3} {m * P:>8}  {med('w1'):>7.4f} ({worst('w1'):.4f})  "
                f"{med('lmax'):>7.1e} ({worst('lmax'):.1e})  {med('lmin'):>8.3f}  "
                f"{med('neg0'):>6.3f}  {med('negband'):>7.3f} ({med('negband_exact'):.3f})  "
                f"{med('trace'):>9.4f}  {med('outliers'):>8.0f}",
                flush=True,
            )

    print()
    print(f"trace: |estimate - tr(H)| / tr(H), median over seeds 0..{args.seeds - 1} (worst)")
    heads = ("trace() hutch++", "trace() hutchinson", "SLQ, P = products")
    print(f"{'products':>8}  {heads[0]:>17}  {heads[1]:>18}  {heads[2]:>17}")
    for k in args.trace_products:
        errs: dict[str, list[float]] = {"hutch++": [], "hutchinson": [], "slq": []}
        for s in range(args.seeds):
            for method in ("hutch++", "hutchinson"):
                value = trace(H, num_probes=k, method=method, seed=s).value
                errs[method].append(abs(value - H_trace) / H_trace)
            d = spectral_density(H, num_iters=1, num_probes=k, seed=s)
            errs["slq"].append(abs(n * d.moment(1) - H_trace) / H_trace)
        cells = [f"{statistics.median(v):.4f} ({max(v):.4f})" for v in errs.values()]
        print(f"{k:>8}  {cells[0]:>17}  {cells[1]:>18}  {cells[2]:>17}", flush=True)
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
