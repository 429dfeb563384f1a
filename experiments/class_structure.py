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

Regularised (where the class structure does show at this scale): the ReLU MLP 64-256-256-10
(n = 85,002), minibatch SGD (batch 128, a seeded permutation per epoch, lr 0.05, momentum
0.9) on the first N = 300, 900, 1797 digits with

* "CE+LS+WD": cross-entropy with label smoothing 0.1 and weight decay 5e-4, 3,000 steps;
* "MSE+WD": MSE on one-hot targets with weight decay 5e-3, 6,000 steps.

G (of the loss without smoothing or decay: label smoothing leaves the logit Hessian
diag(p) - pp^T unchanged) with its top 2C eigenpairs (ARPACK, 1e-6), the exact eigenvalues of
G0, G1, G2, B and the overlaps of the top-C eigenspace with the spans above. Training-set
size N is Papyan's second axis (arXiv:1811.07062).

Seeds (--seeds N, default 5) vary the initialisation (and the batch order of the regularised
runs); the data are the first N digits of a fixed order. Seed 0 gets the SLQ densities,
traces and outlier counts of the trained MLP (the figures and Tables 1-4); every seed gets
the ARPACK, exact low-rank and residual numbers of every setting.

Run:  .venv/bin/python experiments/class_structure.py [--seeds 5] [--quick]
(seed 0 about 3 minutes, each further seed about 1.5 minutes, on 1 thread).
Writes docs/figures/structure_class_terms.png, structure_class_sizes.png,
structure_class_top.png (trained and initialisation panels) and
structure_class_regularised.png, prints the tables and writes the summary
(experiments/_reproduce.py).
"""

from __future__ import annotations

import numpy as np
import torch
from _common import elapsed, fmt, parse_args, table
from _reproduce import Band, Claim, judge, markdown_table, write_summary
from matplotlib.figure import Figure
from torch.nn import functional as F

from curvscope import spectral_density, top_eigenpairs, trace, zoo
from curvscope.analysis import spectrum_structure, subspace_overlap
from curvscope.losses import mse_loss
from curvscope.operators import HessianOperator, ResidualOperator
from curvscope.operators.class_structure import class_decomposition
from curvscope.plot import TERM_LABELS, plot_densities

NAME = "class_structure"
C = 10
SIZES = (300, 900, 1797)
STEPS = 400
LR = {"cross_entropy": 0.05, "mse": 0.5}
ITERS, PROBES = 120, 5
#: Lanczos steps at which the outlier counts of H and G are also taken (N = 1797 only).
SENSITIVITY = (40, 80)
#: The regularised settings: (loss, label smoothing, weight decay, steps).
REGULARISED = {
    "CE+LS+WD": ("cross_entropy", 0.1, 5e-4, 3000),
    "MSE+WD": ("mse", 0.0, 5e-3, 6000),
}
REG_HIDDEN, REG_BATCH, REG_LR, REG_MOMENTUM = (256, 256), 128, 0.05, 0.9
#: Initialisation analysis: the digits it uses (all).
INIT_SAMPLES = 1797


def quick_mode() -> None:
    """Tiny settings for --quick (CI: runs end to end, numbers meaningless)."""
    global SIZES, STEPS, ITERS, PROBES, SENSITIVITY, REGULARISED, INIT_SAMPLES
    SIZES, STEPS, ITERS, PROBES, SENSITIVITY = (300,), 40, 20, 2, (10,)
    REGULARISED = {
        "CE+LS+WD": ("cross_entropy", 0.1, 5e-4, 100),
        "MSE+WD": ("mse", 0.0, 5e-3, 100),
    }
    INIT_SAMPLES = 300


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


def train(loss: str, num_samples: int, seed: int) -> tuple[torch.nn.Module, list, object]:
    """Full-batch SGD with momentum 0.9 for STEPS steps; targets one-hot for MSE."""
    data = zoo.digits_data(batch_size=300, num_samples=num_samples, seed=0)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else mse_loss
    if loss == "mse":
        data = [(x, F.one_hot(y, C).float()) for x, y in data]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    model = zoo.digits_mlp(seed=seed)
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


def analyse(loss: str, num_samples: int, seed: int = 0, dense: bool = True) -> dict:
    """The trained tanh MLP; ``dense``: also the SLQ densities, structures, outlier counts
    and the trace of G (seed 0: the figures and Tables 1, 1b, 4)."""
    model, data, loss_fn = train(loss, num_samples, seed)
    split = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    hessian = HessianOperator(model, loss_fn, data)
    ops = {"hessian": hessian, "residual": ResidualOperator(model, loss_fn, data)}
    ops.update(split.terms())
    densities = {
        name: spectral_density(ops[name], num_iters=ITERS, num_probes=PROBES, seed=seed)
        for name in (TERMS if dense else ())
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
    g_pairs = top_eigenpairs(split.ggn, k=2 * C, tol=1e-6, seed=seed)
    values = g_pairs.values
    r_top = top_eigenpairs(ops["residual"], k=1, which="magnitude", tol=1e-6, seed=seed)
    counts, shares = {}, {}
    if dense:
        g_trace = trace(split.ggn, num_probes=99, seed=seed).value
        if num_samples == SIZES[-1]:
            for name in ("hessian", "ggn"):
                for m in SENSITIVITY:
                    d = spectral_density(ops[name], num_iters=m, num_probes=PROBES, seed=seed)
                    counts[(name, m)] = spectrum_structure(d)
                counts[(name, ITERS)] = structures[name]
        shares = {name: float(exact[name].sum() / g_trace) for name in SPLIT[:3]}
        shares["within_class"] = 1.0 - sum(shares.values())
    return {
        **top_numbers(split, g_pairs),
        "seed": seed,
        "counts": counts,
        "loss": loss,
        "N": num_samples,
        "train_loss": train_loss,
        "accuracy": accuracy,
        "n": hessian.num_params,
        "densities": densities,
        "structures": structures,
        "exact": exact,
        "residual_ratio": float(abs(r_top.values[0]) / values[0]),
        "shares": shares,
    }


def top_numbers(split, g_pairs) -> dict:
    """G's top 2C eigenvalues, its gaps, and the overlaps of its top-C eigenspace with the
    spans of the class means, all pair means and the global means."""
    values = g_pairs.values
    gaps = values[:-1] / values[1:]
    top_c = g_pairs.vectors[:, :C]
    return {
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
    }


def train_regularised(setting: str, num_samples: int, seed: int) -> tuple[torch.nn.Module, list]:
    """Minibatch SGD (REG_BATCH, a seeded permutation per epoch) on the first ``num_samples``
    digits with the setting's loss, label smoothing and weight decay."""
    loss, smoothing, decay, steps = REGULARISED[setting]
    data = zoo.digits_data(batch_size=300, num_samples=num_samples, seed=0)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    model = zoo.digits_mlp(hidden=REG_HIDDEN, activation="relu", seed=seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=REG_LR, momentum=REG_MOMENTUM, weight_decay=decay
    )
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(num_samples, generator=generator), 0
    for _ in range(steps):
        if position + REG_BATCH > num_samples:
            order, position = torch.randperm(num_samples, generator=generator), 0
        index = order[position : position + REG_BATCH]
        position += REG_BATCH
        out = model(x[index])
        if loss == "cross_entropy":
            value = F.cross_entropy(out, y[index], label_smoothing=smoothing)
        else:
            value = mse_loss(out, F.one_hot(y[index], C).float())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    if loss == "mse":
        data = [(a, F.one_hot(b, C).float()) for a, b in data]
    return model, data


def analyse_regularised(setting: str, num_samples: int, seed: int) -> dict:
    loss = REGULARISED[setting][0]
    model, data = train_regularised(setting, num_samples, seed)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else mse_loss
    split = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    g_pairs = top_eigenpairs(split.ggn, k=2 * C, tol=1e-6, seed=seed)
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        out = model(x)
        labels = y.argmax(1) if y.is_floating_point() else y
        accuracy = float((out.argmax(1) == labels).float().mean())
        train_loss = float(loss_fn(out, y))
    return {
        **top_numbers(split, g_pairs),
        "setting": setting,
        "seed": seed,
        "N": num_samples,
        "n": split.ggn.num_params,
        "accuracy": accuracy,
        "train_loss": train_loss,
        "exact": {
            name: getattr(split, name).eigenvalues()
            for name in ("true_label", "class_means", "cross_class", "global_means")
        },
    }


def analyse_init(loss: str, seed: int = 0) -> dict:
    """G of the untrained ReLU MLP 64-256-256-10 on all digits against the global means."""
    model = zoo.digits_mlp(hidden=INIT_HIDDEN, activation="relu", seed=seed)
    data = zoo.digits_data(num_samples=INIT_SAMPLES, seed=0)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else mse_loss
    if loss == "mse":
        data = [(x, F.one_hot(y, C).float()) for x, y in data]
    split = class_decomposition(model, loss_fn, data, loss=loss)  # type: ignore[arg-type]
    values = top_eigenpairs(split.ggn, k=INIT_K, tol=1e-6, seed=seed)
    k = C - 1 if loss == "cross_entropy" else C
    beta = split.global_means.columns.detach().to(torch.float64).numpy()
    sigma = np.linalg.svd(beta, compute_uv=False)
    return {
        "loss": loss,
        "seed": seed,
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


def plot_regularised(args, regs: list[dict]) -> str:
    """G's top 2C eigenvalues against the exact eigenvalues of G0, G1, G2 and B, for each
    regularised setting at the largest N (seed 0)."""
    markers = {
        "true_label": ("v", "C1", "G0: true-label means"),
        "class_means": ("s", "C3", "G1: class means"),
        "cross_class": ("^", "C2", "G2: cross-class"),
        "global_means": ("D", "C4", "B: global means"),
    }
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, r in zip(figure.subplots(1, len(regs)), regs, strict=True):
        g = r["g_top"]
        k = np.arange(1, len(g) + 1)
        ax.semilogy(k, g, "o-", color="C0", label=f"G (top {len(g)}, ARPACK)")
        for name, (marker, color, label) in markers.items():
            values = r["exact"][name][: len(g)]
            values = values[values > 1e-12 * g[0]]
            ax.semilogy(np.arange(1, len(values) + 1), values, marker, color=color, label=label)
        ax.axvline(C + 0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlabel("index k (largest first)")
        ax.set_ylabel("eigenvalue")
        ax.set_xticks(k[::2])
        ax.set_title(
            f"{r['setting']}, N = {r['N']}: λ_C/λ_C+1 = {r['gap_c']:.2f}, top-C in span(μ_c) "
            f"{r['overlap']['class_means']:.2f}",
            fontsize="medium",
        )
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="small")
    figure.suptitle("ReLU MLP 64-256-256-10 trained with regularisation (seed 0)")
    path = args.out / "structure_class_regularised.png"
    figure.savefig(path, dpi=150)
    return path.name


def print_regularised(regs: list[dict]) -> None:
    print(
        "\nTable 5: regularised ReLU MLP 64-"
        + "-".join(map(str, REG_HIDDEN))
        + "-10: G's top eigenvalues (every seed)"
    )
    head = [
        "setting",
        "N",
        "seed",
        "train loss",
        "acc",
        "lambda_1(G)",
        "lam_C-1/lam_C",
        "lam_C/lam_C+1",
        "largest gap (k)",
        "top-C in mu_c",
        "in mu_cc'",
        "in beta",
    ]
    rows = [
        [
            r["setting"],
            r["N"],
            r["seed"],
            fmt(r["train_loss"]),
            f"{r['accuracy']:.3f}",
            fmt(r["g_top"][0]),
            fmt(r["gap_c1"]),
            fmt(r["gap_c"]),
            f"{r['gap']:.3g} ({r['gap_at']})",
            *[f"{r['overlap'][k]:.3f}" for k in ("class_means", "all_pairs", "global_means")],
        ]
        for r in regs
    ]
    print(table(head, rows))


def outlier_gap(r: dict) -> float:
    """The larger of lambda_{C-1}/lambda_C and lambda_C/lambda_{C+1} of G: the separation of
    C - 1 or C outliers (Papyan: C for MSE, C or C - 1 for the cross-entropy)."""
    return max(r["gap_c"], r["gap_c1"])


def origin_note(runs: list[dict]) -> str:
    """Which span G's top-C eigenspace lies in (median over the runs), as a sentence: the
    count of outliers alone does not say whether they are Papyan's class means."""
    means = float(np.median([r["overlap"]["class_means"] for r in runs]))
    beta = float(np.median([r["overlap"]["global_means"] for r in runs]))
    text = (
        f"Where the top-C eigenspace lies (medians): {means:.3f} in the span of the class means "
        f"μ_c, {beta:.3f} in that of the global per-logit means β."
    )
    if beta > 0.9 and means < 0.5:
        text += (
            " These outliers are B's (the global means, as at initialisation), not the class "
            "means of Papyan's hierarchy: the count reproduces, the class structure does not "
            "(next rows)."
        )
    return text + "\n\n"


def claims(
    plain: list[dict], regs: list[dict], inits: list[dict], figures: dict[str, str]
) -> list[Claim]:
    gap_rule = dict(reproduces=Band(1.5, None), partly=Band(1.2, None))
    gap_metric = (
        "separation of G's outliers: max(λ_C-1/λ_C, λ_C/λ_C+1) of G = J^T H_L J (top 2C by "
        "ARPACK, relative residual 1e-6)"
    )

    def gap_table(rows: list[dict]) -> str:
        return markdown_table(
            [
                "seed",
                "run",
                "N",
                "train loss",
                "acc",
                "λ_C-1/λ_C",
                "λ_C/λ_C+1",
                "largest gap among top 2C (at k)",
                "top-C in span μ_c",
                "in span μ_cc'",
                "in span β",
            ],
            [
                [
                    r["seed"],
                    r.get("setting") or SHORT[r["loss"]],
                    r["N"],
                    r["train_loss"],
                    r["accuracy"],
                    r["gap_c1"],
                    r["gap_c"],
                    f"{r['gap']:.3g} ({r['gap_at']})",
                    r["overlap"]["class_means"],
                    r["overlap"]["all_pairs"],
                    r["overlap"]["global_means"],
                ]
                for r in rows
            ],
        )

    full = max(SIZES)
    out = []
    chosen = [r for r in plain if r["N"] == full]
    v = judge([outlier_gap(r) for r in chosen], **gap_rule)
    out.append(
        Claim(
            key="C outliers of G, plain losses",
            paper="Papyan 2019 (arXiv:1901.08244), 2020",
            claim="After training to zero error, G carries C outliers (C - 1 possible for the "
            "cross-entropy), separated from the rest of the spectrum.",
            paper_value="C (or C − 1) outliers clearly separated from the bulk",
            metric=gap_metric + f"; tanh MLP 64-32-32-10, {STEPS} full-batch steps, "
            f"plain CE and MSE, N = {full}",
            values=[outlier_gap(r) for r in chosen],
            labels=[f"seed {r['seed']}, {SHORT[r['loss']]}" for r in chosen],
            rule=v.rule,
            verdict=v.verdict,
            figure=figures["top"],
            details="Per seed (the overlaps are (1/C) tr(P_C P_span), random: C/n = "
            f"{C / chosen[0]['n']:.4f}):\n\n" + gap_table(sorted(plain, key=lambda r: r["seed"])),
            tried="The plain cross-entropy and MSE on the small tanh MLP at three sample sizes "
            "(table above: G's top eigenvalues decay smoothly); the regularised settings of "
            "the next rows (wider ReLU MLP, label smoothing, weight decay, minibatch SGD), "
            "which do show the gap.",
        )
    )
    for setting in REGULARISED:
        chosen = [r for r in regs if r["setting"] == setting and r["N"] == full]
        v = judge([outlier_gap(r) for r in chosen], **gap_rule)
        loss, smoothing, decay, steps = REGULARISED[setting]
        what = (
            f"ReLU MLP 64-256-256-10, {SHORT[loss]}"
            + (f" + label smoothing {smoothing:g}" if smoothing else "")
            + f" + weight decay {decay:g}, SGD batch {REG_BATCH}, momentum {REG_MOMENTUM}, "
            f"{steps:,} steps, N = {full}"
        )
        out.append(
            Claim(
                key=f"C outliers of G, {setting}",
                paper="Papyan 2019 (arXiv:1901.08244), 2020",
                claim="After training to zero error, G carries C outliers (C - 1 possible for "
                "the cross-entropy), separated from the rest of the spectrum.",
                paper_value="C (or C − 1) outliers clearly separated from the bulk",
                metric=gap_metric + "; " + what,
                values=[outlier_gap(r) for r in chosen],
                labels=[f"seed {r['seed']}" for r in chosen],
                rule=v.rule,
                verdict=v.verdict,
                figure=figures["regularised"],
                details=origin_note(chosen)
                + "Per seed and N:\n\n"
                + gap_table([r for r in regs if r["setting"] == setting]),
            )
        )
    for setting in REGULARISED:
        chosen = [r for r in regs if r["setting"] == setting and r["N"] == full]
        values = [r["overlap"]["class_means"] for r in chosen]
        v = judge(values, reproduces=Band(0.9, None), partly=Band(0.5, None))
        out.append(
            Claim(
                key=f"the outliers are the class means, {setting}",
                paper="Papyan 2019 (arXiv:1901.08244)",
                claim="G's top-C eigenspace (its C outliers) is spanned by the C class means "
                "μ_c (the term G1 of the hierarchy G0 + G1 + G2 + W).",
                paper_value="top-C eigenspace ≈ span of the class means",
                metric=f"(1/C) tr(P_C P_span(μ_c)), G's top-{C} eigenspace against the span "
                f"of the class means, {setting}, N = {full} (random: C/n = "
                f"{C / chosen[0]['n']:.5f})",
                values=values,
                labels=[f"seed {r['seed']}" for r in chosen],
                rule=v.rule,
                verdict=v.verdict,
                figure=figures["regularised"],
                details="Per seed: the columns 'top-C in span ...' of the tables of the "
                "outlier claims (span of all C² pair means μ_cc' and of the C global means β "
                "for comparison).",
                tried=""
                if v.verdict == "reproduces"
                else "The spans of all C² pair means μ_cc' (G0 + G1 + G2) and of the global "
                "per-logit means β (B), in the same table: where the class means do not span "
                "the top-C space, the pair means do.",
            )
        )
    chosen = [r for r in inits]
    values = [r["g_top"][r["k"] - 1] / r["g_top"][r["k"]] for r in chosen]
    v = judge(values, **gap_rule)
    out.append(
        Claim(
            key="C - 1 (CE) and C (MSE) outliers at initialisation",
            paper="Papyan 2020 (arXiv:2008.11865)",
            claim="G has C - 1 outliers with the cross-entropy and C with the MSE; here at "
            "initialisation, where they come from the global per-logit means β (B).",
            paper_value="C − 1 outliers (CE), C (MSE)",
            metric=f"λ_k/λ_k+1 of G at k = C - 1 (CE) or C (MSE), untrained ReLU MLP 64-256-256-"
            f"10 on {INIT_SAMPLES} digits",
            values=values,
            labels=[f"seed {r['seed']}, {SHORT[r['loss']]}" for r in chosen],
            rule=v.rule,
            verdict=v.verdict,
            figure=figures["top"],
            details=markdown_table(
                ["seed", "loss", "k", "λ_k/λ_k+1", "top-k in span β", "λ_1(G)", "λ_1(B)"],
                [
                    [
                        r["seed"],
                        SHORT[r["loss"]],
                        r["k"],
                        r["g_top"][r["k"] - 1] / r["g_top"][r["k"]],
                        r["overlap"],
                        r["g_top"][0],
                        r["exact"]["global_means"][0],
                    ]
                    for r in chosen
                ],
            ),
        )
    )
    sizes = sorted(SIZES)
    chosen = [r for r in regs if r["setting"] == "MSE+WD"]
    values = [r["gap_c"] for r in chosen]
    v = judge(values, **gap_rule)
    summary_rows = []
    for setting in REGULARISED:
        for n in sizes:
            group = [r for r in regs if r["setting"] == setting and r["N"] == n]
            summary_rows.append(
                [
                    setting,
                    n,
                    float(np.median([outlier_gap(r) for r in group])),
                    float(np.median([r["gap_c"] for r in group])),
                    float(np.median([r["overlap"]["class_means"] for r in group])),
                    float(np.median([r["g_top"][0] for r in group])),
                ]
            )
    for n in sizes:
        group = [r for r in plain if r["N"] == n and r["loss"] == "cross_entropy"]
        summary_rows.append(
            [
                "plain CE (tanh)",
                n,
                float(np.median([outlier_gap(r) for r in group])),
                float(np.median([r["gap_c"] for r in group])),
                float(np.median([r["overlap"]["class_means"] for r in group])),
                float(np.median([r["g_top"][0] for r in group])),
            ]
        )
    out.append(
        Claim(
            key="the outliers at every sample size",
            paper="Papyan 2019 (arXiv:1811.07062)",
            claim="The outliers of G stay separated from the bulk as the training-set size N "
            "varies (the paper documents how outliers and bulk move with N).",
            paper_value="spiked spectrum at every N (qualitative)",
            metric=f"λ_C/λ_C+1 of G, MSE+WD, N = {', '.join(map(str, sizes))}",
            values=values,
            labels=[f"seed {r['seed']}, N = {r['N']}" for r in chosen],
            rule=v.rule,
            verdict=v.verdict,
            figure=figures["sizes"],
            details="Medians over the seeds per setting and N (separation = max(λ_C-1/λ_C, "
            "λ_C/λ_C+1)):\n\n"
            + markdown_table(
                ["setting", "N", "separation", "λ_C/λ_C+1", "top-C in span μ_c", "λ_1(G)"],
                summary_rows,
            ),
        )
    )
    chosen = [r for r in plain if r["N"] == full]
    values = [r["residual_ratio"] for r in chosen]
    v = judge(values, reproduces=Band(None, 0.1), partly=Band(None, 0.3))
    out.append(
        Claim(
            key="H - G small near a minimum",
            paper="Papyan 2019 (arXiv:1811.07062)",
            claim="Near the end of training the Hessian is dominated by G: the residual H - G "
            "is small.",
            paper_value="||H − G|| ≪ ||G|| (qualitative)",
            metric=f"||H - G||_2 / ||G||_2, tanh MLP, plain CE and MSE, N = {full}",
            values=values,
            labels=[f"seed {r['seed']}, {SHORT[r['loss']]}" for r in chosen],
            rule=v.rule,
            verdict=v.verdict,
            figure=figures["sizes"],
            details="Small for the MSE (its residual is weighted by the fitting errors, which "
            "vanish at interpolation); for the cross-entropy both G and H - G scale with the "
            "softmax's remaining error, so the ratio does not vanish as the loss falls.",
        )
    )
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], NAME)
    if args.quick:
        quick_mode()
    seeds = range(args.seeds)
    inits = [analyse_init(loss, seed) for seed in seeds for loss in ("cross_entropy", "mse")]
    plain = []
    for seed in seeds:
        plain += [analyse("cross_entropy", n, seed, dense=seed == 0) for n in SIZES]
        plain.append(analyse("mse", SIZES[-1], seed, dense=seed == 0))
        print(f"plain, seed {seed}: {elapsed(args)}", flush=True)
    regs = []
    for seed in seeds:
        regs += [analyse_regularised(s, n, seed) for s in REGULARISED for n in SIZES]
        print(f"regularised, seed {seed}: {elapsed(args)}", flush=True)
    runs = [r for r in plain if r["seed"] == 0]
    print_tables(runs, [r for r in inits if r["seed"] == 0])
    print_regularised(regs)
    names = plot(args, runs, [r for r in inits if r["seed"] == 0])
    names.append(
        plot_regularised(args, [r for r in regs if r["seed"] == 0 and r["N"] == SIZES[-1]])
    )
    print("\nwrote " + ", ".join(str(args.out / name) for name in names))
    print(f"time {elapsed(args)}")
    paths = {
        "top": args.out / names[2],
        "sizes": args.out / names[1],
        "regularised": args.out / names[3],
    }
    setup = (
        f"Trained, plain: the 64-32-32-10 tanh MLP (n = 3,466), full-batch SGD with momentum "
        f"0.9 for {STEPS} steps on the first N = {', '.join(map(str, SIZES))} digits with the "
        "cross-entropy (lr 0.05) and at the largest N with the MSE on one-hot targets (lr "
        "0.5). Trained, regularised: the ReLU MLP 64-256-256-10 (n = 85,002), SGD with batches "
        f"of {REG_BATCH} (a seeded permutation per epoch), lr {REG_LR}, momentum "
        f"{REG_MOMENTUM}, on the same N: "
        + "; ".join(
            f"{name}: {SHORT[loss]}"
            + (f", label smoothing {ls:g}" if ls else "")
            + f", weight decay {wd:g}, {steps:,} steps"
            for name, (loss, ls, wd, steps) in REGULARISED.items()
        )
        + ". G is that of the plain loss (label smoothing leaves the logit Hessian unchanged; "
        "the decay term is not part of G). Initialisation: the untrained ReLU MLP "
        f"64-256-256-10 on {INIT_SAMPLES} digits. Per run: G's top 2C eigenpairs (ARPACK, "
        "relative residual 1e-6), the exact eigenvalues of Papyan's low-rank terms G0, G1, "
        "G2 and of B (`class_decomposition`), the overlap (1/C) tr(P_C P_span) of G's top-C "
        "eigenspace with the spans of the class means μ_c, the C² pair means μ_cc' and the "
        "global means β, and ||H - G||_2 (plain runs). Seed 0 also gets SLQ densities of every "
        f"term ({PROBES} probes x {ITERS} Lanczos steps; the figures). Seeds vary the "
        "initialisation and the batch order; the digits are the first N of a fixed order."
    )
    write_summary(
        args,
        NAME,
        "Class structure of the Gauss-Newton matrix",
        setup,
        claims(plain, regs, inits, {k: str(v) for k, v in paths.items()}),
        [args.out / names[0], *paths.values()],
    )


if __name__ == "__main__":
    main()
