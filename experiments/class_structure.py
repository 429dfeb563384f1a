"""Class structure of the Gauss-Newton matrix (Papyan 2019, 2020), scaled down to the digits.

Papyan splits the Hessian H into the Gauss-Newton term G = J^T H_L J and a residual H - G,
and G further into a class-means term (rank <= C), a cross-class term (rank <= C(C-1)) and a
within-class term. In deep classifiers trained to zero error he finds that G carries C
outliers (from the class means), then C(C-1) smaller ones (cross-class) above a bulk (within-
class), and that the residual is small.

Here: the 64-32-32-10 tanh MLP of ``curvscope.zoo.digits_mlp`` (n = 3,466, seed 0), trained
with full-batch SGD (momentum 0.9) for 400 steps to 100% training accuracy on the first N
digits, N = 300, 900, 1797, with the cross-entropy (lr 0.05), and at N = 1797 also with the
mean-squared error on one-hot targets (lr 0.5). At each trained model:

* SLQ densities (5 probes x 120 Lanczos steps, float64) of H, G, H - G and the three class
  terms, and their structure by ``curvscope.analysis.spectrum_structure`` (default rule); at
  N = 1797 also the outlier counts of H and G with 40 and 80 steps (the rule's count moves
  with the number of steps on these spectra);
* the exact nonzero eigenvalues of the low-rank class-means and cross-class terms (from their
  C and C^2 vectors);
* the top 2C eigenpairs of G (ARPACK to a relative residual of 1e-6): the largest eigengap
  among them, and how much of G's top-C eigenspace lies in the span of the class-mean vectors
  (and of class-mean + cross-class vectors), (1/C) tr(P_C P_span);
* ||H - G||_2 / ||G||_2 from the largest-magnitude eigenvalue of H - G;
* the traces of the terms as shares of tr(G) (Hutch++, 99 products, for tr(G)).

Run:  .venv/bin/python experiments/class_structure.py     (about 1 minute on 1 thread)
Writes docs/figures/structure_class_terms.png, structure_class_sizes.png and
structure_class_top.png, and prints the tables.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import elapsed, fmt, parse_args, table
from matplotlib.figure import Figure
from torch.nn import functional as F

from curvscope import spectral_density, top_eigenpairs, trace, zoo
from curvscope.analysis import spectrum_structure, subspace_overlap
from curvscope.cli import mse_loss
from curvscope.cli_structure import TERM_LABELS, TERMS, lowrank_eigenvalues, plot_densities
from curvscope.operators import HessianOperator, ResidualOperator
from curvscope.operators.class_structure import class_decomposition

C = 10
SIZES = (300, 900, 1797)
STEPS = 400
LR = {"cross_entropy": 0.05, "mse": 0.5}
ITERS, PROBES = 120, 5
#: Lanczos steps at which the outlier counts of H and G are also taken (N = 1797 only).
SENSITIVITY = (40, 80)
SEED = 0
#: Parts of the flat parameter vector the class-mean vectors are restricted to in Table 3.
BLOCKS = ("all", "output layer", "output bias")


def train(loss: str, num_samples: int) -> tuple[torch.nn.Module, list, object]:
    """Full-batch SGD with momentum 0.9 for STEPS steps; targets one-hot for MSE."""
    data = zoo.digits_data(batch_size=300, num_samples=num_samples, seed=SEED)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else mse_loss
    if loss == "mse":
        data = [(x, F.one_hot(y, C).float()) for x, y in data]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    model = zoo.digits_mlp(seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR[loss], momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model, data, loss_fn


def orthonormal(columns: torch.Tensor) -> np.ndarray:
    """Orthonormal basis (n, r) of the span of the columns (n, r), by QR."""
    q, _ = np.linalg.qr(columns.detach().to(torch.float64).numpy())
    return q


def block_singular_values(op: object, rows: slice) -> np.ndarray:
    """Singular values of the weighted class-mean vectors sqrt(w_c) delta_c restricted to
    ``rows`` of the flat parameter vector, descending, divided by the largest."""
    columns = op.columns[rows].detach().to(torch.float64) * op.weights.sqrt()
    values = np.linalg.svd(columns.numpy(), compute_uv=False)
    return values / values[0]


def analyse(loss: str, num_samples: int) -> dict:
    model, data, loss_fn = train(loss, num_samples)
    decomposition = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    hessian = HessianOperator(model, loss_fn, data)
    ops = {
        "hessian": hessian,
        "residual": ResidualOperator(model, loss_fn, data),
        **decomposition.terms(),
    }
    densities = {
        name: spectral_density(ops[name], num_iters=ITERS, num_probes=PROBES, seed=SEED)
        for name in TERMS
    }
    structures = {name: spectrum_structure(d) for name, d in densities.items()}
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        out = model(x)
        train_loss = float(loss_fn(out, y))
        labels = y.argmax(1) if y.is_floating_point() else y
        accuracy = float((out.argmax(1) == labels).float().mean())
    class_means = lowrank_eigenvalues(decomposition.class_means)
    cross_class = lowrank_eigenvalues(decomposition.cross_class)
    g_pairs = top_eigenpairs(decomposition.ggn, k=2 * C, tol=1e-6, seed=SEED)
    values = g_pairs.values
    gaps = values[:-1] / values[1:]
    means_basis = orthonormal(decomposition.class_means.columns)
    both_basis = orthonormal(
        torch.cat([decomposition.class_means.columns, decomposition.cross_class.columns], dim=1)
    )
    top_c = g_pairs.vectors[:, :C]
    # Output layer = the last two parameters (4.weight, 4.bias) in flat-vector order.
    n = hessian.num_params
    blocks = dict(zip(BLOCKS, (slice(0, n), slice(n - C * 33, n), slice(n - C, n)), strict=True))
    r_top = top_eigenpairs(ops["residual"], k=1, which="magnitude", tol=1e-6, seed=SEED)
    g_trace = trace(decomposition.ggn, num_probes=99, seed=SEED).value
    counts = {}
    if num_samples == SIZES[-1]:
        for name in ("hessian", "ggn"):
            for m in SENSITIVITY:
                d = spectral_density(ops[name], num_iters=m, num_probes=PROBES, seed=SEED)
                counts[(name, m)] = spectrum_structure(d)
            counts[(name, ITERS)] = structures[name]
    return {
        "counts": counts,
        "loss": loss,
        "N": num_samples,
        "train_loss": train_loss,
        "accuracy": accuracy,
        "n": hessian.num_params,
        "densities": densities,
        "structures": structures,
        "class_means": class_means,
        "cross_class": cross_class,
        "g_top": values,
        "gap_at": int(np.argmax(gaps)) + 1,
        "gap": float(np.max(gaps)),
        "gap_c": float(values[C - 1] / values[C]),
        "gap_c1": float(values[C - 2] / values[C - 1]),
        "overlap_means": subspace_overlap(top_c, means_basis),
        "overlap_both": subspace_overlap(top_c, both_basis),
        "means_sv": {
            part: block_singular_values(decomposition.class_means, rows)
            for part, rows in blocks.items()
        },
        "residual_ratio": float(abs(r_top.values[0]) / values[0]),
        "trace_means": float(class_means.sum() / g_trace),
        "trace_cross": float(cross_class.sum() / g_trace),
        "trace_within": float(1.0 - (class_means.sum() + cross_class.sum()) / g_trace),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    runs = [analyse("cross_entropy", n) for n in SIZES]
    runs.append(analyse("mse", SIZES[-1]))
    short = {"cross_entropy": "CE", "mse": "MSE"}

    print("\nTable 1: outliers above the bulk found by spectrum_structure, per term")
    head = ["loss", "N", "train loss", "acc", *[f"#{name}" for name in TERMS], "G unresolved"]
    rows = []
    for r in runs:
        s = r["structures"]
        rows.append(
            [
                short[r["loss"]],
                r["N"],
                fmt(r["train_loss"]),
                f"{r['accuracy']:.3f}",
                *[s[name].num_outliers for name in TERMS],
                s["ggn"].num_unresolved,
            ]
        )
    print(table(head, rows))

    print(
        f"\nTable 1b: the same rule at N = {SIZES[-1]} with fewer Lanczos steps "
        "(outliers above the bulk, [bulk edges])"
    )
    steps = (*SENSITIVITY, ITERS)
    head = ["loss", "term", *[f"{m} steps" for m in steps]]
    rows = []
    for r in runs:
        for name in ("hessian", "ggn") if r["counts"] else ():
            cells = []
            for m in steps:
                c = r["counts"][(name, m)]
                cells.append(f"{c.num_outliers} [{c.bulk_min:.2g}, {c.bulk_max:.2g}]")
            rows.append([short[r["loss"]], name, *cells])
    print(table(head, rows))

    print("\nTable 2: G's top eigenvalues against the class terms")
    head = [
        "loss",
        "N",
        "lambda_1(G)",
        "lambda_1(cm)",
        "lam_C/lam_C+1",
        "lam_C-1/lam_C",
        "largest gap (k)",
        "cm: lam_10/lam_1",
        "top-C in cm span",
        "in cm+cc span",
        "tr share cm/cc/wc",
    ]
    rows = []
    for r in runs:
        cm = r["class_means"]
        rows.append(
            [
                short[r["loss"]],
                r["N"],
                fmt(r["g_top"][0]),
                fmt(cm[0]),
                fmt(r["gap_c"]),
                fmt(r["gap_c1"]),
                f"{r['gap']:.3g} ({r['gap_at']})",
                fmt(cm[C - 1] / cm[0]),
                f"{r['overlap_means']:.3f}",
                f"{r['overlap_both']:.3f}",
                f"{r['trace_means']:.2f}/{r['trace_cross']:.2f}/{r['trace_within']:.2f}",
            ]
        )
    print(table(head, rows))
    print(
        f"(random baselines of the span overlaps: C/n = {C / runs[0]['n']:.4f} and "
        f"(C + C^2)/n = {(C + C * C) / runs[0]['n']:.3f})"
    )

    print("\nTable 3: the class-mean vectors sqrt(N_c C / N) delta_c: sigma_C / sigma_1 and rank")
    head = ["loss", "N", *[f"{part}: s_C/s_1" for part in BLOCKS], *[f"rank {p}" for p in BLOCKS]]
    rows = []
    for r in runs:
        sv = r["means_sv"]
        rows.append(
            [
                short[r["loss"]],
                r["N"],
                *[fmt(sv[part][-1]) for part in BLOCKS],
                *[int(np.sum(sv[part] > 1e-10)) for part in BLOCKS],
            ]
        )
    print(table(head, rows))

    print("\nTable 4: residual and negative curvature")
    head = [
        "loss",
        "N",
        "||H-G||/||G||",
        "lambda_min(H)",
        "lambda_max(H)",
        "H neg. mass (band)",
        "H-G neg. mass (band)",
    ]
    rows = []
    for r in runs:
        h, res = r["structures"]["hessian"], r["structures"]["residual"]
        rows.append(
            [
                short[r["loss"]],
                r["N"],
                f"{r['residual_ratio']:.3f}",
                fmt(h.lambda_min),
                fmt(h.lambda_max),
                f"{h.negative_mass_band:.3f}",
                f"{res.negative_mass_band:.3f}",
            ]
        )
    print(table(head, rows))

    print("\nExact eigenvalues of the class-means term (C = 10), divided by the largest:")
    for r in runs:
        cm = r["class_means"]
        print(f"  {short[r['loss']]:>3} N={r['N']:>4}: {np.array2string(cm / cm[0], precision=3)}")
    print("Top 2C eigenvalues of G, divided by the largest:")
    for r in runs:
        g = r["g_top"]
        print(f"  {short[r['loss']]:>3} N={r['N']:>4}: {np.array2string(g / g[0], precision=3)}")

    full = [r for r in runs if r["N"] == SIZES[-1]]
    densities, structures, labels = {}, {}, {}
    for r in full:
        for name in TERMS:
            key = f"{r['loss']}:{name}"
            densities[key] = r["densities"][name]
            structures[key] = r["structures"][name]
            labels[key] = f"{short[r['loss']]}: {TERM_LABELS[name]}"
    plot_densities(  # dpi 100: the grids are large
        densities,
        args.out / "structure_class_terms.png",
        structures,
        dpi=100,
        labels=labels,
        columns=3,
        title=f"Papyan's split at N = {SIZES[-1]} (digits MLP, n = {full[0]['n']:,}; "
        f"{PROBES} probes x {ITERS} Lanczos steps, Ghorbani smoothing)",
    )
    densities, structures, labels = {}, {}, {}
    for r in runs[: len(SIZES)]:
        for name in ("hessian", "ggn", "residual"):
            key = f"{r['N']}:{name}"
            densities[key] = r["densities"][name]
            structures[key] = r["structures"][name]
            labels[key] = f"N = {r['N']}: {TERM_LABELS[name]}"
    plot_densities(  # dpi 100: the grids are large
        densities,
        args.out / "structure_class_sizes.png",
        structures,
        dpi=100,
        labels=labels,
        columns=3,
        title="H, G and H - G at three sample sizes (cross-entropy, 400 SGD steps each)",
    )
    figure = Figure(figsize=(11, 4), layout="constrained")
    for ax, r in zip(figure.subplots(1, 2), full, strict=True):
        k = np.arange(1, 2 * C + 1)
        ax.semilogy(k, r["g_top"], "o-", color="C0", label="G (top 2C, ARPACK)")
        ax.semilogy(k[:C], r["class_means"], "s", color="C3", label="class-means term (all C)")
        ax.semilogy(k, r["cross_class"][: 2 * C], "^", color="C2", label="cross-class term")
        ax.axvline(C + 0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlabel("index k (largest first)")
        ax.set_ylabel("eigenvalue")
        ax.set_xticks(k[::2])
        ax.set_title(f"{short[r['loss']]}, N = {r['N']}: top eigenvalues", fontsize="medium")
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="small")
    figure.savefig(args.out / "structure_class_top.png", dpi=150)
    names = ("structure_class_terms.png", "structure_class_sizes.png", "structure_class_top.png")
    print("\nwrote " + ", ".join(str(args.out / name) for name in names))
    print(f"time {elapsed(args)}")


if __name__ == "__main__":
    main()
