"""The training loop of ``curvscope track`` and its resumable state, usable from Python.

* :class:`TrainingSet`: the training data and one optimizer step on it (full batch, or
  minibatches drawn without replacement, seeded by the step alone).
* :func:`build_optimizer`: SGD, heavy ball, Nesterov or Adam by name.
* :func:`save_train_state` / :func:`load_train_state`: model, optimizer and RNG state of a
  step in one file, replaced atomically.
* :class:`TrainingLoop`: trains to a step and takes a :class:`~curvscope.tracking.Tracker`
  snapshot whenever one is due; the state of a step is saved before its snapshot, so every
  committed snapshot can be resumed from, and a resumed run gives the series of an
  uninterrupted one bit for bit (same machine, one thread).

Example::

    training = TrainingSet(batches, unpack=None, batch_size=None, seed=0, device=None)
    optimizer = build_optimizer(model, "sgd", lr=2.0)
    with Tracker("runs/gd", mse_loss, training.batches, "every:25") as tracker:
        with TrainingLoop(model, mse_loss, training, optimizer, tracker, seed=0) as loop:
            loop.run(loop.start_step(resume=False), steps=1000)
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from ..operators.batches import call_model, first_tensor, move
from ..results import _atomic_write
from ..rng import preserved_rng
from .tracker import Snapshot, Tracker

#: Optimizers of :func:`build_optimizer`.
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
#: Learning rate of ``curvscope track`` when none is given: the edge-of-stability regime of
#: its default problem (full-batch GD reaches 2/eta = 1 from an initial sharpness of 0.57).
DEFAULT_LR = {"sgd": 2.0, "momentum": 0.2, "nesterov": 0.2, "adam": 0.01}
#: Momentum beta (beta1 of Adam) when none is given.
DEFAULT_MOMENTUM = 0.9
#: How each optimizer's stability threshold is named (:mod:`curvscope.analysis.stability`).
THRESHOLD_NAMES = {
    "sgd": "2/eta",
    "momentum": "2(1+beta)/eta",
    "nesterov": "2(1+beta)/((1+2beta)eta)",
    "adam": "Adam threshold",
}
#: The training state kept beside the run store (:class:`TrainingLoop`).
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_FORMAT = "curvscope-track-state"


def _num_samples(inputs: Any, targets: Any) -> int:
    for part in (targets, inputs):
        tensor = first_tensor(part)
        if tensor is not None and tensor.ndim > 0:
            return int(tensor.shape[0])
    raise ValueError(
        "cannot count the samples of a batch: its targets (or inputs) must be a tensor whose "
        "first dimension is the batch"
    )


class TrainingSet:
    """The training data: the batches as given, and one tensor pair for SGD.

    Full-batch steps walk the batches (each weighted by its size, so the step is the gradient
    of the mean loss over every sample, as the Hessian is). Minibatch steps draw batch t of
    epoch e = t // (N // B) from a permutation seeded by (seed, e), without replacement and
    dropping the last N mod B samples: the batch of a step depends on nothing but the step,
    so a resumed run draws the same batches as an uninterrupted one.

    Args:
        data: Re-iterable of batches (a list or DataLoader), walked once here.
        unpack: ``batch -> (inputs, targets)`` for batches that are not pairs, or None.
        batch_size: Samples per minibatch step (B); None for full-batch steps.
        seed: Seed of the minibatch permutations.
        device: Device the batches are moved to once; None leaves them where they are.

    Attributes:
        batches: The (inputs, targets) pairs, moved to ``device``.
        sizes: Samples per batch; ``num_samples`` (N) their sum.
    """

    def __init__(
        self,
        data: Any,
        unpack: Callable[[Any], Any] | None,
        batch_size: int | None,
        seed: int,
        device: torch.device | None,
    ) -> None:
        try:
            batches = list(data)
        except TypeError:
            raise TypeError("the training data is not an iterable of batches") from None
        pairs = []
        for batch in batches:
            pair = unpack(batch) if unpack is not None else batch
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(
                    "a training batch is not an (inputs, targets) pair: give an unpack function "
                    "(--unpack-batch MODULE:FN on the command line) returning (inputs, targets)"
                )
            inputs, targets = pair
            if device is not None:
                inputs, targets = move(inputs, device), move(targets, device)
            pairs.append((inputs, targets))
        if not pairs:
            raise ValueError(
                "the training data yielded no batches: pass a non-empty list or DataLoader"
            )
        self.batches = pairs
        self.sizes = [_num_samples(inputs, targets) for inputs, targets in pairs]
        self.num_samples = sum(self.sizes)
        self.seed = seed
        self.batch_size = batch_size
        if batch_size is not None:
            if batch_size > self.num_samples:
                raise ValueError(
                    f"batch size {batch_size} exceeds the {self.num_samples} training samples"
                )
            if not all(isinstance(part, torch.Tensor) for pair in pairs for part in pair):
                raise ValueError(
                    "minibatches need batches of tensors (inputs, targets) to draw from; leave "
                    "the batch size out for full-batch steps"
                )
            self.inputs = torch.cat([inputs for inputs, _ in pairs])
            self.targets = torch.cat([targets for _, targets in pairs])
            self.per_epoch = self.num_samples // batch_size
            self._epoch = -1
            self._order = torch.empty(0, dtype=torch.long)

    @property
    def full_batch(self) -> bool:
        """Whether every step sees the whole training set (no batch size)."""
        return self.batch_size is None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch (inputs (B, ...), targets (B, ...)) of training step ``step``."""
        assert self.batch_size is not None
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        index = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        index = index.to(self.inputs.device)
        return self.inputs[index], self.targets[index]

    def step(
        self, step: int, model: nn.Module, loss_fn: Callable[..., Any], optimizer: Any
    ) -> float:
        """One optimizer step; returns the (mini)batch loss.

        Raises:
            ValueError: When the loss is not finite (the run diverged).
        """
        optimizer.zero_grad(set_to_none=True)
        if self.full_batch:
            total = 0.0
            for (inputs, targets), size in zip(self.batches, self.sizes, strict=True):
                loss = loss_fn(call_model(model, inputs), targets) * (size / self.num_samples)
                loss.backward()
                total += float(loss.detach())
        else:
            inputs, targets = self.batch(step)
            loss = loss_fn(call_model(model, inputs), targets)
            loss.backward()
            total = float(loss.detach())
        if not np.isfinite(total):
            raise ValueError(
                f"the training loss is {total} at step {step}: the run diverged; lower the "
                "learning rate (the run folder keeps every snapshot taken before)"
            )
        optimizer.step()
        return total

    def evaluate(self, model: nn.Module, loss_fn: Callable[..., Any]) -> dict[str, float]:
        """Mean loss over every sample (and accuracy for class targets).

        Buffers and the RNG state (dropout) are restored, so a resumed run that skips an evaluation
        draws the same numbers as an uninterrupted one.
        """
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        loss, correct, classify = 0.0, 0, True
        with torch.no_grad(), preserved_rng():
            for (inputs, targets), size in zip(self.batches, self.sizes, strict=True):
                outputs = call_model(model, inputs)
                loss += float(loss_fn(outputs, targets)) * size
                classify = classify and (
                    isinstance(targets, torch.Tensor)
                    and not targets.is_floating_point()
                    and targets.ndim == 1
                    and outputs.ndim == 2
                )
                if classify:
                    correct += int((outputs.argmax(dim=1) == targets).sum())
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        scalars = {"loss": loss / self.num_samples}
        if classify:
            scalars["accuracy"] = correct / self.num_samples
        return scalars


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = DEFAULT_MOMENTUM
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) of the model's trainable parameters.

    Args:
        model: Its parameters with ``requires_grad`` are optimized.
        name: "sgd" (plain), "momentum" (heavy ball), "nesterov" or "adam".
        lr: Learning rate eta.
        momentum: beta of momentum and nesterov, beta1 of adam (beta2 = 0.999); unused by sgd.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def save_train_state(
    path: Path, step: int, model: nn.Module, optimizer: Any, settings: Mapping[str, Any]
) -> None:
    """Replace ``path`` atomically with the state before training step ``step``.

    The model's and the optimizer's state dicts, torch's CPU RNG state and the training
    ``settings``.
    """
    buffer = io.BytesIO()
    torch.save(
        {
            "format": TRAIN_STATE_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "train": dict(settings),
        },
        buffer,
    )
    _atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def load_train_state(
    path: Path, model: nn.Module, optimizer: Any, settings: Mapping[str, Any]
) -> int:
    """Load the state saved by :func:`save_train_state`; returns its step.

    Into the model, the optimizer and torch's RNG.

    Raises:
        ValueError: When the file cannot be read, is not a training state, or was written
            with other ``settings``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not a training state written by curvscope track")
    if state.get("train") != dict(settings):
        raise ValueError(
            f"cannot resume from {path}: it was written with other training settings "
            f"({state.get('train')}); resume with the same settings"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


class TrainingLoop:
    """Train a model and take the tracker's snapshots when they are due, resumably.

    Used as a context manager: inside it torch's global RNG is seeded with ``seed`` (dropout
    and the like draw the same numbers on every run), and the caller's RNG state comes back
    on exit. The state of step s is saved to ``<run folder>/train_state.pt`` before the
    snapshot of s, so every committed snapshot has its state: a kill after the commit resumes
    after it, a kill before it takes the snapshot again (evaluating and measuring leave the
    model, the optimizer and the RNG state as they find them).

    Args:
        model: The model trained in place.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss of a batch.
        training: The training data (:class:`TrainingSet`).
        optimizer: Optimizer of the model's parameters.
        tracker: The :class:`~curvscope.tracking.Tracker` whose run folder keeps the state.
        seed: Seed of torch's global RNG during training.
        settings: What identifies the training (stored with the state; a resume with other
            settings is refused).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        training: TrainingSet,
        optimizer: Any,
        tracker: Tracker,
        seed: int = 0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.training = training
        self.optimizer = optimizer
        self.tracker = tracker
        self.seed = seed
        self.settings = dict(settings or {})
        self.state_path = tracker.run_dir / TRAIN_STATE
        self._rng: Any = None

    def __enter__(self) -> TrainingLoop:
        self._rng = preserved_rng()
        self._rng.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        rng, self._rng = self._rng, None
        rng.__exit__(kind, error, traceback)

    def start_step(self, resume: bool) -> int:
        """The step training starts from: 0, or with ``resume`` the saved state's step.

        With ``resume`` the state is loaded.

        Raises:
            ValueError: With ``resume``, when the run has snapshots but no training state;
                without it, when the run has snapshots already.
        """
        if resume and self.state_path.exists():
            return load_train_state(self.state_path, self.model, self.optimizer, self.settings)
        if self.tracker.completed_steps:
            raise ValueError(
                f"{self.tracker.run_dir} has snapshots but no {TRAIN_STATE}: only runs written "
                "by curvscope track can be resumed with it"
            )
        return 0

    def run(
        self,
        start: int,
        steps: int,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> int:
        """Train from step ``start`` to ``steps``, snapshotting every due step on the way.

        Args:
            start: The step the model is at (:meth:`start_step`).
            steps: The step to train to.
            on_snapshot: Called with each snapshot taken.
            on_step: Called with the new step after each optimizer step.

        Returns:
            The number of snapshots taken.
        """
        if self._rng is None:
            raise RuntimeError("run a TrainingLoop inside 'with TrainingLoop(...) as loop:'")
        snapshots = 0
        step = start
        while True:
            if self.tracker.due(step):
                self._save(step)
                scalars = self.training.evaluate(self.model, self.loss_fn)
                snapshot = self.tracker.step(step, self.model, self.optimizer, **scalars)
                if snapshot is not None:
                    snapshots += 1
                    if on_snapshot is not None:
                        on_snapshot(snapshot)
            if step >= steps:
                break
            self.training.step(step, self.model, self.loss_fn, self.optimizer)
            step += 1
            if on_step is not None:
                on_step(step)
        if start <= steps:
            self._save(max(start, steps))
        return snapshots

    def _save(self, step: int) -> None:
        save_train_state(self.state_path, step, self.model, self.optimizer, self.settings)
