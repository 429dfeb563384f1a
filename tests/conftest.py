"""Shared test set-up.

* ``from cases import ...`` works from every test folder, whatever pytest's import mode.
* ``--doctest-modules`` (pyproject's addopts) collects the doctests of ``src/curvscope``; the
  tests' own files have none, and importing them a second time as doctest modules would clash
  (three files are named conftest.py), so their doctest collectors are dropped here.
* One thread for torch and for numpy's BLAS: the tests work on tiny matrices, where threads
  cost more than they save, and on a busy machine spinning BLAS/OpenMP threads made the dense
  references and eigendecompositions 10-100x slower (measured: a 300 x 300 QR took 1.8 s with
  two threads on a loaded 2-core machine, 0.02 s with one).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

torch.set_num_threads(1)
try:  # numpy may already be loaded (and its BLAS threads started) by a plugin
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
    pass
else:
    threadpool_limits(limits=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_collect_file(file_path, parent):
    """Keep the test collectors of a file under tests/, not its doctest collector."""
    outcome = yield
    collectors = outcome.get_result() or []
    outcome.force_result([c for c in collectors if type(c).__name__ != "DoctestModule"])
