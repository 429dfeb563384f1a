"""A model evaluated as a pure function of a snapshot of its parameters.

The operators never touch the user's model: they copy the analysed parameters (and every other
parameter and buffer) once, in the operator's dtype, and evaluate the model through
``torch.func.functional_call``. BatchNorm in train mode then updates only throw-away copies of
its running statistics, ``.grad`` of the model's parameters is never written, the model's
train/eval mode is left as the user set it, and the global RNG state is restored after every
pass (:func:`curvscope.rng.preserved_rng`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from ..rng import preserved_rng as preserved_rng  # re-exported: operators import it here
from .batches import Batch, call_model
from .kernels import has_recurrent_layers, has_weight_norm, twice_differentiable_kernels

ParamSpec = Iterable[str | nn.Parameter | torch.Tensor] | None


def default_dtype_for(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """float64 on CPU (exact numerics are cheap there); the model's own dtype elsewhere."""
    return torch.float64 if device.type == "cpu" else model_dtype


def random_modules(model: nn.Module) -> list[str]:
    """Names of submodules whose forward pass is random in their current mode."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _DropoutNd) and module.p > 0:
            found.append(name or type(module).__name__)
        elif isinstance(module, nn.RReLU):
            found.append(name or "RReLU")
    return found


def batchnorm_in_train_mode(model: nn.Module) -> bool:
    """True when some BatchNorm layer normalises with batch statistics."""
    return any(
        isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)
        for m in model.modules()
    )


def _select(model: nn.Module, params: ParamSpec) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError(
                "the model has no trainable parameters (all have requires_grad=False): "
                "pass params=[names] to say which parameters to analyse"
            )
        return names
    by_identity = {id(p): name for name, p in named.items()}
    wanted = set()
    for item in params:
        if isinstance(item, str):
            if item not in named:
                close = [n for n in named if item in n][:5]
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(f"the model has no parameter named {item!r}{hint}")
            wanted.add(item)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_identity:
                raise ValueError("a tensor in params is not a parameter of the model")
            wanted.add(by_identity[id(item)])
        else:
            raise TypeError(f"params holds a {type(item).__name__}: give names or parameters")
    if not wanted:
        raise ValueError("params is empty: name at least one parameter to analyse")
    return [name for name in named if name in wanted]  # model order, not the caller's


class ModelFunction:
    """Loss of a model as a function of a frozen copy of its parameters.

    Args:
        model: Any ``nn.Module``; it is never modified.
        params: Parameters to analyse (names or parameter objects); default: every parameter
            with ``requires_grad=True``. The flat vector follows ``model.named_parameters()``
            order restricted to these.
        dtype: dtype of the copies and of all products; default float64 on CPU, the model's
            dtype on other devices.
        device: Device of the copies; default the model's.

    Attributes:
        names: Analysed parameter names, in flat-vector order.
        shapes: Their shapes.
        num_params: n, the length of the flat vector.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.names = _select(model, params)
        named = dict(model.named_parameters())
        first = named[self.names[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or default_dtype_for(self.device, first.dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        with torch.no_grad():
            self.leaves = {
                name: named[name].detach().to(self.device, self.dtype).clone().requires_grad_(True)
                for name in self.names
            }
            self.constants = {
                name: p.detach().to(self.device, self._cast(p)).clone()
                for name, p in named.items()
                if name not in self.leaves
            }
            self.buffers = {
                name: b.detach().to(self.device, self._cast(b)).clone()
                for name, b in model.named_buffers()
            }
        self.shapes = [self.leaves[name].shape for name in self.names]
        self.numels = [self.leaves[name].numel() for name in self.names]
        self.num_params = sum(self.numels)
        self.recurrent = has_recurrent_layers(model)
        self.weight_norm = has_weight_norm(model)

    def _cast(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if tensor.is_floating_point() else tensor.dtype

    def outputs(self, batch: Batch, leaves: dict[str, torch.Tensor] | None = None) -> object:
        """Model outputs on ``batch`` at the frozen parameters (or at ``leaves``).

        The forward runs with kernels that autograd can differentiate twice, correctly
        (attention on the MATH backend, recurrent layers without cuDNN/oneDNN, weight norm by
        its formula: :mod:`.kernels`); the user's backend settings are restored when it
        returns.
        """
        state = {**self.constants, **(leaves or self.leaves)}
        # Fresh buffer copies per batch: BatchNorm in train mode writes its running stats.
        state.update({name: b.clone() for name, b in self.buffers.items()})

        def model_fn(*args: object, **kwargs: object) -> object:
            return functional_call(self.model, state, args, kwargs)

        with twice_differentiable_kernels(self.recurrent, self.weight_norm):
            return call_model(model_fn, batch.inputs)

    def param_list(self) -> list[torch.Tensor]:
        """The analysed leaf tensors, in flat-vector order."""
        return [self.leaves[name] for name in self.names]

    def flat_params(self) -> torch.Tensor:
        """The analysed parameters as one flat vector of shape (n,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.param_list()])

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows (k, n) -> per-parameter views of shape (k, *param_shape), no copies."""
        k = rows.shape[0]
        chunks = torch.split(rows, self.numels, dim=1)
        return [c.reshape(k, *shape) for c, shape in zip(chunks, self.shapes, strict=True)]

    def join(self, parts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-parameter tensors of one vector -> flat (n,), written into ``out`` if given."""
        flat = [p.reshape(-1) for p in parts]
        return torch.cat(flat, out=out) if out is not None else torch.cat(flat)

    def join_rows(self, parts: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """Per-parameter tensors of shape (k, *param_shape) -> rows (k, n)."""
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector (n,) -> {parameter name: tensor of the parameter's shape}."""
        chunks = torch.split(v, self.numels)
        return {
            name: c.reshape(shape)
            for name, c, shape in zip(self.names, chunks, self.shapes, strict=True)
        }
