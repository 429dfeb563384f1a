"""How many threads torch gets.

--threads, else the CPUs this process may use, and one thread for small models (sleeping threads
cost them more than they give).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from ..resources import available_cpus

#: Variables that choose the number of threads themselves (torchrun sets OMP_NUM_THREADS=1
#: for several processes per machine): the CLI then leaves torch's choice.
THREAD_COUNT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: Below this many trainable parameters the default is one thread. With idle threads
#: sleeping (curvscope.program), every parallel region pays a wake-up, which small models'
#: tiny operations cannot earn back: digits MLPs, 1,797 samples, Hessian-vector products, 2
#: CPUs, idle machine: n = 3,466 ran 3x faster on 1 thread than on 2, n = 50k 1.3x faster;
#: n = 167k and 301k 1.2x slower (docs/benchmarks.md, Threads).
ONE_THREAD_BELOW = 100_000


def num_threads(args: argparse.Namespace, environ: Any = os.environ) -> int | None:
    """Threads for torch: --threads, else :func:`~curvscope.resources.available_cpus`.

    None (torch's choice) when OMP_NUM_THREADS or MKL_NUM_THREADS is set.
    """
    if getattr(args, "threads", None):
        return int(args.threads)
    if any(environ.get(name) for name in THREAD_COUNT_ENV):
        return None
    return available_cpus()


def fit_threads_to_model(args: argparse.Namespace, model: nn.Module) -> None:
    """:func:`fit_threads` when the threads are the program's default.

    That is ``args.default_threads``: no --threads, no OMP_NUM_THREADS.
    """
    if getattr(args, "default_threads", False):
        fit_threads(model)


def fit_threads(model: nn.Module) -> None:
    """One torch thread for a model below :data:`ONE_THREAD_BELOW` trainable parameters.

    The count depends on the model alone, so the same command always runs the same kernels.
    """
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if size < ONE_THREAD_BELOW:
        torch.set_num_threads(1)
