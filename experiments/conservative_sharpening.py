"""Conservative sharpening and the stochastic edge of stability (Agarwala & Pennington 2024),
scaled down to the digits: SGD at several batch sizes B and one learning rate.

The paper's findings: SGD sharpens less than GD, the less the smaller the batch ("conservative
sharpening"), and at small B the sharpness settles below 2/eta because another quantity reaches
its edge first: for least squares with batches of B drawn with replacement the second moment
of the error is stable iff eta lambda_a (1 + 1/B) < 2 for all a and

    K = (eta / B) sum_a lambda_a / (2 - eta lambda_a (1 + 1/B)) < 1,

about eta tr(H) / (2B) when eta lambda is small. The paper predicts SGD at small B trains near
K ~ 1 (the "stochastic edge of stability").

Two problems, each with full batch (B = 1000) and B = 64, 16, 4, 1,500 steps, batches drawn
without replacement per epoch (seeded):

- "one-hot": the edge-of-stability problem (64-32-32-10 tanh MLP, MSE on one-hot targets,
  1,000 digits), eta = 2 (2/eta = 1). Ten outputs per sample: each sample's Gauss-Newton
  term has rank up to 10, outside the rank-one setting of the formula for K.
- "scalar": the same inputs with one output and target +1 for digits 0-4, -1 for 5-9
  (``zoo.digits_regressor``, ``zoo.digits_sign_data``), eta = 0.1 (2/eta = 20): rank-one
  samples, the formula's setting apart from Gaussian features. Also B = 4 at eta = 0.15 and
  0.2, to find where small-batch SGD stops being stable.

Tracked with two Trackers in one loop: "top" and "stability" every 50 steps; the SLQ density
(30 Lanczos steps x 3 probes), K from it ("stochastic_edge") and the NTK trace (Hutchinson,
10 probes) every 250 steps.

Run:  .venv/bin/python experiments/conservative_sharpening.py     (about 3 minutes, 1 thread)
Writes docs/figures/conservative_sharpening.png and conservative_sharpening_density.png and
prints the numbers table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
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
#: The stochastic-edge scan: B = 4 on the scalar problem at growing eta, 1,000 steps, the
#: density every 50 steps.
SCAN_LRS = (0.1, 0.125, 0.15, 0.175, 0.2)
SCAN_BATCH = 4
SCAN_STEPS = 1000
SCAN_DENSITY_EVERY = 50


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
        measurements=("density", "stochastic_edge", "ntk"),
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
    outputs = PROBLEMS[result["problem"]][2]
    edge = 2.0 / result["lr"]
    values = sharp.scalars["sharpness"]
    late = sharp.steps >= result["steps"] // 2
    spec_late = spectrum.steps >= result["steps"] // 2
    if not spec_late.any():  # a run that diverged early: its last snapshots instead
        spec_late = spectrum.steps >= spectrum.steps[-1]
    if not late.any():
        late = sharp.steps >= sharp.steps[-1]
    K = spectrum.scalars["stochastic_K"]
    # K from the NTK trace: tr(H) ~ tr(G) = 2 tr(NTK) / (N C) for the mean-over-entries MSE.
    K_ntk = result["lr"] * spectrum.scalars["ntk_trace"] / (NUM_SAMPLES * outputs * result["B"])
    return {
        **result,
        "edge": edge,
        "sharp_max": values.max(),
        "sharp_late": values[late].mean() / edge,
        "K_late": float(np.median(K[spec_late])),
        "K_max": float(np.max(K)),
        "K_last": float(K[-1]),
        "mode_max": float(np.max(result["lr"] * values * (1 + 1 / result["B"]) / 2)),
        "K_trace_late": float(np.median(spectrum.scalars["stochastic_K_trace"][spec_late])),
        "K_ntk_late": float(np.median(K_ntk[spec_late])),
        "loss": sharp.scalars["loss"][-1],
        "sharp_run": sharp,
        "spectrum_run": spectrum,
    }


def _panel_k(ax, run, color: str, label: str) -> None:
    K = run.scalars["stochastic_K"]
    finite = np.isfinite(K)
    ax.semilogy(run.steps[finite], K[finite], "o-", markersize=3, color=color, label=label)


def figure(rows: list[dict], scan: list[dict]) -> Figure:
    fig = Figure(figsize=(15, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    for column, problem in enumerate(PROBLEMS):
        chosen = [r for r in rows if r["problem"] == problem]
        top, bottom = axes[0, column], axes[1, column]
        for i, row in enumerate(chosen):
            label = "full batch" if row["B"] == NUM_SAMPLES else f"B = {row['B']}"
            run = row["sharp_run"]
            top.plot(run.steps, run.scalars["sharpness"], color=f"C{i}", label=label)
            _panel_k(bottom, row["spectrum_run"], f"C{i}", label)
        top.axhline(chosen[0]["edge"], color="k", linestyle="--", linewidth=1, label="2/η")
        top.set_title(f"{problem} targets, η = {PROBLEMS[problem][3]:g}", fontsize="medium")
    top, bottom = axes[0, 2], axes[1, 2]
    for i, row in enumerate(scan):
        label = f"η = {row['lr']:g}"
        if row["diverged"] is not None:
            label += f" (diverged at step {row['diverged']})"
        run = row["sharp_run"]
        top.plot(run.steps, run.scalars["sharpness"], color=f"C{i}", label=label)
        top.axhline(row["edge"] / (1 + 1 / SCAN_BATCH), color=f"C{i}", linestyle="--", lw=0.8)
        _panel_k(bottom, row["spectrum_run"], f"C{i}", label)
    top.set_title(
        f"scalar targets, B = {SCAN_BATCH}: η scan (dashed: 2/(η(1+1/B)))", fontsize="medium"
    )
    for ax in axes[1]:
        ax.axhline(1.0, color="k", linestyle=":", linewidth=1, label="K = 1")
        ax.set_xlabel("step")
        ax.set_ylabel("stochastic-edge K (SLQ density)")
    for ax in axes[0]:
        ax.set_ylabel("sharpness λ_max(H)")
    for ax in axes.flat:
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
        scan = [
            summarise(train("scalar", SCAN_BATCH, lr, root, SCAN_STEPS, SCAN_DENSITY_EVERY))
            for lr in SCAN_LRS
        ]
        FIGURES.mkdir(parents=True, exist_ok=True)
        figure(rows, scan).savefig(FIGURES / "conservative_sharpening.png", dpi=120)
        chosen = next(r for r in rows if r["problem"] == "one-hot" and r["B"] == 16)
        plot_density_evolution(
            chosen["spectrum_run"],
            FIGURES / "conservative_sharpening_density.png",
            title="Hessian density over training, one-hot targets, SGD B = 16, η = 2",
            dpi=120,
        )

    print(f"conservative sharpening: SGD on {NUM_SAMPLES:,} digits, tanh MLP, MSE, {STEPS} steps")
    print("s/(2/eta): mean over the snapshots at steps >= 750 (every 50 steps); K: median over")
    print("the density snapshots at steps >= 750 (every 250 steps)")
    print(
        f"{'problem':>8} {'B':>5} {'eta':>5} {'2/eta':>6} {'max sharp':>10} {'s/(2/eta)':>10}"
        f" {'K':>7} {'eta trH/2B':>11} {'K ntk':>7} {'final loss':>11} {'time s':>7}"
    )
    for r in rows:
        print(
            f"{r['problem']:>8} {r['B']:>5} {r['lr']:>5.3g} {r['edge']:>6.3g} "
            f"{r['sharp_max']:>10.4g} {r['sharp_late']:>10.3f} {r['K_late']:>7.3g} "
            f"{r['K_trace_late']:>11.3g} {r['K_ntk_late']:>7.3g} {r['loss']:>11.2e} "
            f"{r['time']:>7.1f}"
        )
    print("K: (eta/B) sum lambda/(2 - eta lambda (1+1/B)) over the SLQ density (inf once a Ritz")
    print("value has eta lambda (1+1/B) >= 2); eta trH/2B: its small-eta form from the same")
    print("density; K ntk: eta tr(NTK)/(N C B), the same with tr(H) ~ 2 tr(NTK)/(N C)")
    print()
    print(
        f"stochastic-edge scan: scalar targets, B = {SCAN_BATCH}, {SCAN_STEPS} steps, density "
        f"every {SCAN_DENSITY_EVERY}"
    )
    print(
        f"{'eta':>6} {'max eta lmax (1+1/B)/2':>23} {'K median':>9} {'K max':>7} {'K last':>7}"
        f" {'final loss':>11} {'diverged at':>12} {'time s':>7}"
    )
    for r in scan:
        diverged = "-" if r["diverged"] is None else f"step {r['diverged']}"
        print(
            f"{r['lr']:>6.3g} {r['mode_max']:>23.3f} {r['K_late']:>9.3g} {r['K_max']:>7.3g} "
            f"{r['K_last']:>7.3g} {r['loss']:>11.2e} {diverged:>12} {r['time']:>7.1f}"
        )
    print("K median over steps >= 500 (or the last snapshot of a diverged run); K last: the last")
    print("snapshot before the end or the divergence")
    print(f"total {time.perf_counter() - started:.1f} s with {args.threads} thread(s)")
    print(f"wrote {FIGURES / 'conservative_sharpening.png'}")
    print(f"wrote {FIGURES / 'conservative_sharpening_density.png'}")


if __name__ == "__main__":
    main()
