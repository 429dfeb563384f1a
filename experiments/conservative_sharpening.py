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
(30 Lanczos steps x 3 probes) every 250 steps, for the density figure (seed 0 only).

Seeds (--seeds N, default 5) vary the initialisation and the batch order. The batch sizes are
compared at equal steps (the sharpness averaged over the second half of training) and at equal
training loss: per seed and problem, L* is the largest of the runs' lowest losses (every run
gets there), and each run's sharpness is read at its first snapshot with loss <= L*.

Run:  .venv/bin/python experiments/conservative_sharpening.py [--seeds 5] [--quick]
(about 1 minute per seed, 1 thread). Writes docs/figures/conservative_sharpening.png and
conservative_sharpening_density.png (seed 0), prints the numbers table and writes the summary
(experiments/_reproduce.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _reproduce import Band, Claim, add_arguments, judge, markdown_table, resolve, write_summary
from matplotlib.figure import Figure

from curvscope import zoo
from curvscope.losses import mse_loss
from curvscope.plot import plot_density_evolution
from curvscope.tracking import Tracker, load_run

NAME = "conservative_sharpening"
FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
NUM_SAMPLES = 1000
STEPS = 1500
TOP_EVERY = 50
DENSITY_EVERY = 250
BATCH_SIZES = (NUM_SAMPLES, 64, 16, 4)
#: --quick: 200 steps, the density every 100.
QUICK_STEPS, QUICK_DENSITY_EVERY = 200, 100
PROBLEMS = {
    # name: (model factory of the seed, data factory, outputs C, learning rate)
    "one-hot": (
        lambda seed: zoo.digits_mlp(seed=seed),
        lambda: zoo.digits_subset(NUM_SAMPLES),
        10,
        2.0,
    ),
    "scalar": (
        lambda seed: zoo.digits_regressor(seed=seed),
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
    density_every: int | None = DENSITY_EVERY,
    seed: int = 0,
) -> dict:
    """SGD with two trackers (the density one only when ``density_every``); returns the run
    folders, the divergence step and wall time."""
    build_model, build_data, _, _ = PROBLEMS[problem]
    data = build_data()
    ((inputs, targets),) = data
    model = build_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    name = f"{problem}_B{batch_size}_lr{lr:g}_steps{steps}_seed{seed}"
    sharp = Tracker(
        root / name / "sharpness",
        mse_loss,
        data,
        schedule=f"every:{TOP_EVERY}",
        measurements=("top", "stability"),
        top_tol=1e-6,
        seed=seed,
        progress=False,
    )
    spectrum = (
        Tracker(
            root / name / "spectrum",
            mse_loss,
            data,
            schedule=f"every:{density_every}",
            measurements=("density",),
            density_iters=30,
            density_probes=3,
            seed=seed,
            progress=False,
            extra={"batch_size": batch_size},
        )
        if density_every
        else contextlib.nullcontext()
    )
    per_epoch = NUM_SAMPLES // batch_size
    diverged = None
    started = time.perf_counter()
    with sharp, spectrum:
        for step in range(steps + 1):
            if sharp.due(step) or (density_every and spectrum.due(step)):
                with torch.no_grad():
                    loss = float(mse_loss(model(inputs), targets))
                if not math.isfinite(loss) or loss > 1e3:
                    diverged = step
                    break
                sharp.step(step, model, optimizer, loss=loss)
                if density_every:
                    spectrum.step(step, model, optimizer, loss=loss)
            if step == steps:
                break
            epoch, position = divmod(step, per_epoch)
            order = torch.randperm(
                NUM_SAMPLES, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)
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
        "seed": seed,
        "density": bool(density_every),
        "lr": lr,
        "dir": root / name,
        "diverged": diverged,
        "steps": steps,
        "time": time.perf_counter() - started,
    }


def summarise(result: dict) -> dict:
    sharp = load_run(result["dir"] / "sharpness")
    spectrum = load_run(result["dir"] / "spectrum") if result["density"] else None
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
        "loss_min": float(np.min(sharp.scalars["loss"])),
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


def equal_loss(rows: list[dict]) -> None:
    """Per (seed, problem): L* = the largest of the runs' lowest losses; each row gets the
    sharpness (and step) at its first snapshot with loss <= L*."""
    for key in {(r["seed"], r["problem"]) for r in rows}:
        group = [r for r in rows if (r["seed"], r["problem"]) == key]
        target = max(r["loss_min"] for r in group)
        for r in group:
            run = r["sharp_run"]
            at = int(np.flatnonzero(run.scalars["loss"] <= target)[0])
            r["L*"] = target
            r["step_at_L"] = int(run.steps[at])
            r["sharp_at_L"] = float(run.scalars["sharpness"][at])


def monotone(values: list[float], tolerance: float = 0.05) -> bool:
    """Sharpness non-increasing as the batch shrinks (each within ``tolerance`` of its
    larger-batch neighbour or below)."""
    return all(b <= a * (1 + tolerance) for a, b in itertools.pairwise(values))


def claims(rows: list[dict], seeds: int, steps: int, figure: Path) -> list[Claim]:
    small, full = min(BATCH_SIZES), max(BATCH_SIZES)
    step_ratio, loss_ratio, labels, ordered_steps, ordered_loss, table = [], [], [], [], [], []
    for seed in range(seeds):
        for problem in PROBLEMS:
            group = {r["B"]: r for r in rows if r["seed"] == seed and r["problem"] == problem}
            late = [group[b]["sharp_late"] for b in BATCH_SIZES]
            at_loss = [group[b]["sharp_at_L"] for b in BATCH_SIZES]
            step_ratio.append(group[small]["sharp_late"] / group[full]["sharp_late"])
            loss_ratio.append(group[small]["sharp_at_L"] / group[full]["sharp_at_L"])
            ordered_steps.append(monotone(late))
            ordered_loss.append(monotone(at_loss))
            labels.append(f"seed {seed}, {problem}")
            table.append(
                [
                    seed,
                    problem,
                    " / ".join(f"{v:.3g}" for v in late),
                    "yes" if ordered_steps[-1] else "no",
                    f"{group[full]['L*']:.3g}",
                    " / ".join(
                        f"{group[b]['sharp_at_L'] * group[b]['lr'] / 2:.3g}" for b in BATCH_SIZES
                    ),
                    " / ".join(str(group[b]["step_at_L"]) for b in BATCH_SIZES),
                    "yes" if ordered_loss[-1] else "no",
                ]
            )
    batches = ", ".join("full" if b == NUM_SAMPLES else str(b) for b in BATCH_SIZES)
    details = (
        f"Per seed and problem, for B = {batches} (λ_max·η/2; 'ordered': non-increasing as "
        "B shrinks, within 5%):\n\n"
        + markdown_table(
            [
                "seed",
                "problem",
                f"late mean, steps {steps // 2}-{steps}",
                "ordered",
                "L*",
                "at loss L*",
                "step reaching L*",
                "ordered",
            ],
            table,
        )
    )

    def verdict(values: list[float], ordered: list[bool]):
        v = judge(values, reproduces=Band(None, 0.8), partly=Band(None, 0.95))
        share = sum(ordered) / len(ordered)
        verdict = v.verdict
        if verdict == "reproduces" and share < 0.8:
            verdict = "partly"
        rule = (
            v.rule + "; a 'reproduces' becomes 'partly' unless the sharpness is ordered by batch "
            f"size (non-increasing as B shrinks, 5% tolerance) in at least 80% of the (seed, "
            f"problem) pairs (here {sum(ordered)} of {len(ordered)})"
        )
        return verdict, rule

    common = dict(
        paper="Agarwala & Pennington 2024",
        claim="SGD sharpens less than full-batch GD, and the less the smaller the batch "
        "(conservative sharpening).",
        paper_value="qualitative (no number at this scale): λ_max(SGD) < λ_max(GD), "
        "decreasing with B",
        labels=labels,
        figure=str(figure),
    )
    v_steps, rule_steps = verdict(step_ratio, ordered_steps)
    v_loss, rule_loss = verdict(loss_ratio, ordered_loss)
    return [
        Claim(
            key="conservative sharpening at equal steps",
            metric=f"λ_max(B = {small}) / λ_max(full batch), each the mean over steps "
            f"{steps // 2}-{steps}",
            values=step_ratio,
            rule=rule_steps,
            verdict=v_steps,
            details=details,
            **common,
        ),
        Claim(
            key="conservative sharpening at equal loss",
            metric=f"λ_max(B = {small}) / λ_max(full batch), each at its first snapshot with "
            "training loss <= L* (the loss every run of the seed and problem reaches)",
            values=loss_ratio,
            rule=rule_loss,
            verdict=v_loss,
            details="The per-seed numbers are in the table of the previous claim (columns "
            "'at loss L*'). Smaller batches take more steps to reach a given loss; comparing at "
            "equal loss removes that head start of GD.",
            **common,
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
    steps = QUICK_STEPS if args.quick else STEPS
    density_every = QUICK_DENSITY_EVERY if args.quick else DENSITY_EVERY
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs or Path(tmp)
        rows = [
            summarise(
                train(
                    problem,
                    b,
                    PROBLEMS[problem][3],
                    root,
                    steps=steps,
                    # the density figure: seed 0, one-hot, B = 16
                    density_every=density_every
                    if (seed, problem, b) == (0, "one-hot", 16)
                    else None,
                    seed=seed,
                )
            )
            for seed in range(args.seeds)
            for problem in PROBLEMS
            for b in BATCH_SIZES
        ]
        equal_loss(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [
            args.out / "conservative_sharpening.png",
            args.out / "conservative_sharpening_density.png",
        ]
        figure([r for r in rows if r["seed"] == 0]).savefig(paths[0], dpi=120)
        chosen = next(r for r in rows if (r["seed"], r["problem"], r["B"]) == (0, "one-hot", 16))
        plot_density_evolution(
            chosen["spectrum_run"],
            paths[1],
            title="Hessian density over training, one-hot targets, SGD B = 16, η = 2",
            dpi=120,
        )

    print(f"conservative sharpening: SGD on {NUM_SAMPLES:,} digits, tanh MLP, MSE, {steps} steps")
    print(f"s/(2/eta): mean over the snapshots at steps >= {steps // 2} (every {TOP_EVERY} steps)")
    print("at L*: sharpness / (2/eta) at the first snapshot with loss <= L* (per seed, problem)")
    print(
        f"{'seed':>4} {'problem':>8} {'B':>5} {'eta':>5} {'2/eta':>6} {'max sharp':>10} "
        f"{'s/(2/eta)':>10} {'final loss':>11} {'L*':>9} {'at L*':>7} {'step':>5} {'time s':>7}"
    )
    for r in rows:
        print(
            f"{r['seed']:>4} {r['problem']:>8} {r['B']:>5} {r['lr']:>5.3g} {r['edge']:>6.3g} "
            f"{r['sharp_max']:>10.4g} {r['sharp_late']:>10.3f} {r['loss']:>11.2e} "
            f"{r['L*']:>9.2e} {r['sharp_at_L'] / r['edge']:>7.3f} {r['step_at_L']:>5d} "
            f"{r['time']:>7.1f}"
        )
    print(f"total {time.perf_counter() - started:.1f} s with {args.threads} thread(s)")
    for path in paths:
        print(f"wrote {path}")
    setup = (
        f"SGD at one learning rate and batch sizes B = {', '.join(map(str, BATCH_SIZES))} "
        f"(B = {NUM_SAMPLES:,} is full-batch GD), {steps:,} steps, batches drawn without "
        "replacement per epoch, MSE. Two problems on the first 1,000 digits: 'one-hot' (the "
        "edge-of-stability problem, 64-32-32-10 tanh MLP, η = 2, 2/η = 1) and 'scalar' (one "
        "output, target +1 for digits 0-4 and -1 for 5-9, 64-32-32-1 tanh MLP, η = 0.1, "
        f"2/η = 20). λ_max every {TOP_EVERY} steps (Lanczos, relative residual 1e-6) with the "
        "full-data training loss. Seeds vary the initialisation and the batch order."
    )
    write_summary(
        args,
        NAME,
        "Conservative sharpening",
        setup,
        claims(rows, args.seeds, steps, paths[0]),
        paths,
    )


if __name__ == "__main__":
    main()
