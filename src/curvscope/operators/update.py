"""Linearised optimizer updates on a quadratic: the operator T with e_{t+1} = T e_t.

Near a minimum theta* the loss is 1/2 e^T H e with e = theta - theta*, and the gradient is
H e. Every optimizer handled here then follows a linear two-step recursion

    e_{t+1} = (a I - g P H_c) e_t - (b I - h P H_c) e_{t-1},      H_c = H + wd_c I,

with P a fixed diagonal preconditioner (I for SGD) and wd_c the coupled (L2) weight decay.
On the stacked state (e_t, e_{t-1}) of length 2n this is

    T = [[a I - g P H_c, -(b I - h P H_c)], [I, 0]]                (order 2),

and without momentum simply T = a I - g P H_c on e_t (order 1). The coefficients:

=============  =====================  ==================  ======================  ========
method         a                      g                   b                       h
=============  =====================  ==================  ======================  ========
gd             1 - eta wd_d           eta                 (order 1)
heavy_ball     1 + beta               eta (1 - damp)      beta                    0
nesterov       1 + beta               eta (1 + beta)      beta                    eta beta
adam           1 + beta1 - eta wd_d   eta (1 - beta1)     beta1 (1 - eta wd_d)    0
=============  =====================  ==================  ======================  ========

- Heavy-ball (``torch.optim.SGD(momentum=beta, dampening=damp)``): b_{t+1} = beta b_t +
  (1 - damp) g_t, theta_{t+1} = theta_t - eta b_{t+1}; eliminating b gives
  e_{t+1} = e_t + beta (e_t - e_{t-1}) - eta (1 - damp) H e_t.
- Nesterov, Sutskever form: theta_{t+1} = y_t - eta H y_t with the look-ahead
  y_t = theta_t + beta (theta_t - theta_{t-1}), so
  T = [[(1 + beta)(I - eta H), -beta (I - eta H)], [I, 0]]. ``torch.optim.SGD(nesterov=True)``
  stores the look-ahead point as its parameter; that sequence is a fixed linear combination of
  Sutskever's iterates and so obeys the same recursion from its second step on.
- Adam with the preconditioner frozen: m_{t+1} = beta1 m_t + (1 - beta1) g_t,
  theta_{t+1} = (1 - eta wd_d) theta_t - eta P m_{t+1} with P = M = diag(1 / (sqrt(v_hat) +
  eps)). The bias correction 1 / (1 - beta1^t) of m is taken as 1 (its limit; the
  steady state that Cohen et al. 2022 analyse too). Eliminating m gives the table's row: Adam
  is heavy-ball with momentum beta1, learning rate eta (1 - beta1) and curvature M H_c.
  ``torch.optim.Adam`` couples weight decay into the gradient (wd_c); ``AdamW`` (or
  ``Adam(decoupled_weight_decay=True)``) decays the parameter (wd_d).
- SGD's weight decay is coupled (wd_c); dampening is ignored without momentum, as in torch.

Reduced analysis: if P H_c w = mu w, the plane spanned by (w, 0) and (0, w) is invariant under
T and T acts on it as the 2 x 2 block [[a - g mu, -(b - h mu)], [1, 0]] (``*_block`` below).
With P = I the w are orthonormal Hessian eigenvectors and T is block diagonal in an orthonormal
basis; with P H != H P they are not orthogonal and T is non-normal beyond its blocks.

The stacked T is not symmetric, so :class:`UpdateOperator` does not subclass
:class:`~curvscope.operators.base.CurvatureOperator`; it offers the same ``shape``, ``dtype``,
``device``, ``matvec``, ``matmat`` and a ``dense()`` for small n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..linalg.interface import LinearOperatorLike, as_operator
from ..linalg.scipy_interop import TorchAsScipy, to_scipy

Method = Literal["gd", "heavy_ball", "nesterov", "adam"]
METHODS: tuple[str, ...] = ("gd", "heavy_ball", "nesterov", "adam")


@dataclass(frozen=True, eq=False)
class OptimizerConfig:
    """Hyper-parameters that fix the linearised update, as read from an optimizer.

    Compared by identity (``v_hat`` is an array).

    Attributes:
        method: "gd" (SGD without momentum), "heavy_ball", "nesterov" or "adam" (Adam/AdamW).
        lr: Learning rate eta.
        momentum: beta for SGD, beta1 for Adam; 0 for "gd".
        dampening: SGD's dampening (heavy-ball uses eta (1 - dampening)); 0 otherwise.
        weight_decay: The optimizer's weight decay lambda_wd.
        decoupled_weight_decay: True for AdamW (theta <- (1 - eta lambda_wd) theta); False for
            SGD and Adam, where lambda_wd theta is added to the gradient.
        beta2: Adam's beta2; None for SGD.
        eps: Adam's eps; None for SGD.
        v_hat: Adam's bias-corrected second moment exp_avg_sq / (1 - beta2^step) (or
            max_exp_avg_sq with amsgrad), flat over the analysed parameters, float64, shape
            (n,); None for SGD or before Adam's first step.
        step: Adam's step count at reading time; None for SGD.
        optimizer: Class name of the optimizer read (or "manual").
    """

    method: Method
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    beta2: float | None = None
    eps: float | None = None
    v_hat: np.ndarray | None = None
    step: int | None = None
    optimizer: str = "manual"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum / beta1 must lie in [0, 1), got {self.momentum}")
        if self.method == "gd" and self.momentum != 0:
            raise ValueError("method 'gd' has no momentum: use 'heavy_ball' or 'nesterov'")
        if self.method == "nesterov" and self.dampening != 0:
            raise ValueError("Nesterov momentum requires zero dampening (as in torch.optim.SGD)")
        if self.decoupled_weight_decay and self.method != "adam":
            raise ValueError("decoupled weight decay is modelled for Adam (AdamW) only")

    @property
    def coupled_weight_decay(self) -> float:
        """wd_c: the weight decay that enters as lambda_wd theta in the gradient."""
        return 0.0 if self.decoupled_weight_decay else self.weight_decay

    @property
    def decoupled_decay(self) -> float:
        """wd_d: the weight decay applied to the parameter directly (AdamW)."""
        return self.weight_decay if self.decoupled_weight_decay else 0.0

    @property
    def order(self) -> int:
        """1 for the one-step recursion (gd), 2 for the stacked (e_t, e_{t-1}) state."""
        return 1 if self.method == "gd" else 2

    def coefficients(self) -> tuple[float, float, float, float]:
        """(a, g, b, h) of e_{t+1} = (a I - g P H_c) e_t - (b I - h P H_c) e_{t-1}."""
        eta, beta, wd = self.lr, self.momentum, self.decoupled_decay
        if self.method == "gd":
            return 1.0 - eta * wd, eta, 0.0, 0.0
        if self.method == "heavy_ball":
            return 1.0 + beta, eta * (1.0 - self.dampening), beta, 0.0
        if self.method == "nesterov":
            return 1.0 + beta, eta * (1.0 + beta), beta, eta * beta
        return 1.0 + beta - eta * wd, eta * (1.0 - beta), beta * (1.0 - eta * wd), 0.0

    def preconditioner(self) -> np.ndarray | None:
        """Adam's frozen M = 1 / (sqrt(v_hat) + eps), shape (n,); None for SGD."""
        if self.method != "adam":
            return None
        if self.v_hat is None:
            raise ValueError(
                "Adam's preconditioner needs its second-moment state: read the config after "
                "at least one optimizer.step(), or pass v_hat"
            )
        return 1.0 / (np.sqrt(self.v_hat) + self.eps)


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


_SHARED_KEYS = {
    "SGD": ("momentum", "dampening", "nesterov", "weight_decay", "maximize", "lr"),
    "Adam": ("betas", "eps", "weight_decay", "amsgrad", "maximize", "lr", "decoupled_weight_decay"),
}


def optimizer_config(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor] | None = None,
    upcoming: bool = False,
) -> OptimizerConfig:
    """Read the linearisation's hyper-parameters (and Adam's v_hat) from a torch optimizer.

    Known optimizers: ``torch.optim.SGD`` (plain, heavy-ball, Nesterov), ``torch.optim.Adam``
    and ``torch.optim.AdamW`` (exact classes; subclasses may change the update and are refused).

    Args:
        optimizer: The optimizer that trains the model.
        params: The analysed parameters in flat-vector order (for example the list the
            curvature operator was built on). Default: every parameter of the optimizer, in
            param_groups order.
        upcoming: For Adam: read the second moment that the *coming* ``optimizer.step()``
            will divide by, from its state and the gradients now in ``p.grad``
            (v <- beta2 v + (1 - beta2) g^2, with g + lambda_wd theta for Adam's coupled weight
            decay; amsgrad keeps the running maximum; v_hat = v / (1 - beta2^(t + 1)), and
            ``step`` = t + 1). This works before the first step too (t = 0, v = 0), where the
            default reading (the state of the last step) has no v_hat. Every analysed
            parameter needs a gradient then. Ignored for SGD.

    Returns:
        :class:`OptimizerConfig`; for Adam ``v_hat`` is flat in the order of ``params``.

    Raises:
        TypeError: for an optimizer it does not know.
        ValueError: if a parameter is not in the optimizer, if the analysed parameters sit in
            param groups with different hyper-parameters (analyse them one group at a time:
            the thresholds need one learning rate), for ``maximize=True``, or if some Adam
            parameters have second-moment state and others not, or (``upcoming``) if an
            analysed parameter has no gradient.
    """
    kind = type(optimizer).__name__
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(
            f"optimizer_config knows torch.optim.SGD, Adam and AdamW, not {kind}: build an "
            "OptimizerConfig by hand with the method ('gd', 'heavy_ball', 'nesterov', 'adam') "
            "that matches its update"
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    params = (
        [p for group in optimizer.param_groups for p in group["params"]]
        if params is None
        else list(params)
    )
    if not params:
        raise ValueError("no parameters to analyse: pass a non-empty list of parameters")
    missing = [i for i, p in enumerate(params) if id(p) not in group_of]
    if missing:
        raise ValueError(
            f"parameters at positions {missing} are not trained by this optimizer: pass the "
            "parameters the optimizer was built on"
        )
    family = "SGD" if kind == "SGD" else "Adam"
    groups = {id(group_of[id(p)]): group_of[id(p)] for p in params}
    first = next(iter(groups.values()))
    keys = _SHARED_KEYS[family]
    for group in groups.values():
        differ = [k for k in keys if _norm(group.get(k)) != _norm(first.get(k))]
        if differ:
            raise ValueError(
                f"the analysed parameters lie in param groups whose {differ} differ: pass "
                "params from one param group at a time (the linearised update needs one set "
                "of hyper-parameters)"
            )
    if first.get("maximize", False):
        raise ValueError("maximize=True ascends the loss; the linearisation assumes descent")
    lr = _as_float(first["lr"])
    weight_decay = _as_float(first["weight_decay"])
    if family == "SGD":
        momentum = _as_float(first["momentum"])
        nesterov = bool(first["nesterov"])
        method: Method = "nesterov" if nesterov else ("heavy_ball" if momentum > 0 else "gd")
        return OptimizerConfig(
            method=method,
            lr=lr,
            momentum=momentum,
            dampening=_as_float(first["dampening"]) if method == "heavy_ball" else 0.0,
            weight_decay=weight_decay,
            optimizer=kind,
        )
    beta1, beta2 = (_as_float(b) for b in first["betas"])
    decoupled = kind == "AdamW" or bool(first.get("decoupled_weight_decay", False))
    if upcoming:
        coupled = 0.0 if decoupled else weight_decay
        v_hat, step = _adam_upcoming_v_hat(
            optimizer, params, beta2, bool(first["amsgrad"]), coupled
        )
    else:
        v_hat, step = _adam_v_hat(optimizer, params, beta2, bool(first["amsgrad"]))
    return OptimizerConfig(
        method="adam",
        lr=lr,
        momentum=beta1,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        beta2=beta2,
        eps=_as_float(first["eps"]),
        v_hat=v_hat,
        step=step,
        optimizer=kind,
    )


def _norm(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return tuple(_norm(v) for v in value)
    return value


def _adam_v_hat(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], beta2: float, amsgrad: bool
) -> tuple[np.ndarray | None, int | None]:
    """Flat exp_avg_sq / (1 - beta2^step) over ``params`` (torch's own denominator)."""
    states = [optimizer.state.get(p, {}) for p in params]
    have = ["exp_avg_sq" in s for s in states]
    if not any(have):
        return None, None
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise ValueError(
            f"parameters at positions {missing} have no Adam state (they never received a "
            "gradient): leave them out of params"
        )
    parts, steps = [], set()
    for state in states:
        step = int(_as_float(state["step"]))
        steps.add(step)
        second = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
        second = second.detach().to("cpu", torch.float64).reshape(-1).numpy()
        parts.append(second / (1.0 - beta2**step))
    if len(steps) != 1:
        raise ValueError(
            f"the analysed parameters were stepped different numbers of times {sorted(steps)}: "
            "leave out parameters that skip steps"
        )
    return np.concatenate(parts), steps.pop()


def _adam_upcoming_v_hat(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    beta2: float,
    amsgrad: bool,
    weight_decay: float,
) -> tuple[np.ndarray, int]:
    """Flat v_hat of the coming Adam step from its state and the gradients in ``p.grad``.

    Repeats torch's own arithmetic (``torch.optim.adam._single_tensor_adam``) in the state's
    dtype, then divides in float64 as :func:`_adam_v_hat` does, so that the result equals
    what :func:`optimizer_config` reads after the step.
    """
    missing = [i for i, p in enumerate(params) if p.grad is None]
    if missing:
        raise ValueError(
            f"parameters at positions {missing} have no gradient: call loss.backward() before "
            "reading the coming step's config (upcoming=True), or leave them out of params"
        )
    parts, steps = [], set()
    for p in params:
        state = optimizer.state.get(p, {})
        step = int(_as_float(state["step"])) if "step" in state else 0
        steps.add(step)
        grad = p.grad.detach()
        if weight_decay != 0:
            grad = grad.add(p.detach(), alpha=weight_decay)
        v = state.get("exp_avg_sq")
        v = torch.zeros_like(p, memory_format=torch.preserve_format) if v is None else v.clone()
        v.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
        if amsgrad:
            previous = state.get("max_exp_avg_sq")
            v = v if previous is None else torch.maximum(previous, v)
        second = v.detach().to("cpu", torch.float64).reshape(-1).numpy()
        parts.append(second / (1.0 - beta2 ** (step + 1)))
    if len(steps) != 1:
        raise ValueError(
            f"the analysed parameters were stepped different numbers of times {sorted(steps)}: "
            "leave out parameters that skip steps"
        )
    return np.concatenate(parts), steps.pop() + 1


class UpdateOperator:
    """The linearised update T as a matrix-free, non-symmetric operator.

    Order 2: T acts on stacked states x = (e_t, e_{t-1}) of shape (2n,) or (2n, k) as
    T x = ((a I - g P H_c) e_t - (b I - h P H_c) e_{t-1}, e_t); one product with H per column.
    Order 1: T e = (a I - g P H_c) e on (n,) or (n, k).

    Attributes:
        hessian: The symmetric operator H (n, n).
        config: The :class:`OptimizerConfig` the coefficients came from.
        preconditioner: P as a tensor of shape (n,) in H's dtype and device, or None (P = I).
        shape: (2n, 2n) or (n, n); dtype and device: those of H.
    """

    def __init__(
        self,
        hessian: LinearOperatorLike | torch.Tensor | np.ndarray,
        config: OptimizerConfig,
        preconditioner: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        self.hessian = as_operator(hessian)
        self.config = config
        n = self.hessian.shape[0]
        self.n = n
        self.dtype = self.hessian.dtype
        self.device = torch.device(self.hessian.device)
        if preconditioner is None and config.method == "adam":
            preconditioner = config.preconditioner()
        if preconditioner is not None:
            preconditioner = torch.as_tensor(preconditioner).to(self.device, self.dtype)
            if preconditioner.shape != (n,):
                raise ValueError(
                    f"the preconditioner must be the diagonal of shape (n={n},), got "
                    f"{tuple(preconditioner.shape)}: are v_hat and H over the same parameters?"
                )
        self.preconditioner = preconditioner
        self.a, self.g, self.b, self.h = config.coefficients()
        self.wd = config.coupled_weight_decay
        size = n * config.order
        self.shape = (size, size)

    @property
    def order(self) -> int:
        """Order of the recursion: 1 for gd, 2 for the stacked (e_t, e_{t-1}) state."""
        return self.config.order

    def curvature(self, V: torch.Tensor) -> torch.Tensor:
        """P H_c V for a block V (n, k)."""
        out = self.hessian.matmat(V)
        if self.wd:
            out = out + self.wd * V
        if self.preconditioner is not None:
            out = self.preconditioner[:, None] * out
        return out

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """T X for a block X of shape (order * n, k); returns the same shape."""
        if X.ndim != 2 or X.shape[0] != self.shape[0]:
            raise ValueError(
                f"expected a block of shape ({self.shape[0]}, k) (stacked (e_t, e_(t-1)) for "
                f"momentum methods), got {tuple(X.shape)}"
            )
        X = X.to(self.dtype) if X.dtype != self.dtype else X
        n = self.n
        if self.order == 1:
            return self.a * X - self.g * self.curvature(X)
        now, before = X[:n], X[n:]
        top = self.a * now - self.b * before - self.curvature(self.g * now - self.h * before)
        return torch.cat([top, now], dim=0)

    def rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        """T^T X for a block X of shape (order * n, k); returns the same shape.

        With H symmetric and P diagonal, (P H_c)^T = H_c P, so order 1 gives
        T^T e = a e - g H_c P e and order 2, T^T (u, w) = (a u - g H_c P u + w,
        -(b u - h H_c P u)); one product with H per column, as for :meth:`matmat`.
        """
        if X.ndim != 2 or X.shape[0] != self.shape[0]:
            raise ValueError(
                f"expected a block of shape ({self.shape[0]}, k) (stacked (e_t, e_(t-1)) for "
                f"momentum methods), got {tuple(X.shape)}"
            )
        X = X.to(self.dtype) if X.dtype != self.dtype else X
        n = self.n
        if self.order == 1:
            return self.a * X - self.g * self.curvature_transposed(X)
        now, before = X[:n], X[n:]
        curved = self.curvature_transposed(now)
        top = self.a * now - self.g * curved + before
        return torch.cat([top, -(self.b * now - self.h * curved)], dim=0)

    def curvature_transposed(self, V: torch.Tensor) -> torch.Tensor:
        """(P H_c)^T V = H_c P V for a block V (n, k)."""
        W = V if self.preconditioner is None else self.preconditioner[:, None] * V
        out = self.hessian.matmat(W)
        if self.wd:
            out = out + self.wd * W
        return out

    def to_scipy(self) -> TorchAsScipy:
        """T as a ``scipy.sparse.linalg.LinearOperator`` with ``rmatvec`` = T^T (non-symmetric).

        Numpy in, numpy out, in T's dtype; see :func:`curvscope.linalg.scipy_interop.to_scipy`.
        ``scipy.sparse.linalg.eigs(T.to_scipy(), k=4)`` gives T's largest-magnitude
        eigenvalues.
        """
        return to_scipy(self)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """T x for one vector of shape (order * n,)."""
        if x.ndim != 1:
            raise ValueError(f"matvec expects a 1-D vector, got shape {tuple(x.shape)}")
        return self.matmat(x.unsqueeze(1)).squeeze(1)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def dense(self, block_size: int = 64) -> torch.Tensor:
        """T as a dense (order n, order n) tensor; only for small n."""
        size = self.shape[0]
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        return torch.cat(
            [self.matmat(eye[:, i : i + block_size]) for i in range(0, size, block_size)], dim=1
        )

    def __repr__(self) -> str:
        return (
            f"UpdateOperator(method={self.config.method!r}, shape={self.shape}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def update_operator(
    hessian: LinearOperatorLike | torch.Tensor | np.ndarray,
    config: OptimizerConfig,
    preconditioner: np.ndarray | torch.Tensor | None = None,
) -> UpdateOperator:
    """The linearised update T of ``config`` around a minimum with Hessian ``hessian``.

    ``preconditioner`` overrides Adam's M = 1 / (sqrt(v_hat) + eps) from ``config``.
    """
    return UpdateOperator(hessian, config, preconditioner)


def _block(a: float, g: float, b: float, h: float, mu: Any) -> np.ndarray:
    mu = np.asarray(mu, dtype=float)
    out = np.zeros((*mu.shape, 2, 2))
    out[..., 0, 0] = a - g * mu
    out[..., 0, 1] = -(b - h * mu)
    out[..., 1, 0] = 1.0
    return out


def gd_block(eta: float, lam: Any) -> np.ndarray:
    """1 x 1 block 1 - eta lambda of gradient descent, shape (..., 1, 1)."""
    return (1.0 - eta * np.asarray(lam, dtype=float))[..., None, None]


def heavy_ball_block(eta: float, beta: float, lam: Any) -> np.ndarray:
    """[[1 + beta - eta lambda, -beta], [1, 0]] per eigenvalue lambda, shape (..., 2, 2)."""
    lam = np.asarray(lam, dtype=float)
    out = np.zeros((*lam.shape, 2, 2))
    out[..., 0, 0] = 1.0 + beta - eta * lam
    out[..., 0, 1] = -beta
    out[..., 1, 0] = 1.0
    return out


def nesterov_block(eta: float, beta: float, lam: Any) -> np.ndarray:
    """[[(1 + beta)(1 - eta lambda), -beta (1 - eta lambda)], [1, 0]], shape (..., 2, 2)."""
    c = 1.0 - eta * np.asarray(lam, dtype=float)
    out = np.zeros((*c.shape, 2, 2))
    out[..., 0, 0] = (1.0 + beta) * c
    out[..., 0, 1] = -beta * c
    out[..., 1, 0] = 1.0
    return out


def adam_block(
    eta: float, beta1: float, mu: Any, decoupled_weight_decay: float = 0.0
) -> np.ndarray:
    """Adam's block for an eigenvalue mu of M H_c, shape (..., 2, 2).

    [[1 + beta1 - eta wd_d - eta (1 - beta1) mu, -beta1 (1 - eta wd_d)], [1, 0]].
    """
    w = eta * decoupled_weight_decay
    return _block(1.0 + beta1 - w, eta * (1.0 - beta1), beta1 * (1.0 - w), 0.0, mu)


def update_block(config: OptimizerConfig, mu: Any) -> np.ndarray:
    """The block of ``config`` for eigenvalues mu of P H_c, shape (..., order, order).

    H_c is H plus coupled weight decay, times Adam's M.
    """
    a, g, b, h = config.coefficients()
    if config.order == 1:
        return (a - g * np.asarray(mu, dtype=float))[..., None, None]
    return _block(a, g, b, h, mu)
