"""Trace of the neural tangent kernel Theta = J J^T over a data source.

J stacks d output_{i,o} / d theta for every sample i and output o (shape (N*C, n)), so
tr(Theta) = sum_{i,o} ||d output_{i,o} / d theta||^2 = ||J||_F^2 = tr(J^T J). For MSE with
mean reduction over N*C entries the Gauss-Newton matrix is (2 / (N C)) J^T J, which links
the NTK trace to the Hessian's trace near a minimum (Agarwala & Pennington 2024).

Jacobians are taken per batch (as the operators do), so with BatchNorm in train mode J_i is
the derivative of sample i's output *within its batch*.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..distributed import all_reduce_sum_, is_distributed
from ..rng import preserved_rng
from .autodiff import RowBackward, resolve_mode
from .batches import Batch, DataSource, UnpackBatch
from .functional import ModelFunction, ParamSpec, random_modules


@dataclass(frozen=True)
class NTKTrace:
    """tr(J J^T) over the data source.

    Attributes:
        value: tr(Theta) summed over all N samples and C outputs.
        std_error: Standard error of ``value`` (0 for the exact method).
        num_samples: N.
        num_outputs: C (outputs per sample).
        meta: method, probes, seed, wall time.
    """

    value: float
    std_error: float
    num_samples: int
    num_outputs: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def per_sample(self) -> float:
        """tr(Theta) / N: the mean squared Jacobian norm of one sample."""
        return self.value / self.num_samples


def ntk_trace(
    model: nn.Module,
    data: Iterable[Any],
    method: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 10,
    seed: int = 0,
    params: ParamSpec = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    unpack_batch: UnpackBatch | None = None,
    chunk: int = 256,
) -> NTKTrace:
    """Trace of the empirical NTK of ``model`` over every sample of ``data``.

    Args:
        model: Any ``nn.Module`` returning one output tensor of shape (B, ...); never modified.
        data: Re-iterable of batches, as for :class:`HessianOperator`.
        method: "exact" (one backward pass per output entry, in chunks of ``chunk``, for
            small models and data) or "hutchinson" (``num_probes`` Rademacher cotangents u
            per batch: ||J^T u||^2 is unbiased for tr(J J^T)).
        num_probes: Probes per batch for "hutchinson".
        seed: Seed of the probes.
        params: Parameters to analyse (names or parameters); default all trainable, as for
            :class:`HessianOperator`.
        dtype: Product dtype; default float64 on CPU, the model's dtype on GPU.
        device: Where the work runs; default the model's device.
        unpack_batch: ``batch -> (inputs, targets)`` for batches that are not pairs.
        chunk: Output entries per backward block for "exact".

    Returns:
        :class:`NTKTrace`.
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', not {method!r}")
    if method == "hutchinson" and num_probes < 2:
        raise ValueError("hutchinson needs num_probes >= 2 for a standard error")
    random = random_modules(model)
    if random:
        raise ValueError(f"modules {random} are random in train mode: call model.eval() first")
    started = time.perf_counter()
    function = ModelFunction(model, params=params, dtype=dtype, device=device)
    source = DataSource(data, function.device, function.dtype, unpack_batch)
    backward = RowBackward(resolve_mode("auto", function.device))
    leaves = function.param_list()
    generator = torch.Generator().manual_seed(seed)
    total, variance, num_samples, num_outputs = 0.0, 0.0, 0, 0
    with preserved_rng(), torch.enable_grad():
        for batch in source:
            outputs = _outputs(function, batch)
            entries = outputs[0].numel()
            num_outputs = entries
            num_samples += batch.size
            flat = outputs.reshape(-1)
            if method == "exact":
                eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
                for start in range(0, flat.numel(), chunk):
                    rows = backward(
                        [flat],
                        leaves,
                        [eye[start : start + chunk]],
                        out=torch.empty(
                            min(chunk, flat.numel() - start),
                            function.num_params,
                            dtype=flat.dtype,
                            device=flat.device,
                        ),
                    )
                    total += float((rows * rows).sum())
            else:
                signs = torch.randint(0, 2, (num_probes, flat.numel()), generator=generator)
                probes = (2.0 * signs - 1.0).to(flat)
                rows = backward(
                    [flat],
                    leaves,
                    [probes],
                    out=torch.empty(
                        num_probes, function.num_params, dtype=flat.dtype, device=flat.device
                    ),
                )
                samples = (rows * rows).sum(dim=1).cpu().numpy()
                total += float(samples.mean())
                variance += float(samples.var(ddof=1)) / num_probes
    if is_distributed():  # each rank walked its shard: sum the sums over ranks
        sums = torch.tensor(  # on the device: NCCL reduces only CUDA tensors
            [total, variance, num_samples, num_outputs, float(num_samples > 0)],
            dtype=torch.float64,
            device=function.device,
        )
        all_reduce_sum_(sums)
        total, variance, num_samples = float(sums[0]), float(sums[1]), int(sums[2])
        # Every rank with batches saw the same output width; ranks with none saw 0.
        num_outputs = round(float(sums[3]) / max(1.0, float(sums[4])))
    if num_samples == 0:
        raise ValueError(
            "data yielded no batches: pass a non-empty DataLoader or list of (inputs, targets)"
        )
    meta = {
        "method": method,
        "num_probes": num_probes if method == "hutchinson" else None,
        "seed": seed,
        "dtype": str(function.dtype).replace("torch.", ""),
        "wall_time_s": time.perf_counter() - started,
    }
    return NTKTrace(total, float(np.sqrt(variance)), num_samples, num_outputs, meta)


def _outputs(function: ModelFunction, batch: Batch) -> torch.Tensor:
    outputs = function.outputs(batch)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(outputs).__name__}: the NTK needs one output tensor"
        )
    if outputs.ndim == 0 or outputs.shape[0] != batch.size:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} on batch {batch.index} do not start with "
            f"the batch size {batch.size}"
        )
    return outputs
