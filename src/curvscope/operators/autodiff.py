"""k backward passes through one retained autograd graph, looped or vmapped.

Every operator product ends in "send k cotangents back through a graph built once for the
batch". Two ways: a loop of k backward passes, or one vmapped pass (``is_grads_batched``).
"auto" loops on the CPU, where the loop is faster for models made of a few large kernels (MLPs,
CNNs), except for recurrent models, whose double backward is a long chain of tiny kernels whose
fixed cost one vmapped pass pays once for all k vectors; elsewhere, and for recurrent models,
the vmapped pass is tried first and a missing batching rule falls back to the loop, once and
for all. The measurements behind this choice are in docs/benchmarks.md ("Product method").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

MatmatMode = Literal["auto", "batched", "loop"]


def resolve_mode(mode: str, device: torch.device, recurrent: bool = False) -> str:
    """Check ``mode``; resolve "auto" for ``device``.

    "auto" becomes "loop" on the CPU (unless the model is ``recurrent``) and stays "auto" (vmapped,
    falling back to the loop) elsewhere.
    """
    if mode not in ("auto", "batched", "loop"):
        raise ValueError(f"matmat_mode must be 'auto', 'batched' or 'loop', not {mode!r}")
    return "loop" if mode == "auto" and device.type == "cpu" and not recurrent else mode


class RowBackward:
    """Vector-Jacobian products of k cotangent rows through one graph.

    Args:
        mode: "loop", "batched" or "auto" (batched, falling back to loop for good).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor],
        out: torch.Tensor | None = None,
        retain_graph: bool = True,
    ) -> list[torch.Tensor] | torch.Tensor:
        """sum_o (d outputs[o] / d inputs)^T cotangents[o][j] for each row j.

        Args:
            outputs: Tensors of the graph; those that do not require grad contribute zero.
            inputs: Tensors to differentiate with respect to.
            cotangents: One (k, *outputs[o].shape) tensor per output.
            out: Optional (k, sum of inputs' numel) tensor the results are written into, as
                flat rows in ``inputs`` order (no intermediate copies); returned.
            retain_graph: Keep the graph after the last pass.

        Returns:
            ``out`` when given, else one (k, *inputs[i].shape) tensor per input.
        """
        k = cotangents[0].shape[0]
        live = [o for o, tensor in enumerate(outputs) if tensor.requires_grad]
        if not live:
            return self._zeros(inputs, k, out)
        live_outputs = [outputs[o] for o in live]
        live_cotangents = [cotangents[o] for o in live]
        if k > 1 and self.mode in ("auto", "batched"):
            try:
                parts = self._grad(live_outputs, inputs, live_cotangents, True, retain_graph)
            except RuntimeError:
                if self.mode == "batched":
                    raise
                self.mode = "loop"  # an operation lacks a batching rule: remember it
            else:
                if out is None:
                    return list(parts)
                return torch.cat([p.reshape(k, -1) for p in parts], dim=1, out=out)
        rows = []
        for j in range(k):
            keep = retain_graph or j < k - 1
            parts = self._grad(live_outputs, inputs, [c[j] for c in live_cotangents], False, keep)
            if out is not None:
                torch.cat([p.reshape(-1) for p in parts], out=out[j])
            else:
                rows.append(parts)
        if out is not None:
            return out
        return [torch.stack([row[i] for row in rows]) for i in range(len(inputs))]

    @staticmethod
    def _grad(outputs, inputs, cotangents, batched: bool, retain: bool):
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=cotangents,
            retain_graph=retain,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )

    @staticmethod
    def _zeros(inputs, k, out):
        if out is not None:
            return out.zero_()
        return [torch.zeros(k, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
