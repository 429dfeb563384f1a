"""Gradient concentration in the top-C Hessian eigenspace early in training (Gur-Ari, Roberts &
Dyer 2018), scaled down to the digits.

Gur-Ari et al. find that after a short warm-up the gradient lies mostly (~0.9 and more of its
squared norm) in the span of the top-C eigenvectors of the Hessian, C the number of classes,
and that this subspace changes little afterwards.

Here: the 64-32-32-10 tanh MLP of ``curvscope.zoo.digits_mlp`` (n = 3,466, seed 0), trained on
the cross-entropy over all 1,797 digits with SGD in minibatches of 64 (no momentum; a seeded
permutation per epoch) at learning rates 0.1, 0.5, 1, 2, and with full-batch GD at lr 2 for
contrast. Every 10 steps from 0 to 300:

* the top-C eigenpairs (C = 10) of the full-data Hessian (float64, ARPACK to a relative
  residual of 1e-4);
* the share ||P_C g||^2 / ||g||^2 of the full-data gradient g and of the minibatch gradient of
  the step about to be taken (a random direction: C/n = 0.0029);
* the overlap (1/C) tr(P_C(t) P_C(300)) of the top-C eigenspace with the final one.

Run:  .venv/bin/python experiments/gradient_concentration.py     (about 1.5 minutes on 1 thread)
Writes docs/figures/structure_gradient_concentration.png and prints the numbers table.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import elapsed, parse_args, table, top_overlap
from matplotlib.figure import Figure
from torch.nn import functional as F

from curvscope import zoo
from curvscope.analysis import gradient_overlap, subspace_overlap
from curvscope.operators import HessianOperator

C = 10
STEPS, EVERY = 300, 10
BATCH = 64
#: (label, learning rate, minibatch size or None for full-batch GD)
RUNS = (
    ("SGD lr 0.1", 0.1, BATCH),
    ("SGD lr 0.5", 0.5, BATCH),
    ("SGD lr 1", 1.0, BATCH),
    ("SGD lr 2", 2.0, BATCH),
    ("GD lr 2", 2.0, None),
)
#: Windows of checkpoints the table averages over (inclusive step ranges).
WINDOWS = ((0, 0), (10, 50), (60, 150), (160, 300))
SEED = 0


def flat_gradient(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Gradient of the batch's mean loss as one float64 vector (named_parameters order)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).to(torch.float64)
    model.zero_grad(set_to_none=True)
    return flat


def run(lr: float, batch_size: int | None, data: list) -> dict[str, np.ndarray]:
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    model = zoo.digits_mlp(seed=SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(SEED)
    order, position = torch.randperm(len(y), generator=generator), 0
    rows, bases = [], []
    for step in range(STEPS + 1):
        if batch_size is None:
            index = torch.arange(len(y))
        else:
            if position + batch_size > len(y):
                order, position = torch.randperm(len(y), generator=generator), 0
            index = order[position : position + batch_size]
            position += batch_size
        if step % EVERY == 0:
            op = HessianOperator(model, F.cross_entropy, data)
            full, pairs = top_overlap(op, C, tol=1e-4, seed=SEED)
            mini = gradient_overlap(op, flat_gradient(model, x[index], y[index]), eigenpairs=pairs)
            with torch.no_grad():
                loss = float(F.cross_entropy(model(x), y))
            rows.append((step, loss, full.overlap, mini.overlap, lr * pairs.values[0] / 2))
            bases.append(pairs.vectors)
        if step == STEPS:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    steps, loss, full, mini, edge = (np.array(column) for column in zip(*rows, strict=True))
    final = [subspace_overlap(basis, bases[-1]) for basis in bases]
    return {
        "steps": steps,
        "loss": loss,
        "full": full,
        "mini": mini,
        "edge": edge,
        "subspace": np.array(final),
        "n": op.num_params,
    }


def spread(values: np.ndarray) -> str:
    """Mean (min-max) of a window's values."""
    return f"{values.mean():.3f} ({values.min():.2f}-{values.max():.2f})"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data = zoo.digits_data(batch_size=300, seed=SEED)
    results = {label: run(lr, batch, data) for label, lr, batch in RUNS}
    n = results[RUNS[0][0]]["n"]

    head = [
        "run",
        "steps",
        "loss",
        "eta*lmax/2",
        "overlap (full g)",
        "overlap (minibatch g)",
        "subspace vs step 300",
    ]
    rows = []
    for label, _, _ in RUNS:
        r = results[label]
        for first, last in WINDOWS:
            w = (r["steps"] >= first) & (r["steps"] <= last)
            span = f"{first}" if first == last else f"{first}-{last}"
            rows.append(
                [
                    label,
                    span,
                    f"{r['loss'][w].mean():.3f}",
                    f"{r['edge'][w].mean():.2f}",
                    spread(r["full"][w]),
                    spread(r["mini"][w]),
                    f"{r['subspace'][w].mean():.3f}",
                ]
            )
    print(table(head, rows))
    print(
        f"(means over the checkpoints of each window, every {EVERY} steps, with (min-max); "
        f"random baseline C/n = {C / n:.4f}; eta*lmax/2 = 1 is the GD stability edge)"
    )

    figure = Figure(figsize=(14, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for i, (label, _, _) in enumerate(RUNS):
        r = results[label]
        style = dict(color=f"C{i}", linewidth=1.0, marker="o", markersize=2.5, label=label)
        axes[0].plot(r["steps"], r["full"], **style)
        axes[1].plot(r["steps"], r["mini"], **style)
        axes[2].plot(r["steps"], r["subspace"], **style)
    titles = (
        "full-data gradient in the top-C eigenspace",
        "minibatch gradient in the top-C eigenspace",
        "top-C eigenspace overlap with step 300",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.axhline(C / n, color="0.5", linestyle=":", label=f"random C/n = {C / n:.4f}")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3, linestyle="--")
    axes[0].legend(fontsize="small")
    figure.savefig(args.out / "structure_gradient_concentration.png", dpi=150)
    print(f"wrote {args.out / 'structure_gradient_concentration.png'}")
    print(f"time {elapsed(args)}")


if __name__ == "__main__":
    main()
