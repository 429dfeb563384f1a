"""The trainer callbacks take the first snapshot (step 0, before any update) when training
starts: a real Lightning Trainer (skipped without lightning), and both callbacks' hooks driven
by hand, as their trainers call them, so the step-0 snapshot is checked without either trainer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cases import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvscope.linalg import top_eigenpairs
from curvscope.operators import HessianOperator
from curvscope.tracking import load_run
from curvscope.tracking.callbacks import _HuggingFaceHooks, _LightningHooks

SETTINGS = {"measurements": ("top",), "progress": False}


def lambda_max(model, loss_fn, batches) -> float:
    op = HessianOperator(model, loss_fn, batches)
    return float(top_eigenpairs(op, k=1, tol=1e-10, seed=0).values[0])


def test_lightning_trainer_records_step_0(tmp_path):
    lightning = pytest.importorskip("lightning")
    case = make_case("tanh_mlp_ce")

    class Module(lightning.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return case.loss_fn(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    module = Module(case.model)
    initial = copy.deepcopy(module)
    callback = lightning_tracker(tmp_path / "run", case)
    loader = DataLoader(TensorDataset(case.X, case.Y), batch_size=7, shuffle=False)
    trainer = lightning.Trainer(
        max_steps=3,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    run = load_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1, 2, 3] and run.problems == []
    assert np.isnan(run.scalars["loss"][0]) and np.all(np.isfinite(run.scalars["loss"][1:]))
    np.testing.assert_array_equal(run.scalars["lr"], 0.5)
    # Step 0 is the model before any update; step 3 the trained one.
    before = lambda_max(initial, case.loss_fn, case.batches)
    after = lambda_max(module, case.loss_fn, case.batches)
    assert run.scalars["lambda_max"][0] == pytest.approx(before, rel=1e-6)
    assert run.scalars["lambda_max"][3] == pytest.approx(after, rel=1e-6)
    assert abs(before - after) > 1e-3 * before
    assert callback.tracker is None  # closed at the end of training


def lightning_tracker(run_dir, case):
    from curvscope.tracking import LightningTracker

    return LightningTracker(run_dir, case.loss_fn, case.batches, "every:1", **SETTINGS)


def train_by_hand(model, case, optimizer, after_step):
    """Two SGD steps on the full batch, calling ``after_step(step)`` after each."""
    for step in (1, 2):
        optimizer.zero_grad()
        loss = sum(case.loss_fn(model(x), y) * len(y) for x, y in case.batches) / 21
        loss.backward()
        optimizer.step()
        after_step(step, loss.detach())


def test_lightning_hooks_take_step_0_at_train_start(tmp_path):
    case = make_case("tanh_mlp_ce")
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    initial = lambda_max(model, case.loss_fn, case.batches)
    hooks = _LightningHooks(tmp_path / "run", case.loss_fn, case.batches, "every:1", **SETTINGS)
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=0, optimizers=[optimizer], logger=None
    )
    hooks.on_train_start(trainer, model)

    def after_step(step, loss):
        trainer.global_step = step
        hooks.on_train_batch_end(trainer, model, {"loss": loss}, None, step - 1)

    train_by_hand(model, case, optimizer, after_step)
    hooks.on_train_end(trainer, model)
    run = load_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1, 2]
    assert run.scalars["lambda_max"][0] == pytest.approx(initial, rel=1e-6)


def test_huggingface_hooks_take_step_0_at_train_begin(tmp_path):
    case = make_case("tanh_mlp_ce")
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    initial = lambda_max(model, case.loss_fn, case.batches)
    hooks = _HuggingFaceHooks(tmp_path / "run", case.loss_fn, case.batches, "every:1", **SETTINGS)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, log_history=[])
    hooks.on_train_begin(None, state, None, model=model, optimizer=optimizer)

    def after_step(step, loss):
        state.global_step = step
        state.log_history.append({"step": step, "loss": float(loss)})
        hooks.on_step_end(None, state, None, model=model, optimizer=optimizer)

    train_by_hand(model, case, optimizer, after_step)
    hooks.on_train_end(None, state, None)
    run = load_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1, 2]
    assert run.scalars["lambda_max"][0] == pytest.approx(initial, rel=1e-6)
    np.testing.assert_array_equal(run.scalars["lr"], 0.5)
