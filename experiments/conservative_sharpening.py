"""Conservative sharpening (Agarwala & Pennington 2024), scaled down to the digits: SGD at
several batch sizes B and one learning rate.

The paper's finding: SGD sharpens less than GD, the less the smaller the batch ("conservative
sharpening"). Its stochastic edge of stability (the noise kernel norm K) is measured and
tested in experiments/stochastic_edge.py, on one-output models only: K is derived for one
output per sample and is undefined for the one-hot problem below.

Two problems, each with full batch (B = 1000) and B = 64, 16, 4, 1,500 steps, batches drawn
without replacement per epoch (seeded):

- "one-hot": the edge-of-stability problem (64-32-32-10 tanh MLP, MSE on one-hot targets,
  1,000 digits), eta = 2 (2/eta = 1).
- "scalar": the same inputs with one output and target +1 for digits 0-4, -1 for 5-9
  (``zoo.digits_regressor``, ``zoo.digits_sign_data``), eta = 0.1 (2/eta = 20).

Tracked with two Trackers in one loop: "top" and "stability" every 50 steps; the SLQ density
(30 Lanczos steps x 3 probes) every 250 steps, for the density figure.

Run:  .venv/bin/python experiments/conservative_sharpening.py     (about 1 minute, 1 thread)
Writes docs/figures/conservative_sharpening.png and conservative_sharpening_density.png and
prints the numbers table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from curvscope import zoo
from curvscope.losses import mse_loss
from curvscope.plot import plot_density_evolution
from curvscope.tracking import Tracker, load_run

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
NUM_SAMPLES = 1000
STEPS = 1500
TOP_EVERY = 50
DENSITY_EVERY = 250
BATCH_SIZES = (NUM_SAMPLES, 64, 16, 4)
SEED = 0
PROBLEMS = {
    # name: (model factory, data factory, outputs C, learning rate)
    "one-hot": (lambda: zoo.digits_mlp(seed=SEED), lambda: zoo.digits_subset(NUM_SAMPLES), 10, 2.0),
    "scalar": (
        lambda: zoo.digits_regressor(seed=SEED),
        lambda: zoo.digits_sign_data(NUM_SAMPLES),
        1,
        0.1,
    ),
}


def train(
    problem: str,
    batch_size: int,
    lr: float,
    root: Path,
    steps: int = STEPS,
    density_every: int = DENSITY_EVERY,
) -> dict:
    """SGD with two trackers; returns the run folders, the divergence step and wall time."""
    build_model, build_data, _, _ = PROBLEMS[problem]
    data = build_data()
    ((inputs, targets),) = data
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    name = f"{problem}_B{batch_size}_lr{lr:g}_steps{steps}"
    sharp = Tracker(
        root / name / "sharpness",
        mse_loss,
        data,
        schedule=f"every:{TOP_EVERY}",
        measurements=("top", "stability"),
        top_tol=1e-6,
        seed=SEED,
        progress=False,
    )
    spectrum = Tracker(
        root / name / "spectrum",
        mse_loss,
        data,
        schedule=f"every:{density_every}",
        measurements=("density",),
        density_iters=30,
        density_probes=3,
        seed=SEED,
        progress=False,
        extra={"batch_size": batch_size},
    )
    per_epoch = NUM_SAMPLES // batch_size
    diverged = None
    started = time.perf_counter()
    with sharp, spectrum:
        for step in range(steps + 1):
            if sharp.due(step) or spectrum.due(step):
                with torch.no_grad():
                    loss = float(mse_loss(model(inputs), targets))
                if not math.isfinite(loss) or loss > 1e3:
                    diverged = step
                    break
                sharp.step(step, model, optimizer, loss=loss)
                spectrum.step(step, model, optimizer, loss=loss)
            if step == steps:
                break
            epoch, position = divmod(step, per_epoch)
            order = torch.randperm(
                NUM_SAMPLES, generator=torch.Generator().manual_seed(SEED * 10_007 + epoch)
            )
            index = order[position * batch_size : (position + 1) * batch_size]
            optimizer.zero_grad()
            batch_loss = mse_loss(model(inputs[index]), targets[index])
            if not math.isfinite(batch_loss.item()) or batch_loss.item() > 1e3:
                diverged = step
                break
            batch_loss.backward()
            optimizer.step()
    return {
        "problem": problem,
        "B": batch_size,
        "lr": lr,
        "dir": root / name,
        "diverged": diverged,
        "steps": steps,
        "time": time.perf_counter() - started,
    }


def summarise(result: dict) -> dict:
    sharp = load_run(result["dir"] / "sharpness")
    spectrum = load_run(result["dir"] / "spectrum")
    edge = 2.0 / result["lr"]
    values = sharp.scalars["sharpness"]
    late = sharp.steps >= result["steps"] // 2
    if not late.any():
        late = sharp.steps >= sharp.steps[-1]
    return {
        **result,
        "edge": edge,
        "sharp_max": values.max(),
        "sharp_late": values[late].mean() / edge,
        "loss": sharp.scalars["loss"][-1],
        "sharp_run": sharp,
        "spectrum_run": spectrum,
    }


def figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, problem in zip(axes, PROBLEMS, strict=True):
        chosen = [r for r in rows if r["problem"] == problem]
        for i, row in enumerate(chosen):
            label = "full batch" if row["B"] == NUM_SAMPLES else f"B = {row['B']}"
            run = row["sharp_run"]
            ax.plot(run.steps, run.scalars["sharpness"], color=f"C{i}", label=label)
        ax.axhline(chosen[0]["edge"], color="k", linestyle="--", linewidth=1, label="2/η")
        ax.set_title(f"{problem} targets, η = {PROBLEMS[problem][3]:g}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness λ_max(H)")
        ax.grid(True, alpha=0.3, linestyle="--")
        ax.legend(fontsize="x-small")
    fig.suptitle("SGD on 1,000 digits (tanh MLP, MSE): smaller batches sharpen less")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        rows = [
            summarise(train(problem, b, PROBLEMS[problem][3], root))
            for problem in PROBLEMS
            for b in BATCH_SIZES
        ]
        FIGURES.mkdir(parents=True, exist_ok=True)
        figure(rows).savefig(FIGURES / "conservative_sharpening.png", dpi=120)
        chosen = next(r for r in rows if r["problem"] == "one-hot" and r["B"] == 16)
        plot_density_evolution(
            chosen["spectrum_run"],
            FIGURES / "conservative_sharpening_density.png",
            title="Hessian density over training, one-hot targets, SGD B = 16, η = 2",
            dpi=120,
        )

    print(f"conservative sharpening: SGD on {NUM_SAMPLES:,} digits, tanh MLP, MSE, {STEPS} steps")
    print("s/(2/eta): mean over the snapshots at steps >= 750 (every 50 steps)")
    print(
        f"{'problem':>8} {'B':>5} {'eta':>5} {'2/eta':>6} {'max sharp':>10} {'s/(2/eta)':>10}"
        f" {'final loss':>11} {'time s':>7}"
    )
    for r in rows:
        print(
            f"{r['problem']:>8} {r['B']:>5} {r['lr']:>5.3g} {r['edge']:>6.3g} "
            f"{r['sharp_max']:>10.4g} {r['sharp_late']:>10.3f} {r['loss']:>11.2e} "
            f"{r['time']:>7.1f}"
        )
    print(f"total {time.perf_counter() - started:.1f} s with {args.threads} thread(s)")
    print(f"wrote {FIGURES / 'conservative_sharpening.png'}")
    print(f"wrote {FIGURES / 'conservative_sharpening_density.png'}")


if __name__ == "__main__":
    main()
