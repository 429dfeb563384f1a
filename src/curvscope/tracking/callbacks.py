"""Trainer integrations: a PyTorch Lightning ``Callback`` and a Hugging Face ``TrainerCallback``.

Neither package is a dependency of curvscope. Importing this module imports neither; building
a callback imports its trainer package then, and raises an ``ImportError`` that says what to
install when it is missing. Each callback takes the :class:`~curvscope.tracking.Tracker`
arguments (run folder, loss, data, schedule, measurements, ...) and creates the tracker when
training begins, on the global rank 0 process only (other ranks measure nothing).

Step t is the model after t optimizer steps (``trainer.global_step``, ``state.global_step``):
the first snapshot is taken when training starts, before any update (step 0, or the restored
step of a resumed run), if the schedule has it; the others after each optimizer step.

The trainers keep the model in train mode: a model with dropout must be measured without it
(the Hessian of a random loss is random), so the Hessian operator refuses such a model; pass
``eval_mode=True`` (a :class:`~curvscope.tracking.Tracker` option) to measure each snapshot in
eval mode, the model's own modes being restored afterwards.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .tracker import Tracker


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError(
                "LightningTracker needs PyTorch Lightning: pip install lightning "
                "(or pytorch-lightning); Tracker works in any loop without it"
            ) from None
    return Callback


def _huggingface_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(
            "HuggingFaceTracker needs Hugging Face transformers: pip install transformers; "
            "Tracker works in any loop without it"
        ) from None
    return TrainerCallback


class _TrackerOwner:
    """Holds the Tracker arguments and makes the Tracker on the main process when asked."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        loss_fn: Any,
        data: Iterable[Any],
        schedule: Any = "every:100",
        **tracker_options: Any,
    ) -> None:
        super().__init__()
        self._tracker_args = (run_dir, loss_fn, data, schedule)
        self._tracker_options = tracker_options
        self.tracker: Tracker | None = None

    def _start(self, is_main: bool) -> None:
        if is_main and self.tracker is None:
            self.tracker = Tracker(*self._tracker_args, **self._tracker_options)

    def _close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class _LightningHooks(_TrackerOwner):
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(bool(trainer.is_global_zero))
        self._snapshot(trainer, pl_module, {})  # step 0 (or the resumed step): no update yet

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scalars = {}
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
            scalars["loss"] = loss
        self._snapshot(trainer, pl_module, scalars)

    def _snapshot(self, trainer: Any, pl_module: Any, scalars: dict[str, Any]) -> None:
        if self.tracker is None:
            return
        optimizers = getattr(trainer, "optimizers", None) or [None]
        snapshot = self.tracker.step(int(trainer.global_step), pl_module, optimizers[0], **scalars)
        if snapshot is not None and getattr(trainer, "logger", None) is not None:
            trainer.logger.log_metrics(
                {f"curvscope/{key}": value for key, value in snapshot.scalars.items()},
                step=snapshot.step,
            )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()


class _HuggingFaceHooks(_TrackerOwner):
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start(bool(state.is_world_process_zero))
        if self.tracker is not None and kwargs.get("model") is not None:
            # step 0 (or the resumed step): the model before any update of this training
            self.tracker.step(int(state.global_step), kwargs["model"], kwargs.get("optimizer"))

    # The Trainer logs a step's loss after on_step_end (when control.should_log, which its
    # default flow callback sets before ours runs): a snapshot due at a logging step waits
    # for on_log to record that loss; the model does not change in between.
    _pending: tuple[int, Any, Any] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is None or kwargs.get("model") is None:
            return
        self._flush()
        step = int(state.global_step)
        if getattr(control, "should_log", False):
            self._pending = (step, kwargs["model"], kwargs.get("optimizer"))
            return
        self.tracker.step(step, kwargs["model"], kwargs.get("optimizer"))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        pending = self._pending
        if pending is None or pending[0] != int(state.global_step):
            return
        loss = (logs or {}).get("loss")
        self._flush(**({"loss": loss} if loss is not None else {}))

    def _flush(self, **scalars: Any) -> None:
        """Take the snapshot waiting for its step's log (with ``scalars``), if any."""
        pending, self._pending = self._pending, None
        if pending is not None and self.tracker is not None:
            step, model, optimizer = pending
            self.tracker.step(step, model, optimizer, **scalars)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()
        self._close()


@functools.cache
def _combined(hooks: type, base: type, name: str) -> type:
    return type(name, (hooks, base), {"__module__": __name__, "__doc__": hooks.__doc__})


class LightningTracker:
    """A PyTorch Lightning ``Callback`` that runs a :class:`Tracker` after every training batch.

    ``Trainer(callbacks=[LightningTracker("runs/x", loss_fn, data, "log:1:10000:10")])``.
    The step is ``trainer.global_step``: step 0 (the model before any update) is taken in
    ``on_train_start``, later steps after each training batch. The loss comes from the
    ``training_step`` output (none at the first snapshot), the lr from the first optimizer;
    each snapshot's scalars also go to ``trainer.logger`` under "curvscope/...". Arguments
    are those of :class:`Tracker`; ``.tracker`` is the Tracker once training started (on
    global rank 0).

    Raises:
        ImportError: PyTorch Lightning is not installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Build the tracker as a Lightning ``Callback`` (imported only now)."""
        real = _combined(_LightningHooks, _lightning_callback_base(), "LightningTracker")
        return real(*args, **kwargs)


class HuggingFaceTracker:
    """A Hugging Face ``TrainerCallback`` that runs a :class:`Tracker` at every step end.

    ``Trainer(..., callbacks=[HuggingFaceTracker("runs/x", loss_fn, data, "every:100",
    operator_options={"unpack_batch": unpack})])``. The step is ``state.global_step``: step 0
    (the model before any update) is taken in ``on_train_begin``, later steps at each step end.
    The lr comes from the optimizer; the loss is the one the Trainer logs at that step (its
    mean since the previous log: ``logging_steps=1`` gives every step's), so a snapshot at a
    logging step is taken when that log comes, and steps that do not log have no loss.
    Arguments are those of :class:`Tracker`.

    Raises:
        ImportError: transformers is not installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Build the tracker as a ``transformers.TrainerCallback`` (imported only now)."""
        real = _combined(_HuggingFaceHooks, _huggingface_callback_base(), "HuggingFaceTracker")
        return real(*args, **kwargs)
