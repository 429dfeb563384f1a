"""The training loop of ``curvscope track`` used from Python, without the command line:
minibatch draws, optimizers by name, the saved training state, and a loop that resumes to
the series of an uninterrupted run bit for bit.

The model is tiny (a 3-4-2 tanh MLP, 26 parameters, on 24 samples), so the file runs in a
couple of seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvscope.losses import mse_loss
from curvscope.tracking import Tracker, load_run
from curvscope.tracking.training import (
    OPTIMIZERS,
    TRAIN_STATE,
    TrainingLoop,
    TrainingSet,
    build_optimizer,
    load_train_state,
    save_train_state,
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g)
    y = torch.randint(0, 2, (24,), generator=g)
    return [(x[:10], y[:10]), (x[10:], y[10:])]  # uneven batches


def test_minibatches_cover_each_epoch_without_replacement():
    x = torch.arange(10.0)[:, None]
    data = [(x[:6], torch.arange(6)), (x[6:], torch.arange(6, 10))]
    training = TrainingSet(data, None, batch_size=3, seed=0, device=None)
    assert training.num_samples == 10 and training.per_epoch == 3
    for epoch in range(2):
        drawn = torch.cat([training.batch(3 * epoch + i)[1] for i in range(3)])
        assert len(set(drawn.tolist())) == 9  # one sample per epoch left out (drop last)
    again = TrainingSet(data, None, batch_size=3, seed=0, device=None)
    assert torch.equal(again.batch(4)[1], training.batch(4)[1])  # depends on the step only


def test_a_full_batch_step_descends_the_mean_loss_over_every_sample():
    net, reference = model(), model()
    training = TrainingSet(batches(), None, batch_size=None, seed=0, device=None)
    loss = training.step(0, net, mse_loss, build_optimizer(net, "sgd", lr=0.5))
    x = torch.cat([inputs for inputs, _ in batches()])
    y = torch.cat([targets for _, targets in batches()])
    full = mse_loss(reference(x), y)
    full.backward()
    assert loss == pytest.approx(float(full), rel=1e-6)  # batches weighted by their size
    for stepped, param in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(stepped, param.detach() - 0.5 * param.grad)
    scores = training.evaluate(net, mse_loss)
    assert set(scores) == {"loss", "accuracy"} and 0 <= scores["accuracy"] <= 1


def test_optimizers_by_name():
    net = model()
    kinds = {name: build_optimizer(net, name, lr=0.1, momentum=0.5) for name in OPTIMIZERS}
    assert isinstance(kinds["sgd"], torch.optim.SGD) and kinds["sgd"].defaults["momentum"] == 0
    assert kinds["momentum"].defaults["momentum"] == 0.5
    assert kinds["nesterov"].defaults["nesterov"] is True
    assert kinds["adam"].defaults["betas"] == (0.5, 0.999)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        build_optimizer(net, "rmsprop", lr=0.1)


def test_bad_training_data_and_divergence_are_value_errors():
    with pytest.raises(ValueError, match=r"not an \(inputs, targets\) pair"):
        TrainingSet([torch.zeros(3)], None, batch_size=None, seed=0, device=None)
    with pytest.raises(ValueError, match="no batches"):
        TrainingSet([], None, batch_size=None, seed=0, device=None)
    with pytest.raises(ValueError, match="exceeds the 24 training samples"):
        TrainingSet(batches(), None, batch_size=25, seed=0, device=None)
    net = model()
    training = TrainingSet(batches(), None, batch_size=None, seed=0, device=None)
    with pytest.raises(ValueError, match="diverged"):
        optimizer = build_optimizer(net, "sgd", lr=0.1)
        training.step(0, net, lambda outputs, targets: outputs.sum() * np.inf, optimizer)


def test_train_state_round_trip_refuses_other_settings(tmp_path):
    net = model()
    optimizer = build_optimizer(net, "momentum", lr=0.1)
    training = TrainingSet(batches(), None, batch_size=8, seed=0, device=None)
    training.step(0, net, mse_loss, optimizer)
    settings = {"optimizer": "momentum", "lr": 0.1}
    path = tmp_path / TRAIN_STATE
    save_train_state(path, 1, net, optimizer, settings)
    fresh = model()
    fresh_optimizer = build_optimizer(fresh, "momentum", lr=0.1)
    assert load_train_state(path, fresh, fresh_optimizer, settings) == 1
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="other training settings"):
        load_train_state(path, fresh, fresh_optimizer, {**settings, "lr": 0.2})
    (tmp_path / "junk.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="cannot read"):
        load_train_state(tmp_path / "junk.pt", fresh, fresh_optimizer, settings)


def train(run_dir, steps: int, resume: bool) -> tuple[int, int]:
    """Heavy ball on minibatches of 8 to ``steps``, "top" every 2 steps; (start, snapshots)."""
    net = model()
    training = TrainingSet(batches(), None, batch_size=8, seed=3, device=None)
    optimizer = build_optimizer(net, "momentum", lr=0.3)
    settings = {"optimizer": "momentum", "lr": 0.3, "batch_size": 8}
    tracker = Tracker(
        run_dir, mse_loss, training.batches, "every:2", ("top",), progress=False, resume=resume
    )
    rng = torch.get_rng_state()
    with tracker, TrainingLoop(net, mse_loss, training, optimizer, tracker, 3, settings) as loop:
        start = loop.start_step(resume)
        snapshots = loop.run(start, steps)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    return start, snapshots


def test_a_resumed_loop_gives_the_uninterrupted_series(tmp_path):
    assert train(tmp_path / "whole", 6, resume=False) == (0, 4)
    assert train(tmp_path / "split", 3, resume=False) == (0, 2)
    assert train(tmp_path / "split", 6, resume=True) == (3, 2)
    whole, split = load_run(tmp_path / "whole"), load_run(tmp_path / "split")
    assert whole.steps.tolist() == split.steps.tolist() == [0, 2, 4, 6]
    for name in ("loss", "accuracy", "lambda_max"):
        np.testing.assert_array_equal(whole.scalars[name], split.scalars[name])
    # Snapshots without the training state: not a run of this loop.
    (tmp_path / "split" / TRAIN_STATE).unlink()
    with pytest.raises(ValueError, match=r"has snapshots but no train_state\.pt"):
        train(tmp_path / "split", 8, resume=True)


def test_run_outside_the_context_is_refused(tmp_path):
    net = model()
    training = TrainingSet(batches(), None, batch_size=None, seed=0, device=None)
    tracker = Tracker(tmp_path / "run", mse_loss, training.batches, "every:2", ("top",))
    loop = TrainingLoop(net, mse_loss, training, build_optimizer(net, "sgd", 0.1), tracker)
    with tracker, pytest.raises(RuntimeError, match="inside 'with TrainingLoop"):
        loop.run(0, 2)
