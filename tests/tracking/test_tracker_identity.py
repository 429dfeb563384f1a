"""A resumed Tracker measures the same Hessian: it refuses another loss, other data or other
parameters, accepts the same data in another order and either spelling of the default dtype,
and still resumes run folders written before identities were stored."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvscope.tracking import Tracker, load_run
from curvscope.tracking.store import MANIFEST, SNAPSHOTS

FAST = {"measurements": ("top", "trace"), "top_k": 2, "trace_probes": 12, "progress": False}


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """20 samples: 4 float64 inputs, 3 class probabilities as targets (CE and MSE both work)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    Y = torch.softmax(torch.randn(20, 3, generator=generator, dtype=torch.float64), dim=1)
    return X, Y


def batches(X: torch.Tensor, Y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[:12], Y[:12]), (X[12:], Y[12:])]


def make_model(seed: int = 0) -> nn.Module:
    """4-6-6-3 tanh MLP: two biases of shape [6] ('0.bias' and '2.bias')."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
        ).double()


def session(run_dir, loss_fn, data, steps, resume=False, model=None, **options):
    """One training session with snapshots at every step; returns the model it trained."""
    model = model if model is not None else make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    with Tracker(run_dir, loss_fn, data, 1, resume=resume, **FAST, **options) as tracker:
        for step in steps:
            optimizer.zero_grad()
            loss = sum(loss_fn(model(x), y) * len(x) for x, y in data) / 20
            tracker.step(step, model, optimizer, loss=loss)
            loss.backward()
            optimizer.step()
    return model


def first_session(tmp_path, loss_fn=None, data=None, **options):
    X, Y = make_data()
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    data = data if data is not None else batches(X, Y)
    model = session(tmp_path / "run", loss_fn, data, [0], **options)
    return tmp_path / "run", model


# --- refused -----------------------------------------------------------------------------------


def test_resume_with_another_loss_is_refused_when_the_tracker_is_made(tmp_path):
    run_dir, model = first_session(tmp_path)
    X, Y = make_data()
    with pytest.raises(ValueError) as error:
        Tracker(run_dir, nn.MSELoss(), batches(X, Y), 1, resume=True, **FAST)
    message = str(error.value)
    assert "loss: stored torch.nn.modules.loss.CrossEntropyLoss(" in message
    assert "now torch.nn.modules.loss.MSELoss(" in message
    assert "same loss_fn, data" in message and "new run folder" in message
    # The refusal released the folder: the right loss resumes it.
    session(run_dir, nn.CrossEntropyLoss(), batches(X, Y), [1], resume=True, model=model)
    assert load_run(run_dir).steps.tolist() == [0, 1]
    run_dir, _ = first_session(tmp_path / "f", loss_fn=nn.functional.mse_loss)
    expected = "loss: stored torch.nn.functional.mse_loss, now torch.nn.functional.l1_loss"
    with pytest.raises(ValueError, match=expected):
        Tracker(run_dir, nn.functional.l1_loss, batches(X, Y), 1, resume=True, **FAST)


def test_resume_with_another_label_smoothing_is_refused(tmp_path):
    run_dir, _ = first_session(tmp_path, loss_fn=nn.CrossEntropyLoss())
    X, Y = make_data()
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing=0\.0.*label_smoothing=0\.1"):
        Tracker(run_dir, smoothed, batches(X, Y), 1, resume=True, **FAST)


@pytest.mark.parametrize("change", ["one target", "one input", "one sample fewer", "pairing"])
def test_resume_with_other_data_is_refused(tmp_path, change):
    run_dir, _ = first_session(tmp_path)
    X, Y = make_data()
    X, Y = X.clone(), Y.clone()
    if change == "one target":
        Y[7] = Y[7].flip(0)  # same values (sum, sum of squares), other classes
        expected = "data: targets weighted_sum"
    elif change == "one input":
        X[13, 2] += 0.5
        expected = "data: inputs sum"
    elif change == "one sample fewer":
        X, Y = X[:19], Y[:19]
        expected = "data: stored 20 samples, now 19"
    else:  # the same inputs and the same targets, the targets given to other inputs
        Y = Y[torch.roll(torch.arange(20), 1)]
        expected = "paired differently"
    with pytest.raises(ValueError, match=expected) as error:
        Tracker(run_dir, nn.CrossEntropyLoss(), batches(X, Y), 1, resume=True, **FAST)
    assert "cannot resume" in str(error.value)


def test_resume_with_another_bias_of_the_same_shape_is_refused(tmp_path):
    model = make_model()
    run_dir, _ = first_session(tmp_path, params=[model[0].bias], model=model)
    X, Y = make_data()
    model = make_model()
    with pytest.raises(ValueError, match=r"params: stored \['0.bias'\], now \['2.bias'\]"):
        session(
            run_dir, nn.CrossEntropyLoss(), batches(X, Y), [1], True, model, params=[model[2].bias]
        )
    assert load_run(run_dir).steps.tolist() == [0]  # refused before anything was measured


def test_a_params_tensor_that_is_not_in_the_model_is_an_error(tmp_path):
    X, Y = make_data()
    stranger = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"params\[0\], a tensor of shape \[6\], is not a param"):
        session(tmp_path / "run", nn.CrossEntropyLoss(), batches(X, Y), [0], params=[stranger])


def test_dtype_none_resumed_as_float32_is_refused(tmp_path):
    run_dir, model = first_session(tmp_path)  # dtype=None: float64 on the CPU
    X, Y = make_data()
    with pytest.raises(ValueError, match="dtype: stored float64, now float32"):
        session(
            run_dir, nn.CrossEntropyLoss(), batches(X, Y), [1], True, model, dtype=torch.float32
        )


# --- accepted ----------------------------------------------------------------------------------


def uninterrupted(tmp_path, steps=4):
    X, Y = make_data()
    session(tmp_path / "whole", nn.CrossEntropyLoss(), batches(X, Y), range(steps))
    return series(tmp_path / "whole")


def series(run_dir):
    run = load_run(run_dir)
    assert run.problems == []
    keep = ("loss", "lambda_max", "lambda_2", "trace", "num_params")
    return run.steps.tolist(), {name: run.scalars[name] for name in keep if name in run.scalars}


def assert_same_series(a, b):
    assert a[0] == b[0] and set(a[1]) == set(b[1])
    for name in a[1]:
        np.testing.assert_allclose(b[1][name], a[1][name], rtol=1e-10, atol=1e-12, err_msg=name)


def interrupted(tmp_path, second_data, steps=4, cut=2, **options):
    """Steps [0, cut) in a first session, then the rest in a resumed one on the same model."""
    X, Y = make_data()
    run_dir = tmp_path / "parts"
    model = session(run_dir, nn.CrossEntropyLoss(), batches(X, Y), range(cut), **options)
    session(run_dir, nn.CrossEntropyLoss(), second_data, range(cut, steps), True, model)
    return run_dir


def test_plain_resume_is_accepted_and_equals_an_uninterrupted_run(tmp_path):
    X, Y = make_data()
    run_dir = interrupted(tmp_path, batches(X, Y))
    assert_same_series(uninterrupted(tmp_path), series(run_dir))
    manifest = json.loads((run_dir / SNAPSHOTS / "step_00000003" / MANIFEST).read_text())
    identity = manifest["identity"]
    assert identity["loss"].startswith("torch.nn.modules.loss.CrossEntropyLoss(")
    assert identity["data"]["samples"] == 20 and identity["dtype"] == "float64"
    assert identity["params"].startswith("all 6 trainable tensors")
    tracker = Tracker(run_dir, nn.CrossEntropyLoss(), batches(X, Y), 1, resume=True, **FAST)
    assert tracker.store.last_identity == identity
    tracker.close()


def test_the_same_data_in_another_order_is_accepted(tmp_path):
    X, Y = make_data()
    permuted = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    reordered = batches(X[permuted], Y[permuted])[::-1]  # other samples per batch, other order
    run_dir = interrupted(tmp_path, reordered)
    assert_same_series(uninterrupted(tmp_path), series(run_dir))

    # A shuffling DataLoader of other batch sizes: accepted, and the data pass leaves the
    # global RNG (which the loader draws its order from) as it was.
    loader = DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=True)
    state = torch.get_rng_state()
    tracker = Tracker(run_dir, nn.CrossEntropyLoss(), loader, 1, resume=True, **FAST)
    model = make_model()
    assert tracker.step(10, model) is not None
    tracker.close()
    assert torch.equal(torch.get_rng_state(), state)


def test_params_by_name_or_by_the_same_named_tensor_are_accepted(tmp_path):
    X, Y = make_data()
    names, tensors = tmp_path / "names", tmp_path / "tensors"
    model = session(names, nn.CrossEntropyLoss(), batches(X, Y), [0], params=["2.bias"])
    session(names, nn.CrossEntropyLoss(), batches(X, Y), [1], True, model, params=["2.bias"])
    for step, resume in ((0, False), (1, True)):  # a new model object in each session
        model = make_model()
        bias = [model[2].bias]
        session(tensors, nn.CrossEntropyLoss(), batches(X, Y), [step], resume, model, params=bias)
    for run_dir in (names, tensors):
        run = load_run(run_dir)
        assert run.steps.tolist() == [0, 1] and run.scalars["num_params"].tolist() == [6, 6]


@pytest.mark.parametrize(("first", "second"), [(None, torch.float64), (torch.float64, None)])
def test_dtype_none_and_its_default_are_the_same_setting(tmp_path, first, second):
    X, Y = make_data()
    run_dir = tmp_path / "run"
    model = session(run_dir, nn.CrossEntropyLoss(), batches(X, Y), range(2), dtype=first)
    session(run_dir, nn.CrossEntropyLoss(), batches(X, Y), range(2, 4), True, model, dtype=second)
    assert_same_series(uninterrupted(tmp_path), series(run_dir))


def test_a_run_folder_without_identities_still_resumes(tmp_path):
    X, Y = make_data()
    run_dir = tmp_path / "old"
    model = session(run_dir, nn.CrossEntropyLoss(), batches(X, Y), range(2))
    for manifest_path in (run_dir / SNAPSHOTS).glob(f"step_*/{MANIFEST}"):
        manifest = json.loads(manifest_path.read_text())  # as written before identities
        del manifest["identity"]
        manifest_path.write_text(json.dumps(manifest))
    tracker = Tracker(run_dir, nn.CrossEntropyLoss(), batches(X, Y), 1, resume=True, **FAST)
    assert tracker.store.last_identity is None
    tracker.close()
    # The other spelling of the default dtype resumes; a dtype None does not resolve to
    # does not.
    with pytest.raises(ValueError, match="dtype=None resolves to float64 here"):
        session(
            run_dir,
            nn.CrossEntropyLoss(),
            batches(X, Y),
            [2],
            True,
            make_model(),
            dtype=torch.float32,
        )
    session(
        run_dir, nn.CrossEntropyLoss(), batches(X, Y), range(2, 4), True, model, dtype=torch.float64
    )
    assert_same_series(uninterrupted(tmp_path), series(run_dir))
    last = json.loads((run_dir / SNAPSHOTS / "step_00000003" / MANIFEST).read_text())
    assert last["identity"]["dtype"] == "float64"  # later snapshots carry an identity


def test_dict_batches_are_fingerprinted_through_unpack_batch(tmp_path):
    X, Y = make_data()
    options = {"operator_options": {"unpack_batch": lambda batch: (batch["x"], batch["y"])}}
    data = [{"x": x, "y": y} for x, y in batches(X, Y)]
    run_dir, model, ce = tmp_path / "run", make_model(), nn.CrossEntropyLoss()
    with Tracker(run_dir, ce, data, 1, **FAST, **options) as tracker:
        tracker.step(0, model)
    tracker = Tracker(run_dir, ce, data[::-1], 1, resume=True, **FAST, **options)
    assert tracker.step(1, model) is not None
    assert tracker.identity["data"]["leaves"]["targets"]["shape"] == [3]
    tracker.close()
    changed = [{"x": batch["x"], "y": batch["y"].flip(1)} for batch in data]
    with pytest.raises(ValueError, match="data: targets weighted_sum"):
        Tracker(run_dir, ce, changed, 1, resume=True, **FAST, **options)


def test_loss_identity_is_stable_text():
    from curvscope.tracking.tracker import _loss_identity

    cross_entropy = nn.functional.cross_entropy
    assert _loss_identity(nn.functional.mse_loss) == "torch.nn.functional.mse_loss"
    assert _loss_identity(functools.partial(cross_entropy, label_smoothing=0.1)) == (
        "functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.1)"
    )
    weighted = _loss_identity(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])))
    assert weighted != _loss_identity(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 4.0])))

    class Scaled:  # no __repr__ of its own: its plain attributes, no memory address
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def __call__(self, outputs, targets):
            return self.scale * nn.functional.mse_loss(outputs, targets)

    assert _loss_identity(Scaled(2.0)) == _loss_identity(Scaled(2.0)) != _loss_identity(Scaled(3))
    assert " at 0x" not in _loss_identity(functools.partial(Scaled(2.0), reduction="sum"))
    assert _loss_identity(lambda o, t: o).endswith(
        "test_loss_identity_is_stable_text.<locals>.<lambda>"
    )
