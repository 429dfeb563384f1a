"""The one guard of the global random state.

Code inside it may draw random numbers (dropout, a shuffling DataLoader, a seeded training run)
without changing what the caller draws next.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global RNG states on exit.

    torch's CPU generator, every CUDA generator (when CUDA is initialised) and numpy's legacy global
    generator.
    """
    cpu_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    numpy_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
