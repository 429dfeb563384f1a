"""Heavy-ball momentum at its edge of stability, and the non-normal transient growth of its
linearised update before the spectral radius crosses 1.

Part 1 (training): full-batch heavy ball, torch.optim.SGD(momentum=0.9), on the
edge-of-stability problem (64-32-32-10 tanh MLP, MSE on one-hot targets, 1,000 digits) at
eta = 3 and 4. Its threshold on lambda_max(H) is 2 (1 + beta) / eta (Cohen et al. 2021 report
the sharpness hovering there, as 2/eta for GD). Tracked every 20 steps ("top", "stability").

Part 2 (frozen Hessian): at the end of the eta = 3 run, H is frozen and the heavy-ball update
e_{t+1} = (1 + beta) e_t - beta e_{t-1} - eta H e_t is linearised as
T = [[(1 + beta) I - eta H, -beta I], [I, 0]] (curvscope.operators.update.UpdateOperator, which
applies T with Hessian-vector products). On the span of the top-4 Hessian eigenvectors, stacked
for (e_t, e_{t-1}), T is exactly invariant; curvscope.analysis.stability.nonnormal_report gives
there the spectral radius rho, the eigenvector condition number kappa(V), the Kreiss lower
bound sup_k ||T^k|| >= (rho_eps - 1)/eps from the eps-pseudospectrum, and the measured
max_{k <= 2000} ||T^k||_2. The learning rate is scanned so that x = eta lambda_max runs toward
and past the threshold 2 (1 + beta) = 3.8; each 2 x 2 block is defective at
x = (1 + sqrt(beta))^2 = 3.797, just below it. For comparison, GD's T = I - eta H is symmetric:
||T^k|| = rho^k, no transient growth.

Run:  .venv/bin/python experiments/momentum_nonnormal.py     (about 1.5 minutes, 1 thread)
Writes docs/figures/momentum_nonnormal.png and prints the numbers tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _tracked_gd import track_full_batch
from matplotlib.figure import Figure

from curvscope import HessianOperator, top_eigenpairs, zoo
from curvscope.analysis.stability import heavy_ball_analysis, nonnormal_report
from curvscope.losses import mse_loss
from curvscope.operators.update import OptimizerConfig, UpdateOperator
from curvscope.tracking import load_run

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
BETA = 0.9
LEARNING_RATES = (3.0, 4.0)
NUM_SAMPLES = 1000
STEPS = 1500
EVERY = 20
SEED = 0
K_TOP = 4
POWERS = 2000
#: x / (2 (1 + beta)) for the scan, x = eta lambda_max.
RATIOS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9993, 0.9995, 0.9999, 1.0, 1.0005, 1.002, 1.01)
SHOWN = (0.5, 0.95, 0.9993, 0.9999, 1.0005)


def train(lr: float, run_dir: Path) -> tuple[torch.nn.Module, float]:
    data = zoo.digits_subset(NUM_SAMPLES, seed=SEED)
    model = zoo.digits_mlp(seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=BETA)
    return model, track_full_batch(model, optimizer, data, run_dir, STEPS, EVERY, SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs, models, times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        for lr in LEARNING_RATES:
            model, seconds = train(lr, root / f"heavy_ball_lr{lr:g}")
            runs.append(load_run(root / f"heavy_ball_lr{lr:g}"))
            models.append(model)
            times.append(seconds)

    # Part 2: the frozen Hessian at the end of the first run.
    scan_started = time.perf_counter()
    hessian = HessianOperator(models[0], mse_loss, zoo.digits_subset(NUM_SAMPLES, seed=SEED))
    pairs = top_eigenpairs(hessian, k=K_TOP, tol=1e-10, seed=SEED)
    lam = np.asarray(pairs.values)
    basis = np.asarray(pairs.vectors)
    edge = 2 * (1 + BETA)
    reports, closed = [], []
    for ratio in RATIOS:
        eta = ratio * edge / lam[0]
        config = OptimizerConfig("heavy_ball", lr=eta, momentum=BETA)
        report = nonnormal_report(
            UpdateOperator(hessian, config), k_top=K_TOP, basis=basis, num_steps=POWERS
        )
        reports.append(report)
        closed.append(heavy_ball_analysis(eta, BETA, lam[:1]))
    # GD for comparison: T = I - eta H is symmetric (normal).
    gd_rows = []
    for ratio in (0.5, 0.99, 1.002):
        eta = ratio * 2 / lam[0]
        config = OptimizerConfig("gd", lr=eta)
        report = nonnormal_report(
            UpdateOperator(hessian, config), k_top=K_TOP, basis=basis, num_steps=POWERS
        )
        gd_rows.append((ratio, report.bounds))
    scan_seconds = time.perf_counter() - scan_started

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_train, ax_powers, ax_scan = fig.subplots(1, 3)
    for i, (run, lr) in enumerate(zip(runs, LEARNING_RATES, strict=True)):
        ax_train.plot(run.steps, run.scalars["sharpness"], color=f"C{i}", label=f"η = {lr:g}")
        ax_train.plot(
            run.steps,
            run.scalars["stability_threshold"],
            color=f"C{i}",
            linestyle="--",
            label=f"2(1+β)/η = {edge / lr:.3g}",
        )
    ax_train.set_title(f"heavy ball β = {BETA}, full batch: λ_max(H)", fontsize="medium")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel("sharpness")
    for i, ratio in enumerate(SHOWN):
        bounds = reports[RATIOS.index(ratio)].bounds
        ax_powers.semilogy(
            bounds.power_norms,
            color=f"C{i}",
            label=f"η λ_max = {ratio * edge:.5g} (ρ = {bounds.rho:.4f})",
        )
    ax_powers.axhline(1.0, color="k", linewidth=0.8)
    ax_powers.set_ylim(1e-2, 1e3)
    ax_powers.set_xlim(0, 400)
    ax_powers.set_xlabel("k")
    ax_powers.set_ylabel("||T^k||_2 on the top-4 eigenspace")
    ax_powers.set_title("powers of the frozen heavy-ball update", fontsize="medium")
    x = np.array(RATIOS) * edge - edge  # distance of eta lambda_max from the threshold
    rho = np.array([r.bounds.rho for r in reports])
    kappa = np.array([r.bounds.kappa for r in reports])
    kreiss = np.array([r.bounds.kreiss_lower for r in reports])
    measured = np.array([r.bounds.measured_max for r in reports])
    ax_scan.semilogy(x, measured, "o-", label="max_k ||T^k|| (measured, k ≤ 2000)")
    ax_scan.semilogy(x, kappa, "s--", label="κ(V)")
    ax_scan.semilogy(x, np.maximum(kreiss, 1e-3), "^:", label="Kreiss lower bound")
    ax_scan.semilogy(x, rho, "k.-", label="ρ(T)")
    ax_scan.axvline(0.0, color="C3", linewidth=0.8, label="threshold 2(1+β)")
    ax_scan.axvline((1 + np.sqrt(BETA)) ** 2 - edge, color="C7", linewidth=0.8, label="(1+√β)²")
    ax_scan.set_xscale("symlog", linthresh=1e-3, linscale=0.5)
    ax_scan.set_ylim(0.5, 1e4)
    ax_scan.set_xlabel("η λ_max − 2(1+β)   (symlog)")
    ax_scan.set_title("transient growth before ρ crosses 1", fontsize="medium")
    for ax in (ax_train, ax_powers, ax_scan):
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="x-small")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / "momentum_nonnormal.png", dpi=120)

    print(f"heavy ball (beta = {BETA}), full batch, {NUM_SAMPLES} digits, tanh MLP 64-32-32-10,")
    print(f"MSE on one-hot targets, {STEPS} steps, sharpness every {EVERY}; late = steps >= 750")
    print(
        f"{'eta':>4} {'2(1+b)/eta':>11} {'initial':>8} {'max':>7} {'late mean/thr':>14} "
        f"{'late min/thr':>13} {'late max/thr':>13} {'final loss':>11} {'time s':>7}"
    )
    for run, lr, seconds in zip(runs, LEARNING_RATES, times, strict=True):
        sharp = run.scalars["sharpness"]
        threshold = edge / lr
        late = run.steps >= STEPS // 2
        print(
            f"{lr:>4g} {threshold:>11.4g} {sharp[0]:>8.4f} {sharp.max():>7.4f} "
            f"{sharp[late].mean() / threshold:>14.3f} {sharp[late].min() / threshold:>13.3f} "
            f"{sharp[late].max() / threshold:>13.3f} {run.scalars['loss'][-1]:>11.2e} "
            f"{seconds:>7.1f}"
        )
    print()
    print(
        f"frozen Hessian at step {STEPS} of the eta = {LEARNING_RATES[0]:g} run: top-{K_TOP} "
        f"eigenvalues {', '.join(f'{v:.5g}' for v in lam)}"
    )
    print(
        f"heavy-ball T restricted to the {2 * K_TOP}-dim top eigenspace; eta = x / lambda_max; "
        f"threshold x = {edge:g}, defective at x = {(1 + np.sqrt(BETA)) ** 2:.5f}"
    )
    print(
        f"{'x = eta lmax':>13} {'rho(T)':>9} {'kappa(V)':>10} {'Kreiss >=':>10} "
        f"{'max ||T^k||':>12} {'at k':>5} {'kappa 2x2':>10} {'invariance':>11}"
    )
    for ratio, report, block in zip(RATIOS, reports, closed, strict=True):
        b = report.bounds
        print(
            f"{ratio * edge:>13.5g} {b.rho:>9.5f} {b.kappa:>10.4g} {b.kreiss_lower:>10.4g} "
            f"{b.measured_max:>12.4g} {b.measured_argmax:>5d} {block.kappa[0]:>10.4g} "
            f"{report.invariance_residual:>11.1e}"
        )
    print(
        f"max ||T^k|| over k <= {POWERS}; 'kappa 2x2': closed form of the lambda_max block "
        "(heavy_ball_analysis); invariance: ||TQ - Q Q^T T Q|| / ||Q^T T Q||"
    )
    print("GD (T = I - eta H, symmetric) on the same eigenspace:")
    print(f"{'x = eta lmax':>13} {'rho(T)':>9} {'kappa(V)':>10} {'max ||T^k||':>12}")
    for ratio, b in gd_rows:
        print(f"{ratio * 2:>13.5g} {b.rho:>9.5f} {b.kappa:>10.4g} {b.measured_max:>12.4g}")
    print(
        f"time: training {sum(times):.1f} s, scan {scan_seconds:.1f} s, total "
        f"{time.perf_counter() - started:.1f} s with {args.threads} thread(s)"
    )
    print(f"wrote {FIGURES / 'momentum_nonnormal.png'}")


if __name__ == "__main__":
    main()
