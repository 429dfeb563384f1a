"""Curvature snapshots during training: a schedule, a tracker, and a crash-safe run store.

``Tracker(run_dir, loss_fn, data, schedule).step(step, model, optimizer, loss=loss)`` in any
training loop; ``load_run(run_dir)`` reads the series back. Optional trainer integrations live
in :mod:`curvscope.tracking.callbacks` (PyTorch Lightning, Hugging Face), imported lazily.
"""

from .callbacks import HuggingFaceTracker, LightningTracker
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
    "Tracker",
    "load_run",
    "register_measurement",
]
