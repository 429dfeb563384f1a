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

A deeper network beside it: a residual CNN (``digits_resnet`` below: a 3x3 stem and three
residual blocks of two 3x3 convolutions, 16, 32, 64 channels, global average pooling, linear;
77,418 parameters, 77,754 with BatchNorm2d after every convolution), same optimizer, trained
and measured on the first 600 digits (2 fixed batches of 300) so that its Hessian products
fit the time budget (one product over 600 digits: about 0.15 s on one thread, against 0.5 s
over all 1,797); measured at step 100 only (where its loss without BatchNorm is 0.1-0.6, as
the small CNN's at steps 150-300), with SLQ of 2 probes x 50 Lanczos steps.

Seeds (--seeds N, default 5) vary the initialisation (the batches stay fixed); the small
CNN is measured at every checkpoint for seed 0 (the figures) and at steps 0, 150 and 300 for
the others.

Run:  .venv/bin/python experiments/batchnorm_outliers.py [--seeds 5] [--quick]
(about 2.5 minutes per seed for the small CNN and 1.5 for the residual net, on 1 thread).
Writes docs/figures/structure_batchnorm_densities.png and structure_batchnorm_summary.png
(seed 0, small CNN), prints the numbers tables and writes the summary
(experiments/_reproduce.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from _common import elapsed, fmt, loss_and_accuracy, parse_args, quantile, table, top_overlap
from _reproduce import Band, Claim, judge, markdown_table, write_summary
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

from curvscope import spectral_density, zoo
from curvscope.analysis import spectrum_structure
from curvscope.operators import HessianOperator
from curvscope.plot import plot_densities

NAME = "batchnorm_outliers"
C = 10
CHECKPOINTS = (0, 50, 150, 300)
LR, MOMENTUM = 0.05, 0.9
BATCH = 300
DTYPE = torch.float32
VARIANTS = ("no BN", "BN, batch stats", "BN, population stats")


@dataclass(frozen=True)
class Architecture:
    label: str
    num_samples: int  # digits trained on and measured over (the first of the seeded order)
    checkpoints: tuple[int, ...]  # seed 0
    checkpoints_other: tuple[int, ...]  # other seeds
    iters: int
    probes: int
    tol: float = 1e-3  # relative residual of the top-C eigenpairs


SMALL = Architecture("small CNN", 1797, CHECKPOINTS, (0, 150, 300), 80, 3)
RESNET = Architecture("residual net", 600, (100,), (100,), 50, 2)
QUICK_SMALL = Architecture("small CNN", 300, (0, 10), (0, 10), 20, 1, tol=0.1)
QUICK_RESNET = Architecture("residual net", 300, (10,), (10,), 10, 1, tol=0.1)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (BatchNorm2d after each, or none), ReLU, identity shortcut or a
    1x1 convolution where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

        bias = not batchnorm
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.norm2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def digits_resnet(batchnorm: bool, seed: int, width: int = 16) -> nn.Sequential:
    """Residual CNN for the flat (b, 64) digits: stem 3x3 (1 -> w), blocks (w -> w, stride 1),
    (w -> 2w, stride 2), (2w -> 4w, stride 2), global average pooling, linear (4w -> 10).
    77,418 parameters at w = 16 (77,754 with BatchNorm)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, width, 3, 1, 1, bias=not batchnorm),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.ReLU(),
            ResidualBlock(width, width, 1, batchnorm),
            ResidualBlock(width, 2 * width, 2, batchnorm),
            ResidualBlock(2 * width, 4 * width, 2, batchnorm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, C),
        )


def build(arch: Architecture, batchnorm: bool, seed: int) -> nn.Module:
    if arch.label == "small CNN":
        return zoo.digits_cnn(batchnorm=batchnorm, activation="relu", seed=seed)
    return digits_resnet(batchnorm, seed)


def measure(model: nn.Module, data: list, arch: Architecture, seed: int) -> dict:
    """Density, structure, loss and top-C gradient overlap of the model's Hessian."""
    op = HessianOperator(model, F.cross_entropy, data, dtype=DTYPE)
    density = spectral_density(op, num_iters=arch.iters, num_probes=arch.probes, seed=seed)
    structure = spectrum_structure(density)
    overlap, pairs = top_overlap(op, C, tol=arch.tol, seed=seed)
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


def run(arch: Architecture, batchnorm: bool, seed: int, checkpoints) -> dict:
    """Train one network; measure it at every checkpoint (both BatchNorm modes)."""
    data = zoo.digits_data(batch_size=BATCH, num_samples=arch.num_samples, seed=0)
    model = build(arch, batchnorm, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    results = {}
    for step in range(checkpoints[-1] + 1):
        if step in checkpoints:
            if batchnorm:
                results[(VARIANTS[1], step)] = measure(model, data, arch, seed)
                eval_model = copy.deepcopy(model).eval()
                results[(VARIANTS[2], step)] = measure(eval_model, data, arch, seed)
            else:
                results[(VARIANTS[0], step)] = measure(model, data, arch, seed)
        if step == checkpoints[-1]:
            break
        inputs, targets = data[step % len(data)]
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return results


def print_table(results: dict, checkpoints) -> None:
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
        for step in checkpoints:
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


def figures(args, results: dict, arch: Architecture) -> list:
    densities, structures, labels = {}, {}, {}
    checkpoints = arch.checkpoints
    for variant in VARIANTS:
        for step in checkpoints:
            key = f"{variant}:{step}"
            densities[key] = results[(variant, step)]["density"]
            structures[key] = results[(variant, step)]["structure"]
            labels[key] = f"{variant}, step {step}"
    paths = [
        args.out / "structure_batchnorm_densities.png",
        args.out / "structure_batchnorm_summary.png",
    ]
    plot_densities(  # dpi 100: the grids are large
        densities,
        paths[0],
        structures,
        dpi=100,
        labels=labels,
        columns=len(checkpoints),
        title=f"Hessian densities of a digits CNN with and without BatchNorm ({arch.probes} "
        f"probes x {arch.iters} Lanczos steps, Ghorbani smoothing)",
    )

    figure = Figure(figsize=(11, 4), layout="constrained")
    ratio_ax, overlap_ax = figure.subplots(1, 2)
    for i, variant in enumerate(VARIANTS):
        steps = np.array(checkpoints)
        ratios = [
            results[(variant, s)]["structure"].lambda_max
            / results[(variant, s)]["structure"].bulk_max
            for s in steps
        ]
        overlaps = [results[(variant, s)]["overlap"].overlap for s in steps]
        ratio_ax.semilogy(steps, ratios, "o-", color=f"C{i}", label=variant)
        overlap_ax.plot(steps, overlaps, "o-", color=f"C{i}", label=variant)
    baseline = results[(VARIANTS[0], checkpoints[0])]["overlap"].baseline
    overlap_ax.axhline(baseline, color="0.5", linestyle=":", label=f"random C/n = {baseline:.4f}")
    ratio_ax.set_title("outlier size: lambda_max / bulk edge", fontsize="medium")
    overlap_ax.set_title("gradient share in the top-C eigenspace", fontsize="medium")
    overlap_ax.set_ylim(0, 1.02)
    for ax in (ratio_ax, overlap_ax):
        ax.set_xlabel("SGD step")
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="small")
    figure.savefig(paths[1], dpi=150)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


def rule_free(r: dict) -> float:
    """lambda_max / q99: the outlier size against the Ritz value below which 99% of the SLQ
    mass lies (no outlier rule involved)."""
    return r["structure"].lambda_max / r["q99"]


def claims(per_arch: dict, seeds: int, summary_png) -> list[Claim]:
    out = []
    for label, (arch, per_seed) in per_arch.items():
        final = arch.checkpoints_other[-1]
        outliers, grad, population, labels, rows = [], [], [], [], []
        for seed, results in enumerate(per_seed):
            nobn, batch, pop = (results[(v, final)] for v in VARIANTS)
            outliers.append(rule_free(nobn) / rule_free(batch))
            grad.append(nobn["overlap"].overlap - batch["overlap"].overlap)
            population.append(rule_free(pop) / rule_free(batch))
            labels.append(f"seed {seed}")
            for variant, r in zip(VARIANTS, (nobn, batch, pop), strict=True):
                rows.append(
                    [
                        seed,
                        variant,
                        r["loss"],
                        r["accuracy"],
                        r["structure"].lambda_max,
                        rule_free(r),
                        r["structure"].num_outliers,
                        r["overlap"].overlap,
                    ]
                )
        n = per_seed[0][(VARIANTS[0], final)]["n"]
        where = (
            f"{arch.label} (n = {n:,} without BatchNorm), step {final}, Hessian over "
            f"{arch.num_samples:,} digits"
        )
        details = f"Per seed, {where}:\n\n" + markdown_table(
            [
                "seed",
                "network",
                "loss",
                "acc",
                "λ_max",
                "λ_max/q99",
                "#outliers (rule)",
                "top-C share of g",
            ],
            rows,
        )
        v_out = judge(outliers, reproduces=Band(3.0, None), partly=Band(1.5, None))
        v_grad = judge(grad, reproduces=Band(0.3, None), partly=Band(0.1, None))
        v_pop = judge(population, reproduces=Band(3.0, None), partly=Band(1.5, None))
        figure = str(summary_png) if label == "small CNN" else None
        out += [
            Claim(
                key=f"BatchNorm suppresses the outliers ({label})",
                paper="Ghorbani, Krishnan & Xiao 2019",
                claim="Without BatchNorm a few large eigenvalues separate from the bulk; with "
                "BatchNorm (Hessian with batch statistics, as trained) they are almost gone.",
                paper_value="qualitative: outliers large without BN, absent or much smaller "
                "with BN",
                metric=f"(λ_max/q99 without BN) / (λ_max/q99 with BN, batch statistics), {where}"
                "; q99 = the Ritz value below which 99% of the SLQ mass lies",
                values=outliers,
                labels=labels,
                rule=v_out.rule,
                verdict=v_out.verdict,
                figure=figure,
                details=details,
            ),
            Claim(
                key=f"gradient concentration needs no BatchNorm ({label})",
                paper="Ghorbani, Krishnan & Xiao 2019",
                claim="Without BatchNorm the gradient concentrates in the outliers' (top-C) "
                "eigenspace; with BatchNorm it does not.",
                paper_value="qualitative: most of ||g||² in the top eigenspace without BN, "
                "little with BN",
                metric=f"share of ||g||² in the top-{C} eigenspace without BN minus with BN "
                f"(batch statistics), {where}",
                values=grad,
                labels=labels,
                rule=v_grad.rule,
                verdict=v_grad.verdict,
                figure=figure,
                details="Per seed: the table of the previous claim (column 'top-C share of g').",
            ),
            Claim(
                key=f"population statistics bring the outliers back ({label})",
                paper="Ghorbani, Krishnan & Xiao 2019",
                claim="Evaluating the BatchNorm network with population statistics (eval "
                "mode) brings the outliers back.",
                paper_value="qualitative: outliers reappear in eval mode",
                metric=f"(λ_max/q99, BN population statistics) / (λ_max/q99, BN batch "
                f"statistics), {where}",
                values=population,
                labels=labels,
                rule=v_pop.rule,
                verdict=v_pop.verdict,
                figure=figure,
                details="Per seed: the table of the first claim of this network.",
            ),
        ]
        if 0 in arch.checkpoints_other:
            shrink, shrink_labels = [], []
            for seed, results in enumerate(per_seed):
                for variant in VARIANTS:
                    first = results[(variant, 0)]["structure"].abs_min_over_max
                    last = results[(variant, final)]["structure"].abs_min_over_max
                    shrink.append(last / first)
                    shrink_labels.append(f"seed {seed}, {variant}")
            v_shrink = judge(shrink, reproduces=Band(None, 0.1), partly=Band(None, 0.5))
            out.append(
                Claim(
                    key=f"negative eigenvalues shrink in training ({label})",
                    paper="Ghorbani, Krishnan & Xiao 2019",
                    claim="The negative part of the spectrum shrinks quickly in training.",
                    paper_value="qualitative: negative eigenvalues become negligible early",
                    metric=f"(|λ_min|/λ_max at step {final}) / (at step 0), {arch.label}, all "
                    "three networks",
                    values=shrink,
                    labels=shrink_labels,
                    rule=v_shrink.rule,
                    verdict=v_shrink.verdict,
                    figure=figure,
                )
            )
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], NAME)
    archs = (QUICK_SMALL, QUICK_RESNET) if args.quick else (SMALL, RESNET)
    per_arch = {}
    paths = []
    for arch in archs:
        per_seed = []
        for seed in range(args.seeds):
            checkpoints = arch.checkpoints if seed == 0 else arch.checkpoints_other
            results = {**run(arch, False, seed, checkpoints), **run(arch, True, seed, checkpoints)}
            per_seed.append(results)
            print(f"\n{arch.label}, seed {seed} ({arch.num_samples} digits, {elapsed(args)}):")
            print_table(results, checkpoints)
        per_arch[arch.label] = (arch, per_seed)
        if arch.label == "small CNN":
            paths = figures(args, per_seed[0], arch)
    print(
        "(loss and accuracy over the network's digits in its mode; lambda_max, bulk_max: "
        "largest Ritz value and the bulk's right edge by spectrum_structure; q99: the Ritz "
        "value below which 99% of the SLQ mass lies; neg. mass: resolved negative mass; "
        "* = an eigenpair above the 1e-3 residual)"
    )
    print(f"time {elapsed(args)}")
    small, resnet = archs
    setup = (
        f"Two networks, each with and without BatchNorm2d after every convolution (the same "
        f"initial weights), SGD lr {LR}, momentum {MOMENTUM}, cycling through fixed batches "
        f"of {BATCH}, cross-entropy. The {small.label} (`zoo.digits_cnn`, ReLU, conv 1→8, "
        "conv 8→16, linear: 1,898 parameters, 1,946 with BatchNorm) on all 1,797 digits, "
        f"measured at steps {', '.join(map(str, small.checkpoints_other))} (seed 0 also at "
        f"{', '.join(str(c) for c in small.checkpoints if c not in small.checkpoints_other)}"
        f"), SLQ {small.probes} probes x {small.iters} Lanczos steps. The {resnet.label} "
        "(`digits_resnet` in the script: a 3x3 stem and three residual blocks of two 3x3 "
        "convolutions, 16-32-64 channels, global average pooling, linear; 77,418 parameters, "
        f"77,754 with BatchNorm) on the first {resnet.num_samples} digits, measured at step "
        f"{resnet.checkpoints[-1]} (it trains faster: without BatchNorm its loss is 0.1-0.6 "
        f"there, that of the small CNN at steps 150-300), SLQ {resnet.probes} x "
        f"{resnet.iters}. The Hessian is that of the mean loss over the network's training "
        "digits in those batches (float32 products; BatchNorm in train mode normalises with "
        "each batch's statistics, as in training; 'population statistics' is the same network "
        "in eval mode), its top-10 eigenpairs by ARPACK (relative residual 1e-3) and the "
        "full-data gradient. The residual net is smaller than the 0.1-0.3M parameters asked "
        "for and sees 600 digits: one Hessian product of it over all 1,797 digits takes "
        "0.35-0.5 s on one thread (1.3 s at 0.3M parameters), and five seeds of three "
        "measurements each did not fit the hour of `make reproduce` otherwise. Seeds vary the "
        "initialisation."
    )
    write_summary(
        args,
        NAME,
        "BatchNorm and outliers",
        setup,
        claims(per_arch, args.seeds, paths[1]),
        paths,
    )


if __name__ == "__main__":
    main()
