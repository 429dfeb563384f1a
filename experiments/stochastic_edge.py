"""Does small-batch SGD settle at the stochastic edge of stability K ~ 1 (Agarwala & Pennington
2024), with lambda_max well below 2/eta?

One-output models that interpolate their N = 256 training samples, mean squared error, SGD
with batches of B = 4 and 64 drawn as B-subsets (a fresh permutation per epoch), several
seeds (initialisation and batch order). Per run the learning rate is chosen so that the noise
kernel norm K (:func:`curvscope.analysis.stochastic_edge.noise_kernel_norm`, eq. (4)) is
0.3 at initialisation. At a few steps every run measures, exactly (no sampling error):

- K (4), from all eigenvalues of the Gauss-Newton matrix G (per-sample Jacobian, N x N Gram),
- ||Q|| (6), the norm of the exact noise kernel: the mean-square edge of SGD on the
  linearised model without the high-dimensional closure (K = 1^T Q 1 / N <= ||Q||),
- eta lambda_max(H) / 2 (curvscope's HessianOperator and top_eigenpairs): 1 at the
  deterministic edge of stability,
- the training loss.

Problems:

- "teacher": x ~ N(0, I_128), targets from a random 128-8-1 tanh network (standardised);
  student 128-64-1 tanh (8,321 parameters). Per-sample NTK norms are nearly equal, the
  high-dimensional setting of the paper, where K ~ ||Q||.
- "digits": the first 256 digits, target +1 for 0-4 and -1 for 5-9, the 64-32-32-1 tanh MLP
  of ``zoo.digits_regressor`` (3,169 parameters): a few samples have NTK norms 5-8x the mean.

Then B = 4 runs started at K = 0.3 to 1.2 (every seed, 1,000 steps): is K = 1 where
small-batch SGD stops converging, and does a run started above it come down to K ~ 1? Per
seed the edge is the midpoint between the largest start that converged below the smallest
start that diverged, and that smallest start.

Run:  .venv/bin/python experiments/stochastic_edge.py [--seeds 5] [--quick] [--threads 1]
(--quick: 1 seed, 300 steps, the scan at K = 0.3, 0.9, 1.2 with 300 steps; well under a
minute). Prints the tables and writes the summary (experiments/_reproduce.py).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _reproduce import Band, Claim, add_arguments, judge, markdown_table, resolve, write_summary
from threadpoolctl import threadpool_limits
from torch import nn

from curvscope import HessianOperator, zoo
from curvscope.analysis.stochastic_edge import (
    critical_learning_rate,
    gauss_newton_eigenvalues,
    noise_factor,
    noise_kernel_norm,
)
from curvscope.linalg import top_eigenpairs

NUM_SAMPLES = 256
BATCH_SIZES = (4, 64)
K_START = 0.3
#: K at step 0 of the B = 4 runs that look for the edge.
SCAN_STARTS = (0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2)
QUICK_SCAN_STARTS = (0.3, 0.9, 1.2)
NAME = "stochastic_edge"


def teacher_problem(seed: int) -> tuple[nn.Module, list]:
    """A fixed teacher data set (seed 100) and a student initialised from ``seed``."""
    generator = torch.Generator().manual_seed(100)
    x = torch.randn(NUM_SAMPLES, 128, generator=generator)
    torch.manual_seed(100)
    teacher = nn.Sequential(nn.Linear(128, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        y = teacher(x)
        y = (y - y.mean()) / y.std()
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))
    return student, [(x, y)]


def digits_problem(seed: int) -> tuple[nn.Module, list]:
    return zoo.digits_regressor(seed=seed), zoo.digits_sign_data(NUM_SAMPLES)


PROBLEMS: dict[str, Callable[[int], tuple[nn.Module, list]]] = {
    "teacher": teacher_problem,
    "digits": digits_problem,
}


def measure(model: nn.Module, data: list, eta: float, batch_size: int) -> dict:
    """K, ||Q||, eta lambda_max(H) / 2 and the loss at the model's current parameters."""
    edge = noise_kernel_norm(model, F.mse_loss, data, eta, batch_size, method="exact")
    op = HessianOperator(model, F.mse_loss, data)
    lambda_max = float(top_eigenpairs(op, k=1, tol=1e-6).values[0])
    ((x, y),) = data
    with torch.no_grad():
        loss = float(F.mse_loss(model(x), y))
    return {
        "K": edge.K,
        "Q": edge.kernel_norm,
        "K_trace": edge.K_trace,
        "sharp": eta * lambda_max / 2,
        "loss": loss,
    }


def run(
    problem: str,
    batch_size: int,
    seed: int,
    steps: int,
    checkpoints: list[int],
    k_start: float = K_START,
) -> dict:
    model, data = PROBLEMS[problem](seed)
    ((x, y),) = data
    eigenvalues, _ = gauss_newton_eigenvalues(model, F.mse_loss, data)
    eta = critical_learning_rate(eigenvalues, batch_size, NUM_SAMPLES, target=k_start)
    gamma = noise_factor(batch_size, NUM_SAMPLES)
    mode = (1 - gamma) * eta * eigenvalues.max() / 2  # >= 1: K = 0.3 is out of reach
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    per_epoch = NUM_SAMPLES // batch_size
    snapshots: dict[int, dict] = {}
    diverged = None
    started = time.perf_counter()
    for step in range(steps + 1):
        if step in checkpoints:
            snapshots[step] = measure(model, data, eta, batch_size)
            if not math.isfinite(snapshots[step]["loss"]) or snapshots[step]["loss"] > 1e3:
                diverged = step
                break
        if step == steps:
            break
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(
            NUM_SAMPLES, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
        )
        index = order[position * batch_size : (position + 1) * batch_size]
        optimizer.zero_grad()
        loss = F.mse_loss(model(x[index]), y[index])
        if not math.isfinite(loss.item()) or loss.item() > 1e3:
            diverged = step
            break
        loss.backward()
        optimizer.step()
    return {
        "problem": problem,
        "B": batch_size,
        "seed": seed,
        "k_start": k_start,
        "eta": eta,
        "mode0": mode,
        "snapshots": snapshots,
        "diverged": diverged,
        "time": time.perf_counter() - started,
    }


def spread(values: list[float]) -> str:
    """median [min, max] over seeds (inf: some eta lambda_a beyond the per-mode bound)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "-"
    return f"{np.median(v):.3g} [{v.min():.3g}, {v.max():.3g}]"


def print_table(head: list[str], rows: list[list]) -> None:
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--out", type=Path, help="figures (none: accepted for the protocol)")
    add_arguments(parser)
    args = resolve(parser.parse_args(), NAME)
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)
    started = time.perf_counter()
    problems = list(PROBLEMS)
    seeds = range(args.seeds)
    steps = 300 if args.quick else 4000
    checkpoints = [0, 100, 300] if args.quick else [0, 100, 300, 1000, 2000, 4000]
    results = [
        run(problem, b, seed, steps, checkpoints)
        for problem in problems
        for b in BATCH_SIZES
        for seed in seeds
    ]
    print(
        f"stochastic edge: SGD with MSE on N = {NUM_SAMPLES}, eta set per run so that K = "
        f"{K_START} at step 0; {len(seeds)} seeds; median [min, max] over seeds"
    )
    head = ["problem", "B", "step", "K (4)", "||Q|| (6)", "eta lmax(H)/2", "loss", "runs"]
    rows = []
    for problem in problems:
        for b in BATCH_SIZES:
            chosen = [r for r in results if r["problem"] == problem and r["B"] == b]
            for step in checkpoints:
                alive = [r["snapshots"][step] for r in chosen if step in r["snapshots"]]
                rows.append(
                    [
                        problem,
                        b,
                        step,
                        spread([s["K"] for s in alive]),
                        spread([s["Q"] for s in alive]),
                        spread([s["sharp"] for s in alive]),
                        spread([s["loss"] for s in alive]),
                        f"{len(alive)}/{len(chosen)}",
                    ]
                )
    print_table(head, rows)
    print()
    print("learning rates (K = 0.3 at step 0) and divergence:")
    for problem in problems:
        for b in BATCH_SIZES:
            chosen = [r for r in results if r["problem"] == problem and r["B"] == b]
            diverged = [f"seed {r['seed']} at {r['diverged']}" for r in chosen if r["diverged"]]
            print(
                f"  {problem} B = {b}: eta {spread([r['eta'] for r in chosen])}, "
                f"(1-gamma) eta lambda_max(G)/2 at step 0 {spread([r['mode0'] for r in chosen])}, "
                f"diverged: {', '.join(diverged) or 'none'}; "
                f"{sum(r['time'] for r in chosen):.0f} s"
            )
    scans = scan(problems, args.quick, seeds)
    print(f"total {time.perf_counter() - started:.0f} s with {args.threads} thread(s)")
    write_summary(
        args,
        NAME,
        "The stochastic edge of stability",
        setup(steps, checkpoints, args.quick),
        claims(results, scans, problems, seeds, steps, args.quick),
        [],
    )


def setup(steps: int, checkpoints: list[int], quick: bool) -> str:
    starts = QUICK_SCAN_STARTS if quick else SCAN_STARTS
    scan_steps = 300 if quick else 1000
    return (
        f"One-output models that interpolate N = {NUM_SAMPLES} samples, MSE, SGD with B = "
        f"{' and '.join(map(str, BATCH_SIZES))} (B-subsets, a fresh permutation per epoch), "
        f"η set per run so that the noise kernel norm K (eq. (4) of "
        f"`curvscope.analysis.stochastic_edge`, exact from the Gauss-Newton Gram matrix) is "
        f"{K_START} at step 0; {steps:,} steps, K, ||Q||, ηλ_max(H)/2 and the loss at steps "
        f"{', '.join(map(str, checkpoints))}. 'teacher': x ~ N(0, I_128), targets from a "
        "random 128-8-1 tanh network, student 128-64-1 tanh (8,321 parameters; per-sample NTK "
        "norms nearly equal, the paper's high-dimensional setting). 'digits': the first 256 "
        "digits, target ±1 (0-4 / 5-9), 64-32-32-1 tanh MLP (3,169 parameters; a few samples "
        "have NTK norms 5-8x the mean). Scan: B = 4 started at K = "
        f"{', '.join(f'{k:g}' for k in starts)}, {scan_steps:,} steps each; a run diverges "
        "when its loss exceeds 1e3 or is not finite. Seeds vary the initialisation and the "
        "batch order (the teacher data are fixed)."
    )


def edge_estimate(runs: list[dict]) -> tuple[float, float, float]:
    """(largest converged start below the first diverged one, first diverged start, their
    midpoint); the midpoint is NaN when no start diverged."""
    starts = sorted(runs, key=lambda r: r["k_start"])
    diverged = [r["k_start"] for r in starts if r["diverged"] is not None]
    if not diverged:
        return (starts[-1]["k_start"], math.nan, math.nan)
    first = diverged[0]
    below = [r["k_start"] for r in starts if r["diverged"] is None and r["k_start"] < first]
    low = below[-1] if below else math.nan
    return (low, first, (low + first) / 2 if below else first)


def claims(results, scans, problems, seeds, steps, quick) -> list[Claim]:
    last = max(max(r["snapshots"]) for r in results)
    teacher = [r for r in results if r["problem"] == "teacher" and r["B"] == 4]
    k_end = [r["snapshots"][last]["K"] if last in r["snapshots"] else math.nan for r in teacher]
    v_k = judge(k_end, reproduces=Band(0.8, 1.2), partly=Band(0.6, 1.4))
    digits_end = [
        r["snapshots"][last]["K"] if last in r["snapshots"] else math.nan
        for r in results
        if r["problem"] == "digits" and r["B"] == 4
    ]

    def median_at(step: int, key: str) -> str:
        values = [r["snapshots"][step][key] for r in teacher if step in r["snapshots"]]
        return f"{np.median(values):.3g}" if values else "n/a"

    k100, k_last = median_at(100, "K"), median_at(last, "K")
    loss100, loss_last = median_at(100, "loss"), median_at(last, "loss")
    ends = {}
    for r in scans:
        if r["problem"] == "teacher" and r["diverged"] is None:
            ends.setdefault(r["k_start"], []).append(r["snapshots"][max(r["snapshots"])]["K"])
    scan_ends = ", ".join(f"{k:g} → {np.median(v):.2f}" for k, v in sorted(ends.items()))
    rows = []
    for r in results:
        snaps = r["snapshots"]
        end = max(snaps)
        rows.append(
            [
                r["problem"],
                r["B"],
                r["seed"],
                r["eta"],
                snaps[end]["K"],
                snaps[end]["Q"],
                snaps[end]["sharp"],
                snaps[end]["loss"],
                end,
                "-" if r["diverged"] is None else r["diverged"],
            ]
        )
    main_table = markdown_table(
        [
            "problem",
            "B",
            "seed",
            "η",
            "K (end)",
            "||Q|| (end)",
            "ηλ_max/2 (end)",
            "loss (end)",
            "end step",
            "diverged at",
        ],
        rows,
    )
    scan_starts = QUICK_SCAN_STARTS if quick else SCAN_STARTS
    out = [
        Claim(
            key="K rises to 1",
            paper="Agarwala & Pennington 2024",
            claim="Small-batch SGD self-stabilises at the stochastic edge: the noise kernel "
            "norm K rises to about 1 and stays there, with λ_max well below 2/η.",
            paper_value="K ≈ 1",
            metric=f"K at step {last}, teacher problem, B = 4, started at K = {K_START}",
            values=k_end,
            labels=[f"seed {r['seed']}" for r in teacher],
            rule=v_k.rule,
            verdict=v_k.verdict,
            details="Every run at its last step:\n\n" + main_table,
            tried=f"Long runs ({steps:,} steps: K goes from {k100} at step 100 to {k_last} "
            f"at step {last} (medians), while the loss falls from {loss100} to {loss_last}: the "
            "model interpolates, the gradient noise vanishes with the residuals and nothing "
            "pushes K further); starting higher (the scan of the next claims; median K at the "
            f"end of the runs that converged, by start: {scan_ends}); the digits problem (K at "
            f"the end {', '.join(f'{k:.2f}' for k in digits_end)}).",
        )
    ]
    for problem in problems:
        per_seed, labels, table = [], [], []
        for seed in seeds:
            runs = [r for r in scans if r["problem"] == problem and r["seed"] == seed]
            low, high, edge = edge_estimate(runs)
            per_seed.append(edge)
            labels.append(f"seed {seed}")
            table.append(
                [
                    seed,
                    " ".join(
                        f"{r['k_start']:g}:"
                        + ("ok" if r["diverged"] is None else f"x{r['diverged']}")
                        for r in sorted(runs, key=lambda r: r["k_start"])
                    ),
                    low,
                    high,
                    edge,
                ]
            )
        v = judge(per_seed, reproduces=Band(0.8, 1.25), partly=Band(0.5, 1.6))
        details = (
            "Per seed: each start K(0) with 'ok' (converged) or 'x<step>' (diverged at that "
            "step); the edge is the midpoint of the bracket:\n\n"
            + markdown_table(["seed", "starts", "converged below", "diverged from", "edge"], table)
        )
        if problem == "teacher":
            out.append(
                Claim(
                    key="K = 1 is the edge (teacher)",
                    paper="Agarwala & Pennington 2024",
                    claim="K = 1 is where small-batch SGD stops converging, far below the "
                    "deterministic edge 2/η (high-dimensional setting, samples alike).",
                    paper_value="edge at K = 1",
                    metric="K(0) at the edge of B = 4 SGD (midpoint of the converged/diverged "
                    f"bracket over starts {', '.join(f'{k:g}' for k in scan_starts)})",
                    values=per_seed,
                    labels=labels,
                    rule=v.rule,
                    verdict=v.verdict,
                    details=details,
                )
            )
        else:
            out.append(
                Claim(
                    key="K = 1 is the edge (digits)",
                    paper="Agarwala & Pennington 2024",
                    claim="The same edge at K = 1 on real data whose samples are not alike "
                    "(outside the paper's high-dimensional assumption).",
                    paper_value="edge at K = 1",
                    metric="K(0) at the edge of B = 4 SGD on the digits (as for the teacher)",
                    values=per_seed,
                    labels=labels,
                    rule=v.rule,
                    verdict=v.verdict,
                    details=details,
                    tried="||Q|| (6), the exact mean-square edge of the linearised model "
                    "without the closure, as the predictor instead: it errs the other way "
                    "(runs started at ||Q|| up to 1.9 converged while others started at 1.1 "
                    "diverged; see docs/dynamics.md). Neither is a sharp predictor where a few "
                    "samples dominate the NTK's diagonal.",
                )
            )
    return out


def scan(problems: list[str], quick: bool, seeds) -> list[dict]:
    """B = 4 started at K from 0.3 to 1.2: is K = 1 where small-batch SGD stops converging,
    and does a run started above it come down to K ~ 1?"""
    starts = QUICK_SCAN_STARTS if quick else SCAN_STARTS
    steps = 300 if quick else 1000
    checkpoints = [0, 100, steps]
    print()
    print(
        f"B = 4 started at larger K: {steps} steps, {len(seeds)} seed(s); median [min, max] "
        "over the runs still alive (rows with none left out); diverged: loss > 1e3 or not "
        "finite"
    )
    head = ["problem", "K at 0", "eta", "step", "K (4)", "||Q|| (6)", "eta lmax(H)/2", "loss"]
    head.append("diverged at")
    rows, every = [], []
    for problem in problems:
        for k_start in starts:
            chosen = [run(problem, 4, seed, steps, checkpoints, k_start) for seed in seeds]
            every += chosen
            for step in checkpoints:
                alive = [r["snapshots"][step] for r in chosen if step in r["snapshots"]]
                if not alive:
                    continue
                rows.append(
                    [
                        problem,
                        k_start,
                        f"{np.median([r['eta'] for r in chosen]):.3g}",
                        step,
                        spread([s["K"] for s in alive]),
                        spread([s["Q"] for s in alive]),
                        spread([s["sharp"] for s in alive]),
                        spread([s["loss"] for s in alive]) + f" ({len(alive)}/{len(chosen)})",
                        ",".join(str(r["diverged"]) for r in chosen if r["diverged"] is not None)
                        if step == 0
                        else "",
                    ]
                )
    print_table(head, rows)
    return every


if __name__ == "__main__":
    main()
