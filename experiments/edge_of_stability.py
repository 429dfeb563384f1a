"""Edge of stability (Cohen et al. 2021), scaled down to the digits: full-batch GD on a tanh MLP
with the mean-squared error on one-hot targets, at three learning rates.

Cohen et al. find that under full-batch GD the sharpness lambda_max(H) first rises
(progressive sharpening) and then stops at 2/eta and hovers there while the loss keeps
falling, non-monotonically. Here: a 64-32-32-10 tanh MLP (3,466 parameters, PyTorch's default
init, seed 0) on the first 1,000 digits of ``curvscope.zoo.digits_subset``, loss
``F.mse_loss`` on one-hot targets (mean over samples and the 10 outputs, so the eigenvalues
are 1/5 of those of Cohen's sum-over-outputs 1/2 squared error and the learning rates 5x
larger), 2,000 steps at eta = 1.5, 2.0, 2.5. The sharpness is measured every 20 steps by
curvscope's Tracker ("top": Lanczos to a relative residual of 1e-6, "stability": against the
threshold read from the optimizer).

Run:  .venv/bin/python experiments/edge_of_stability.py     (about 1.5 minutes on 1 thread)
Writes docs/figures/edge_of_stability.png and prints the numbers table.
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

from curvscope import zoo
from curvscope.plot import plot_sharpness
from curvscope.tracking import load_run

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
LEARNING_RATES = (1.5, 2.0, 2.5)
NUM_SAMPLES = 1000
STEPS = 2000
EVERY = 20
SEED = 0


def train(lr: float, run_dir: Path) -> float:
    """Full-batch GD at ``lr`` with a snapshot every EVERY steps; returns the wall time."""
    data = zoo.digits_subset(NUM_SAMPLES, seed=SEED)
    model = zoo.digits_mlp(hidden=(32, 32), activation="tanh", seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return track_full_batch(model, optimizer, data, run_dir, STEPS, EVERY, SEED)


def summary(run, lr: float) -> dict[str, float]:
    steps, sharp = run.steps, run.scalars["sharpness"]
    edge = 2.0 / lr
    late = steps >= STEPS // 2
    reached = np.flatnonzero(sharp >= 0.95 * edge)
    return {
        "lr": lr,
        "2/lr": edge,
        "initial": sharp[0],
        "max": sharp.max(),
        "reach": float(steps[reached[0]]) if reached.size else float("nan"),
        "late_mean": sharp[late].mean() / edge,
        "late_min": sharp[late].min() / edge,
        "late_max": sharp[late].max() / edge,
        "loss": run.scalars["loss"][-1],
        "loss_ups": int(np.sum(np.diff(run.scalars["loss"]) > 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        runs, rows, times = [], [], []
        for lr in LEARNING_RATES:
            run_dir = root / f"gd_lr{lr:g}"
            times.append(train(lr, run_dir))
            runs.append(load_run(run_dir))
            rows.append(summary(runs[-1], lr))

        figure = Figure(figsize=(8, 6.5), layout="constrained")
        axes = figure.subplots(2, 1, sharex=True)
        for i, (run, lr) in enumerate(zip(runs, LEARNING_RATES, strict=True)):
            plot_sharpness(run, ax=axes, label=f"η = {lr:g}", color=f"C{i}", show_others=False)
        axes[0].set_ylabel("sharpness λ_max(H)")
        figure.suptitle(
            f"Full-batch GD, tanh MLP 64-32-32-10, MSE, {NUM_SAMPLES} digits: sharpness rises "
            "to 2/η and hovers"
        )
        FIGURES.mkdir(parents=True, exist_ok=True)
        figure.savefig(FIGURES / "edge_of_stability.png", dpi=130)

    print(f"edge of stability: full-batch GD, {NUM_SAMPLES} digits, MSE on one-hot targets,")
    print(f"tanh MLP 64-32-32-10 (3,466 parameters), {STEPS} steps, sharpness every {EVERY}")
    print("'late' = steps >= 1000; ratios are sharpness / (2/eta)")
    header = (
        f"{'eta':>5} {'2/eta':>7} {'initial':>8} {'max':>7} {'reaches':>8} "
        f"{'late mean':>10} {'late min':>9} {'late max':>9} {'final loss':>11} {'loss ups':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['lr']:>5.2g} {row['2/lr']:>7.4g} {row['initial']:>8.4f} {row['max']:>7.4f} "
            f"{row['reach']:>8.0f} {row['late_mean']:>10.3f} {row['late_min']:>9.3f} "
            f"{row['late_max']:>9.3f} {row['loss']:>11.2e} {row['loss_ups']:>9d}"
        )
    print("'reaches': first snapshot step with sharpness >= 0.95 * 2/eta; 'loss ups': snapshots")
    print("where the loss rose since the previous one (GD at the edge is non-monotone)")
    print(
        "wall time per run (s): "
        + ", ".join(f"eta {lr:g}: {t:.1f}" for lr, t in zip(LEARNING_RATES, times, strict=True))
        + f"; total {time.perf_counter() - started:.1f} s with {args.threads} thread(s)"
    )
    print(f"wrote {FIGURES / 'edge_of_stability.png'}")


if __name__ == "__main__":
    main()
