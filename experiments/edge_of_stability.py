"""Edge of stability (Cohen et al. 2021), scaled down to the digits: full-batch GD on a tanh MLP
with the mean-squared error on one-hot targets, at three learning rates.

Cohen et al. find that under full-batch GD the sharpness lambda_max(H) first rises
(progressive sharpening) and then stops at 2/eta and hovers there while the loss keeps
falling, non-monotonically. Here: a 64-32-32-10 tanh MLP (3,466 parameters, PyTorch's default
init, seeds 0..N-1) on the first 1,000 digits of ``curvscope.zoo.digits_subset``, loss
``F.mse_loss`` on one-hot targets (mean over samples and the 10 outputs, so the eigenvalues
are 1/5 of those of Cohen's sum-over-outputs 1/2 squared error and the learning rates 5x
larger), 2,000 steps at eta = 1.5, 2.0, 2.5. The sharpness is measured every 20 steps by
curvscope's Tracker ("top": Lanczos to a relative residual of 1e-6, "stability": against the
threshold read from the optimizer).

Run:  .venv/bin/python experiments/edge_of_stability.py [--seeds 5] [--quick]
(seed 0 alone: about 30 s on 1 thread). Writes docs/figures/edge_of_stability.png (seed 0),
prints the numbers table and writes the summary (experiments/_reproduce.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _reproduce import Band, Claim, add_arguments, judge, markdown_table, resolve, write_summary
from _tracked_gd import track_full_batch
from matplotlib.figure import Figure

from curvscope import zoo
from curvscope.plot import plot_sharpness
from curvscope.tracking import load_run

NAME = "edge_of_stability"
FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
LEARNING_RATES = (1.5, 2.0, 2.5)
NUM_SAMPLES = 1000
STEPS = 2000
EVERY = 20
#: --quick: one learning rate, 300 steps.
QUICK_RATES, QUICK_STEPS = (2.5,), 300


def train(lr: float, run_dir: Path, steps: int, seed: int) -> float:
    """Full-batch GD at ``lr`` with a snapshot every EVERY steps; returns the wall time."""
    data = zoo.digits_subset(NUM_SAMPLES, seed=0)
    model = zoo.digits_mlp(hidden=(32, 32), activation="tanh", seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return track_full_batch(model, optimizer, data, run_dir, steps, EVERY, seed)


def summary(run, lr: float, steps: int, seed: int) -> dict[str, float]:
    sharp, loss = run.scalars["sharpness"], run.scalars["loss"]
    edge = 2.0 / lr
    late = run.steps >= steps // 2
    reached = np.flatnonzero(sharp >= 0.95 * edge)
    return {
        "seed": seed,
        "lr": lr,
        "2/lr": edge,
        "initial": sharp[0],
        "max": sharp.max(),
        "reach": float(run.steps[reached[0]]) if reached.size else float("nan"),
        "late_mean": sharp[late].mean() / edge,
        "late_min": sharp[late].min() / edge,
        "late_max": sharp[late].max() / edge,
        "loss": loss[-1],
        "loss_drop": loss[-1] / loss[late][0],
        "loss_ups": int(np.sum(np.diff(loss[late]) > 0)),
    }


def claims(rows: list[dict], figure: Path, steps: int) -> list[Claim]:
    labels = [f"seed {r['seed']}, η = {r['lr']:g}" for r in rows]
    hover = [r["late_mean"] for r in rows]
    v_hover = judge(hover, reproduces=Band(0.95, 1.1), partly=Band(0.8, 1.25))
    table = markdown_table(
        [
            "seed",
            "η",
            "2/η",
            "λ_max at 0",
            "max",
            "reaches 0.95·2/η at",
            "late mean",
            "late min",
            "late max",
            "final loss",
            "loss(end)/loss(mid)",
            "loss rises (late)",
        ],
        [
            [
                r["seed"],
                r["lr"],
                r["2/lr"],
                r["initial"],
                r["max"],
                r["reach"],
                r["late_mean"],
                r["late_min"],
                r["late_max"],
                r["loss"],
                r["loss_drop"],
                r["loss_ups"],
            ]
            for r in rows
        ],
    )
    drop = [r["loss_drop"] for r in rows]
    ups = [r["loss_ups"] for r in rows]
    v_drop = judge(drop, reproduces=Band(None, 0.9), partly=Band(None, 1.0))
    return [
        Claim(
            key="sharpness hovers at 2/η",
            paper="Cohen et al. 2021",
            claim="Under full-batch GD the sharpness rises (progressive sharpening) until it "
            "reaches 2/η, then hovers at or just above 2/η.",
            paper_value="λ_max ≈ 2/η ('right at, or just above'), i.e. λ_max·η/2 ≈ 1",
            metric=f"mean of λ_max·η/2 over the snapshots of steps {steps // 2}-{steps}",
            values=hover,
            labels=labels,
            rule=v_hover.rule,
            verdict=v_hover.verdict,
            figure=str(figure),
            details="Per run ('late' = the second half of training; ratios are λ_max/(2/η); "
            "'loss rises' counts snapshot-to-snapshot increases of the training loss in the "
            "second half):\n\n" + table,
        ),
        Claim(
            key="loss keeps falling at the edge",
            paper="Cohen et al. 2021",
            claim="While the sharpness hovers at 2/η the training loss keeps decreasing over "
            "long horizons, though not monotonically.",
            paper_value="qualitative (loss falls non-monotonically)",
            metric=f"training loss at step {steps} / at step {steps // 2}",
            values=drop,
            labels=labels,
            rule=v_drop.rule
            + f"; non-monotone: {sum(u > 0 for u in ups)} of {len(ups)} runs had the loss rise "
            f"between snapshots in the second half ({min(ups)}-{max(ups)} rises)",
            verdict=v_drop.verdict,
            figure=str(figure),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", type=Path, default=FIGURES, help="figures (docs/figures)")
    add_arguments(parser)
    args = resolve(parser.parse_args(), NAME)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rates = QUICK_RATES if args.quick else LEARNING_RATES
    steps = QUICK_STEPS if args.quick else STEPS
    rows, times, first = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        for seed in range(args.seeds):
            for lr in rates:
                run_dir = root / f"gd_seed{seed}_lr{lr:g}"
                times.append(train(lr, run_dir, steps, seed))
                run = load_run(run_dir)
                rows.append(summary(run, lr, steps, seed))
                if seed == 0:
                    first.append(run)

        figure = Figure(figsize=(8, 6.5), layout="constrained")
        axes = figure.subplots(2, 1, sharex=True)
        for i, (run, lr) in enumerate(zip(first, rates, strict=True)):
            plot_sharpness(run, ax=axes, label=f"η = {lr:g}", color=f"C{i}", show_others=False)
        axes[0].set_ylabel("sharpness λ_max(H)")
        figure.suptitle(
            f"Full-batch GD, tanh MLP 64-32-32-10, MSE, {NUM_SAMPLES} digits: sharpness rises "
            "to 2/η and hovers"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "edge_of_stability.png"
        figure.savefig(path, dpi=130)

    print(f"edge of stability: full-batch GD, {NUM_SAMPLES} digits, MSE on one-hot targets,")
    print(f"tanh MLP 64-32-32-10 (3,466 parameters), {steps} steps, sharpness every {EVERY}")
    print(f"'late' = steps >= {steps // 2}; ratios are sharpness / (2/eta)")
    header = (
        f"{'seed':>4} {'eta':>5} {'2/eta':>7} {'initial':>8} {'max':>7} {'reaches':>8} "
        f"{'late mean':>10} {'late min':>9} {'late max':>9} {'final loss':>11} {'loss ups':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['seed']:>4} {row['lr']:>5.2g} {row['2/lr']:>7.4g} {row['initial']:>8.4f} "
            f"{row['max']:>7.4f} {row['reach']:>8.0f} {row['late_mean']:>10.3f} "
            f"{row['late_min']:>9.3f} {row['late_max']:>9.3f} {row['loss']:>11.2e} "
            f"{row['loss_ups']:>9d}"
        )
    print("'reaches': first snapshot step with sharpness >= 0.95 * 2/eta; 'loss ups': late")
    print("snapshots where the loss rose since the previous one (GD at the edge is non-monotone)")
    print(
        f"wall time per run (s): {', '.join(f'{t:.1f}' for t in times)}; total "
        f"{time.perf_counter() - started:.1f} s with {args.threads} thread(s)"
    )
    print(f"wrote {path}")
    setup = (
        f"Full-batch GD on a 64-32-32-10 tanh MLP (3,466 parameters, PyTorch's default "
        f"initialisation from the seed), MSE on one-hot targets (`F.mse_loss`, mean over "
        f"samples and outputs: eigenvalues 1/5 of Cohen et al.'s units, learning rates 5x "
        f"larger), the first {NUM_SAMPLES:,} digits, {steps:,} steps at η = "
        f"{', '.join(f'{lr:g}' for lr in rates)}; λ_max every {EVERY} steps by the Tracker "
        "(Lanczos to a relative residual of 1e-6). Seeds vary the initialisation."
    )
    write_summary(args, NAME, "Edge of stability", setup, claims(rows, path, steps), [path])


if __name__ == "__main__":
    main()
