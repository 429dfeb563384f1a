"""Curvature snapshots during training: a schedule, a tracker, and a crash-safe run store.

``Tracker(run_dir, loss_fn, data, schedule).step(step, model, optimizer, loss=loss)`` in any
training loop; ``load_run(run_dir)`` reads the series back. Optional trainer integrations live
in :mod:`curvscope.tracking.callbacks` (PyTorch Lightning, Hugging Face), and loggers that send
each snapshot to TensorBoard or Weights & Biases in :mod:`curvscope.tracking.loggers`
(``Tracker(..., loggers=[TensorBoardLogger("tb/run")])``); their packages are imported lazily.
"""

from .callbacks import HuggingFaceTracker, LightningTracker
from .loggers import SnapshotLogger, TensorBoardLogger, WandbLogger
from .measurements import MEASUREMENTS, MeasurementSkipped, register_measurement
from .schedule import Schedule
from .store import Problem, Run, RunProblem, RunStore, load_run
from .tracker import Snapshot, Tracker

__all__ = [
    "MEASUREMENTS",
    "HuggingFaceTracker",
    "LightningTracker",
    "MeasurementSkipped",
    "Problem",
    "Run",
    "RunProblem",
    "RunStore",
    "Schedule",
    "Snapshot",
    "SnapshotLogger",
    "TensorBoardLogger",
    "Tracker",
    "WandbLogger",
    "load_run",
    "register_measurement",
]
