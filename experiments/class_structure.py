"""Class structure of the Gauss-Newton matrix (Papyan 2019, 2020), scaled down to the digits.

Papyan splits the Hessian H into the Gauss-Newton term G = J^T H_L J and a residual H - G,
and G (ICML 2019, arXiv:1901.08244) into G0 (the true-label means mu_{c,c}), G1 (the class
means mu_c = Ave_{c' != c} mu_{c,c'}, rank <= C), G2 (cross-class, the mu_{c,c'} - mu_c) and a
within-class rest (formulas in ``curvscope.operators.class_structure``). In deep classifiers
trained to zero error he finds that G carries C outliers (class means), then C(C-1) smaller
ones (cross-class) above a bulk (within-class), and that the residual is small.

Here, two parts.

Trained: the 64-32-32-10 tanh MLP of ``curvscope.zoo.digits_mlp`` (n = 3,466, seed 0),
trained with full-batch SGD (momentum 0.9) for 400 steps to 100% training accuracy on the
first N digits, N = 300, 900, 1797, with the cross-entropy (lr 0.05), and at N = 1797 also
with the mean-squared error on one-hot targets (lr 0.5). At each trained model:

* SLQ densities (5 probes x 120 Lanczos steps, float64) of H, G, H - G and G0, G1, G2, W,
  and their structure by ``curvscope.analysis.spectrum_structure`` (default rule); at
  N = 1797 also the outlier counts of H and G with 40 and 80 steps (the rule's count moves
  with the number of steps on these spectra);
* the exact nonzero eigenvalues of the low-rank terms G0, G1, G2 and B (from their vectors);
* the top 2C eigenpairs of G (ARPACK to a relative residual of 1e-6): the largest eigengap
  among them, and how much of G's top-C eigenspace lies in the span of the class means mu_c,
  of all C^2 pair means mu_{c,c'}, and of the C global per-logit means beta_{c'},
  (1/C) tr(P_C P_span);
* ||H - G||_2 / ||G||_2 from the largest-magnitude eigenvalue of H - G;
* the traces of the terms as shares of tr(G) (Hutch++, 99 products, for tr(G)).

Initialisation: the ReLU MLP 64-256-256-10 (n = 85,002, seed 0, untrained) on all 1,797
digits, cross-entropy and MSE: G's top 14 eigenvalues (ARPACK, 1e-6), the overlap of its
top-(C-1) (cross-entropy) or top-C (MSE) eigenspace with the span of the global means
beta_{c'}, and the exact eigenvalues of B, G0, G1, G2.

Run:  .venv/bin/python experiments/class_structure.py     (about 1.5 minutes on 1 thread)
Writes docs/figures/structure_class_terms.png, structure_class_sizes.png and
structure_class_top.png (trained and initialisation panels), and prints the tables.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import elapsed, fmt, parse_args, table
from matplotlib.figure import Figure
from torch.nn import functional as F

from curvscope import spectral_density, top_eigenpairs, trace, zoo
from curvscope.analysis import spectrum_structure, subspace_overlap
from curvscope.losses import mse_loss
from curvscope.operators import HessianOperator, ResidualOperator
from curvscope.operators.class_structure import class_decomposition
from curvscope.plot import TERM_LABELS, plot_densities

C = 10
SIZES = (300, 900, 1797)
STEPS = 400
LR = {"cross_entropy": 0.05, "mse": 0.5}
ITERS, PROBES = 120, 5
#: Lanczos steps at which the outlier counts of H and G are also taken (N = 1797 only).
SENSITIVITY = (40, 80)
SEED = 0
#: Papyan's split G = G0 + G1 + G2 + W, after H, G and H - G.
SPLIT = ("true_label", "class_means", "cross_class", "within_class")
TERMS = ("hessian", "ggn", "residual", *SPLIT)
LABELS = {
    **TERM_LABELS,
    "true_label": "G0: true-label means",
    "class_means": "G1: class means",
    "cross_class": "G2: cross-class",
    "within_class": "W: within-class",
}
#: The network at initialisation whose G has C - 1 (cross-entropy) or C (MSE) outliers.
INIT_HIDDEN = (256, 256)
INIT_K = 14
SHORT = {"cross_entropy": "CE", "mse": "MSE"}


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


def span(columns: torch.Tensor) -> np.ndarray:
    """Orthonormal basis (n, r) of the span of the columns (n, c): the left singular vectors
    with singular value above 1e-10 of the largest (r = numerical rank)."""
    u, s, _ = np.linalg.svd(columns.detach().to(torch.float64).numpy(), full_matrices=False)
    return u[:, s > 1e-10 * s[0]]


def analyse(loss: str, num_samples: int) -> dict:
    model, data, loss_fn = train(loss, num_samples)
    split = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    hessian = HessianOperator(model, loss_fn, data)
    ops = {"hessian": hessian, "residual": ResidualOperator(model, loss_fn, data)}
    ops.update(split.terms())
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
    exact = {
        name: getattr(split, name).eigenvalues()
        for name in ("true_label", "class_means", "cross_class", "global_means")
    }
    g_pairs = top_eigenpairs(split.ggn, k=2 * C, tol=1e-6, seed=SEED)
    values = g_pairs.values
    gaps = values[:-1] / values[1:]
    top_c = g_pairs.vectors[:, :C]
    r_top = top_eigenpairs(ops["residual"], k=1, which="magnitude", tol=1e-6, seed=SEED)
    g_trace = trace(split.ggn, num_probes=99, seed=SEED).value
    counts = {}
    if num_samples == SIZES[-1]:
        for name in ("hessian", "ggn"):
            for m in SENSITIVITY:
                d = spectral_density(ops[name], num_iters=m, num_probes=PROBES, seed=SEED)
                counts[(name, m)] = spectrum_structure(d)
            counts[(name, ITERS)] = structures[name]
    shares = {name: float(exact[name].sum() / g_trace) for name in SPLIT[:3]}
    shares["within_class"] = 1.0 - sum(shares.values())
    return {
        "counts": counts,
        "loss": loss,
        "N": num_samples,
        "train_loss": train_loss,
        "accuracy": accuracy,
        "n": hessian.num_params,
        "densities": densities,
        "structures": structures,
        "exact": exact,
        "g_top": values,
        "gap_at": int(np.argmax(gaps)) + 1,
        "gap": float(np.max(gaps)),
        "gap_c": float(values[C - 1] / values[C]),
        "gap_c1": float(values[C - 2] / values[C - 1]),
        "overlap": {
            "class_means": subspace_overlap(top_c, span(split.class_means.columns)),
            "all_pairs": subspace_overlap(top_c, span(split.all_pairs.columns)),
            "global_means": subspace_overlap(top_c, span(split.global_means.columns)),
        },
        "residual_ratio": float(abs(r_top.values[0]) / values[0]),
        "shares": shares,
    }


def analyse_init(loss: str) -> dict:
    """G of the untrained ReLU MLP 64-256-256-10 on all digits against the global means."""
    model = zoo.digits_mlp(hidden=INIT_HIDDEN, activation="relu", seed=SEED)
    data = zoo.digits_data(seed=SEED)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else mse_loss
    if loss == "mse":
        data = [(x, F.one_hot(y, C).float()) for x, y in data]
    split = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    values = top_eigenpairs(split.ggn, k=INIT_K, tol=1e-6, seed=SEED)
    k = C - 1 if loss == "cross_entropy" else C
    beta = split.global_means.columns.detach().to(torch.float64).numpy()
    sigma = np.linalg.svd(beta, compute_uv=False)
    return {
        "loss": loss,
        "n": split.ggn.num_params,
        "k": k,
        "g_top": values.values,
        "overlap": subspace_overlap(values.vectors[:, :k], span(split.global_means.columns)),
        "beta_sigma": sigma / sigma[0],
        "exact": {
            name: getattr(split, name).eigenvalues()
            for name in ("global_means", "true_label", "class_means", "cross_class")
        },
    }


def print_tables(runs: list[dict], inits: list[dict]) -> None:
    print("\nTable 1: outliers above the bulk found by spectrum_structure, per term")
    head = ["loss", "N", "train loss", "acc", *[f"#{name}" for name in TERMS], "G unresolved"]
    rows = []
    for r in runs:
        s = r["structures"]
        rows.append(
            [
                SHORT[r["loss"]],
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
            rows.append([SHORT[r["loss"]], name, *cells])
    print(table(head, rows))

    print("\nTable 2: G's top eigenvalues against Papyan's terms and the global means B")
    head = [
        "loss",
        "N",
        "lambda_1(G)",
        "l1(G0)",
        "l1(G1)",
        "l1(G2)",
        "l1(B)",
        "lam_C/lam_C+1",
        "lam_C-1/lam_C",
        "largest gap (k)",
        "top-C in mu_c",
        "in mu_cc'",
        "in beta",
        "tr share G0/G1/G2/W",
    ]
    rows = []
    for r in runs:
        e, o, s = r["exact"], r["overlap"], r["shares"]
        rows.append(
            [
                SHORT[r["loss"]],
                r["N"],
                fmt(r["g_top"][0]),
                *[fmt(e[name][0]) for name in (*SPLIT[:3], "global_means")],
                fmt(r["gap_c"]),
                fmt(r["gap_c1"]),
                f"{r['gap']:.3g} ({r['gap_at']})",
                *[f"{o[name]:.3f}" for name in ("class_means", "all_pairs", "global_means")],
                "/".join(f"{s[name]:.2f}" for name in SPLIT),
            ]
        )
    print(table(head, rows))
    print(
        "(span overlaps (1/C) tr(P_C P_span) with the C class means mu_c, the C^2 pair means "
        f"mu_cc' and the C global means beta_c'; random baselines C/n = {C / runs[0]['n']:.4f}"
        f" and C^2/n = {C * C / runs[0]['n']:.3f})"
    )

    print(
        "\nTable 3: at initialisation (untrained ReLU MLP 64-"
        + "-".join(map(str, INIT_HIDDEN))
        + f"-10, n = {inits[0]['n']:,}, all 1,797 digits)"
    )
    head = [
        "loss",
        "lambda_1(G)",
        "lam_C-1/lam_C",
        "lam_C/lam_C+1",
        "k",
        "top-k in beta",
        "beta: s_C/s_1",
        "l1(B)",
        "l_k(B)",
        "l_k(G)",
        "l1(G0)",
        "l1(G1)",
        "l1(G2)",
    ]
    rows = []
    for r in inits:
        g, e, k = r["g_top"], r["exact"], r["k"]
        rows.append(
            [
                SHORT[r["loss"]],
                fmt(g[0]),
                fmt(g[C - 2] / g[C - 1]),
                fmt(g[C - 1] / g[C]),
                k,
                f"{r['overlap']:.4f}",
                fmt(r["beta_sigma"][C - 1]),
                fmt(e["global_means"][0]),
                fmt(e["global_means"][k - 1]),
                fmt(g[k - 1]),
                *[fmt(e[name][0]) for name in SPLIT[:3]],
            ]
        )
    print(table(head, rows))
    for r in inits:
        g = r["g_top"]
        print(f"  {SHORT[r['loss']]:>3} top {INIT_K} of G: {np.array2string(g, precision=4)}")

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
                SHORT[r["loss"]],
                r["N"],
                f"{r['residual_ratio']:.3f}",
                fmt(h.lambda_min),
                fmt(h.lambda_max),
                f"{h.negative_mass_band:.3f}",
                f"{res.negative_mass_band:.3f}",
            ]
        )
    print(table(head, rows))

    print("\nExact eigenvalues of the class-means term G1 (C = 10), divided by the largest:")
    for r in runs:
        cm = r["exact"]["class_means"]
        print(f"  {SHORT[r['loss']]:>3} N={r['N']:>4}: {np.array2string(cm / cm[0], precision=3)}")
    print("Top 2C eigenvalues of G, divided by the largest:")
    for r in runs:
        g = r["g_top"]
        print(f"  {SHORT[r['loss']]:>3} N={r['N']:>4}: {np.array2string(g / g[0], precision=3)}")


def plot(args, runs: list[dict], inits: list[dict]) -> list[str]:
    full = [r for r in runs if r["N"] == SIZES[-1]]
    densities, structures, labels = {}, {}, {}
    for r in full:
        for name in ("hessian", "ggn", *SPLIT):  # H - G: in structure_class_sizes.png
            key = f"{r['loss']}:{name}"
            densities[key] = r["densities"][name]
            structures[key] = r["structures"][name]
            labels[key] = f"{SHORT[r['loss']]}: {LABELS[name]}"
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
            labels[key] = f"N = {r['N']}: {LABELS[name]}"
    plot_densities(  # dpi 100: the grids are large
        densities,
        args.out / "structure_class_sizes.png",
        structures,
        dpi=100,
        labels=labels,
        columns=3,
        title="H, G and H - G at three sample sizes (cross-entropy, 400 SGD steps each)",
    )
    markers = {
        "true_label": ("v", "C1", "G0: true-label means"),
        "class_means": ("s", "C3", "G1: class means"),
        "cross_class": ("^", "C2", "G2: cross-class"),
        "global_means": ("D", "C4", "B: global means"),
    }
    figure = Figure(figsize=(11, 8), layout="constrained")
    panels = [(r, f"{SHORT[r['loss']]}, N = {r['N']}, trained") for r in full]
    panels += [(r, f"{SHORT[r['loss']]}, initialisation (ReLU 64-256-256-10)") for r in inits]
    for ax, (r, title) in zip(figure.subplots(2, 2).flat, panels, strict=True):
        g = r["g_top"]
        k = np.arange(1, len(g) + 1)
        ax.semilogy(k, g, "o-", color="C0", label=f"G (top {len(g)}, ARPACK)")
        for name, (marker, color, label) in markers.items():
            values = r["exact"][name][: len(g)]
            values = values[values > 1e-12 * g[0]]
            ax.semilogy(np.arange(1, len(values) + 1), values, marker, color=color, label=label)
        ax.axvline(C - 0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.axvline(C + 0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlabel("index k (largest first)")
        ax.set_ylabel("eigenvalue")
        ax.set_xticks(k[::2])
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="small")
    figure.savefig(args.out / "structure_class_top.png", dpi=150)
    return ["structure_class_terms.png", "structure_class_sizes.png", "structure_class_top.png"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    inits = [analyse_init(loss) for loss in ("cross_entropy", "mse")]
    runs = [analyse("cross_entropy", n) for n in SIZES]
    runs.append(analyse("mse", SIZES[-1]))
    print_tables(runs, inits)
    names = plot(args, runs, inits)
    print("\nwrote " + ", ".join(str(args.out / name) for name in names))
    print(f"time {elapsed(args)}")


if __name__ == "__main__":
    main()
