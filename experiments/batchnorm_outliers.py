"""Outliers and gradient concentration with and without BatchNorm (Ghorbani, Krishnan & Xiao
2019), scaled down to the digits.

Ghorbani et al. find that in networks without BatchNorm a few large eigenvalues separate from
the bulk early in training and the gradient concentrates in their eigenspace, that with
BatchNorm (Hessian taken with batch statistics, as trained) both are almost absent, and that
evaluating the BatchNorm network with population statistics brings the outliers back.

Here: the small CNN of ``curvscope.zoo.digits_cnn`` (ReLU; conv 1->8, conv 8->16, linear; 1,898
parameters, 1,946 with BatchNorm2d after each convolution; same initial weights, seed 0),
trained with SGD (lr 0.05, momentum 0.9) on the cross-entropy for 300 steps, cycling through
the full digits set in 6 fixed batches of 300 (the last 297). At steps 0, 50, 150 and 300:

* the Hessian of the mean loss over all 1,797 digits in those same batches (BatchNorm in train
  mode normalises with each batch's statistics, as in training), float32 products;
* its SLQ density (3 probes x 80 Lanczos steps) and structure by
  ``curvscope.analysis.spectrum_structure`` (default rule): lambda_max / bulk_max (the outlier
  size relative to the bulk's right edge), the number of outliers, |lambda_min| / lambda_max
  and the resolved negative mass; and, free of any outlier rule, lambda_max / q99 with q99 the
  Ritz value below which 99% of the SLQ measure lies;
* the share of the full-data gradient in the top-C eigenspace (C = 10; ARPACK to a relative
  residual of 1e-3), against the random baseline C/n;
* for the BatchNorm network also all of this in eval mode (population statistics: the running
  averages gathered in training; at step 0 those are mean 0, variance 1).

Run:  .venv/bin/python experiments/batchnorm_outliers.py     (about 4 minutes on 1 thread)
Writes docs/figures/structure_batchnorm_densities.png and structure_batchnorm_summary.png,
and prints the numbers table.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from _common import elapsed, fmt, loss_and_accuracy, parse_args, quantile, table, top_overlap
from matplotlib.figure import Figure
from torch.nn import functional as F

from curvscope import spectral_density, zoo
from curvscope.analysis import spectrum_structure
from curvscope.operators import HessianOperator
from curvscope.plot import plot_densities

C = 10
CHECKPOINTS = (0, 50, 150, 300)
LR, MOMENTUM = 0.05, 0.9
BATCH = 300
ITERS, PROBES = 80, 3
DTYPE = torch.float32
SEED = 0
VARIANTS = ("no BN", "BN, batch stats", "BN, population stats")


def measure(model: torch.nn.Module, data: list) -> dict:
    """Density, structure, loss and top-C gradient overlap of the model's Hessian."""
    op = HessianOperator(model, F.cross_entropy, data, dtype=DTYPE)
    density = spectral_density(op, num_iters=ITERS, num_probes=PROBES, seed=SEED)
    structure = spectrum_structure(density)
    overlap, pairs = top_overlap(op, C, tol=1e-3, seed=SEED)
    loss, accuracy = loss_and_accuracy(op)
    return {
        "density": density,
        "structure": structure,
        "overlap": overlap,
        "converged": bool(pairs.converged.all()),
        "q99": quantile(density, 0.99),
        "loss": loss,
        "accuracy": accuracy,
        "n": op.num_params,
    }


def run(batchnorm: bool, data: list) -> dict[tuple[str, int], dict]:
    """Train one network; measure it at every checkpoint (both BatchNorm modes)."""
    model = zoo.digits_cnn(batchnorm=batchnorm, activation="relu", seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    results = {}
    for step in range(CHECKPOINTS[-1] + 1):
        if step in CHECKPOINTS:
            if batchnorm:
                results[(VARIANTS[1], step)] = measure(model, data)
                results[(VARIANTS[2], step)] = measure(copy.deepcopy(model).eval(), data)
            else:
                results[(VARIANTS[0], step)] = measure(model, data)
        if step == CHECKPOINTS[-1]:
            break
        inputs, targets = data[step % len(data)]
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return results


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data = zoo.digits_data(batch_size=BATCH, seed=SEED)
    results = {**run(False, data), **run(True, data)}

    head = [
        "network",
        "step",
        "loss",
        "acc",
        "lambda_max",
        "bulk_max",
        "lmax/bulk_max",
        "#outliers",
        "lmax/q99",
        "|lmin|/lmax",
        "neg. mass",
        "top-C overlap",
        "C/n",
    ]
    rows = []
    for variant in VARIANTS:
        for step in CHECKPOINTS:
            r = results[(variant, step)]
            s, o = r["structure"], r["overlap"]
            rows.append(
                [
                    variant,
                    step,
                    f"{r['loss']:.3f}",
                    f"{r['accuracy']:.3f}",
                    fmt(s.lambda_max),
                    fmt(s.bulk_max),
                    fmt(s.lambda_max / s.bulk_max),
                    s.num_outliers,
                    fmt(s.lambda_max / r["q99"]),
                    fmt(s.abs_min_over_max),
                    f"{s.negative_mass_band:.3f}",
                    f"{o.overlap:.3f}" + ("" if r["converged"] else "*"),
                    f"{o.baseline:.4f}",
                ]
            )
    print(table(head, rows))
    print(
        "(loss and accuracy over all 1,797 digits in the network's mode; lambda_max, bulk_max: "
        "largest Ritz value and the bulk's right edge by spectrum_structure; q99: the Ritz "
        "value below which 99% of the SLQ mass lies; neg. mass: resolved negative mass; "
        "* = an eigenpair above the 1e-3 residual)"
    )

    densities, structures, labels = {}, {}, {}
    for variant in VARIANTS:
        for step in CHECKPOINTS:
            key = f"{variant}:{step}"
            densities[key] = results[(variant, step)]["density"]
            structures[key] = results[(variant, step)]["structure"]
            labels[key] = f"{variant}, step {step}"
    plot_densities(  # dpi 100: the grids are large
        densities,
        args.out / "structure_batchnorm_densities.png",
        structures,
        dpi=100,
        labels=labels,
        columns=len(CHECKPOINTS),
        title=f"Hessian densities of a digits CNN with and without BatchNorm ({PROBES} probes x "
        f"{ITERS} Lanczos steps, Ghorbani smoothing)",
    )

    figure = Figure(figsize=(11, 4), layout="constrained")
    ratio_ax, overlap_ax = figure.subplots(1, 2)
    for i, variant in enumerate(VARIANTS):
        steps = np.array(CHECKPOINTS)
        ratios = [
            results[(variant, s)]["structure"].lambda_max
            / results[(variant, s)]["structure"].bulk_max
            for s in steps
        ]
        overlaps = [results[(variant, s)]["overlap"].overlap for s in steps]
        ratio_ax.semilogy(steps, ratios, "o-", color=f"C{i}", label=variant)
        overlap_ax.plot(steps, overlaps, "o-", color=f"C{i}", label=variant)
    baseline = results[(VARIANTS[0], 0)]["overlap"].baseline
    overlap_ax.axhline(baseline, color="0.5", linestyle=":", label=f"random C/n = {baseline:.4f}")
    ratio_ax.set_title("outlier size: lambda_max / bulk edge", fontsize="medium")
    overlap_ax.set_title("gradient share in the top-C eigenspace", fontsize="medium")
    overlap_ax.set_ylim(0, 1.02)
    for ax in (ratio_ax, overlap_ax):
        ax.set_xlabel("SGD step")
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="small")
    figure.savefig(args.out / "structure_batchnorm_summary.png", dpi=150)
    names = ("structure_batchnorm_densities.png", "structure_batchnorm_summary.png")
    print("wrote " + ", ".join(str(args.out / name) for name in names))
    print(f"time {elapsed(args)}")


if __name__ == "__main__":
    main()
