"""Shared test set-up.

* ``from cases import ...`` works from every test folder, whatever pytest's import mode.
* ``--doctest-modules`` (pyproject's addopts) collects the doctests of ``src/curvscope``; the
  tests' own files have none, and importing them a second time as doctest modules would clash
  (three files are named conftest.py), so their doctest collectors are dropped here.
* One thread for torch and for numpy's BLAS: the tests work on tiny matrices, where threads
  cost more than they save, and on a busy machine spinning BLAS/OpenMP threads made the dense
  references and eigendecompositions 10-100x slower (measured: a 300 x 300 QR took 1.8 s with
  two threads on a loaded 2-core machine, 0.02 s with one).
* The model cache lives in a temporary folder of the session (below).
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

# The model cache (curvscope.model_cache) of this test session: a fresh folder, removed at
# exit, so that no test writes to ~/.cache or reads what an earlier run left there. The CLI
# tests' child processes inherit it, so the default model is trained once per session.
_MODEL_CACHE = tempfile.mkdtemp(prefix="curvscope-test-cache-")
os.environ["CURVSCOPE_CACHE_DIR"] = _MODEL_CACHE
os.environ.pop("CURVSCOPE_NO_CACHE", None)
atexit.register(shutil.rmtree, _MODEL_CACHE, ignore_errors=True)

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
