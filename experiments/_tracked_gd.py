"""The full-batch training loop with a Tracker shared by the training-dynamics experiments
(edge_of_stability.py, momentum_nonnormal.py): the three lines a user adds to a loop."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from curvscope.losses import mse_loss
from curvscope.tracking import Tracker


def track_full_batch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    run_dir: Path,
    steps: int,
    every: int,
    seed: int,
) -> float:
    """Full-batch steps on the one batch of ``data`` (MSE), sharpness and its threshold
    measured every ``every`` steps into ``run_dir``; returns the wall time."""
    ((inputs, targets),) = data
    started = time.perf_counter()
    with Tracker(
        run_dir,
        mse_loss,
        data,
        schedule=f"every:{every}",
        measurements=("top", "stability"),
        top_tol=1e-6,
        seed=seed,
        progress=False,
    ) as tracker:
        for step in range(steps + 1):
            loss = mse_loss(model(inputs), targets)
            tracker.step(step, model, optimizer, loss=loss)
            if step == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started
