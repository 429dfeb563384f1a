"""Do kappa(V) and the pseudospectra of the linearised update warn of instability before its
spectral radius does, in real training?

The claim (Ghosh 2026, "Non-normal spectral signatures of instability in neural network
training dynamics", arXiv:2605.23476; issue 12, item 5): for linearised optimizer updates T,
the eigenvector condition number kappa(V) and the eps-pseudospectral radius warn of transient
amplification before the spectral radius rho(T) indicates instability; in its two-layer
experiments rho(J) does not separate stable from unstable training and kappa(V) does, by about
an order of magnitude. experiments/momentum_nonnormal.py checks the
algebra on one frozen Hessian; this script follows the signals through training runs.

Setup: a 64-32-32-10 tanh MLP (3,466 parameters) on the first 500 digits (zoo.digits_subset),
MSE on one-hot targets, full batch. Two optimizers, learning rates from well below to above
the edge, several seeds (seed s: initial weights and the 500 digits drawn from s):

- heavy ball, torch.optim.SGD(momentum=0.9), eta = c * 2 (1 + beta) / lambda_max(H_0), with
  H_0 the Hessian at initialisation of that seed (c = 1 puts the initial sharpness at the
  heavy-ball edge; progressive sharpening brings runs with c < 1 to it later),
- Adam (betas 0.9, 0.999, eps 1e-8), eta from 1e-3 to 1e-1.

At checkpoints (every step up to step 8, every 2 to 20, every 5 to 150, every 10 to 300,
every 20 after; Adam from step 1) the update is linearised at the current parameters
(curvscope.operators.update.UpdateOperator: heavy ball, or Adam with its preconditioner
M = 1 / (sqrt(v_hat) + eps) frozen at the value the next step will use) and restricted to the
invariant subspace of the top r = 8 eigenvectors of H (of M^1/2 H M^1/2 for Adam, by Lanczos;
curvscope.analysis.stability.nonnormal_report), a 16 x 16 matrix T. On it: rho(T), kappa(V),
max_{k <= 200} ||T^k||_2, the eps-pseudospectral radius rho_eps(T) for eps = 1e-2 and 1e-3,
the Kreiss lower bound max_eps (rho_eps - 1) / eps on sup_k ||T^k||, and the sharpness over
its threshold (lambda_max(H) / (2 (1 + beta) / eta), or lambda_max(M H) / (2 (1 + beta1) /
((1 - beta1) eta)) for Adam), a control that uses the spectrum of H (of M H) alone.

Events, from the loss at every step: divergence (loss > 10x the initial loss, or not finite)
or a loss spike (loss > 2x the running minimum of the earlier losses). The first event ends
the measurements; training goes on without them to record whether the run diverged.

Signals and thresholds (fixed beforehand from the heavy-ball 2 x 2 block at beta = 0.9, whose
rho stays at sqrt(beta) = 0.949 until eta lambda = (1 + sqrt(beta))^2 = 3.797, just below the
edge 3.8; kappa > 10 and rho_eps(1e-2) > 1 are reached at eta lambda = 3.76-3.77, i.e. at 99%
of the edge): rho > 1; kappa > 10; max_k ||T^k|| > 1 and > 10; rho_eps > 1 (each eps); Kreiss
bound > 1; control: sharpness / threshold > 0.99.

Per run and signal: crossed = the signal exceeded its threshold at a checkpoint before the
first event (for runs without an event: at any checkpoint); lead time = event step - first
crossing step. Separation: the AUC of the run's largest pre-event value of the signal as a
score for "the run had an event" (threshold-free), and the accuracy of "crossed".

Run:  .venv/bin/python experiments/nonnormal_training.py [--quick] [--seeds N] [--threads 1]
      [--out DIR] [--summary PATH] [--reanalyse]
(--quick: 1 seed, 3 learning rates per optimizer, 150 steps, checkpoints every 10 steps after
step 20, about 25 s; full: 5 seeds, 6 + 5 learning rates, 600 steps, about 7 minutes on one
thread.)
Writes docs/figures/nonnormal_training.png, the reproduction summary
results/reproduce/nonnormal_training.json (experiments/_reproduce.py), a Markdown section
nonnormal_training.md and the measured runs nonnormal_training_runs.json beside it
(--reanalyse redoes everything but the training from those).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _reproduce import (
    Band,
    Claim,
    add_arguments,
    command,
    judge,
    relative,
    resolve,
    write_summary,
)
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from curvscope import HessianOperator, top_eigenpairs, zoo
from curvscope.analysis.stability import nonnormal_report, stability_threshold
from curvscope.losses import mse_loss
from curvscope.operators.update import OptimizerConfig, UpdateOperator

NAME = "nonnormal_training"
TITLE = "Non-normal signals of the linearised update in training"
FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"

NUM_SAMPLES = 500
HIDDEN = (32, 32)
BETA = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TOP = 8
TOL = 1e-5
POWERS = 200
EPS = (1e-2, 1e-3)
ANGLES = 60
DIVERGE = 10.0
SPIKE = 2.0
STEPS = 600
QUICK_STEPS = 150
#: c = eta lambda_max(H_0) / (2 (1 + beta)) of the heavy-ball runs.
HB_FACTORS = (0.2, 0.35, 0.5, 0.75, 1.0, 1.5)
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_HB_FACTORS = (0.35, 0.5, 1.0)
QUICK_ADAM_LRS = (3e-3, 3e-2, 1e-1)
PAPER = "Ghosh 2026 (arXiv:2605.23476), non-normal linearised updates"
#: The paper's abstract: "the spectral radius rho(J) provides no separation between stable and
#: unstable training phases while kappa(V) separates them by approximately one order of
#: magnitude" (numerical experiments on two-layer networks).
KAPPA_SEPARATION = (
    "κ(V) separates stable from unstable training by about an order of magnitude; ρ(J) does "
    "not separate them (two-layer networks)"
)


def _capitalised(text: str) -> str:
    """First letter upper-case for Latin text only ("κ(V)" stays as written)."""
    return text[0].upper() + text[1:] if text[0].isascii() else text


@dataclass(frozen=True)
class Signal:
    name: str
    label: str
    key: str
    threshold: float


SIGNALS = (
    Signal("rho", "rho(T) > 1", "rho", 1.0),
    Signal("kappa", "kappa(V) > 10", "kappa", 10.0),
    Signal("growth1", "max_k ‖T^k‖ > 1", "growth", 1.0),
    Signal("growth10", "max_k ‖T^k‖ > 10", "growth", 10.0),
    Signal("pseudo2", "rho_eps(T) > 1, eps = 1e-2", "rho_eps_0", 1.0),
    Signal("pseudo3", "rho_eps(T) > 1, eps = 1e-3", "rho_eps_1", 1.0),
    Signal("kreiss", "Kreiss bound > 1", "kreiss", 1.0),
    Signal("edge", "sharpness / threshold > 0.99 (control)", "edge_ratio", 0.99),
)


SCHEDULE = "every step to 8, every 2 to 20, every 5 to 150, every 10 to 300, every 20 after"
SCHEDULE_QUICK = "every step to 8, every 2 to 20, every 10 after"


def is_checkpoint(step: int, quick: bool = False) -> bool:
    if step < 8:
        return True
    if step < 20:
        return step % 2 == 0
    if quick:
        return step % 10 == 0
    if step < 150:
        return step % 5 == 0
    if step < 300:
        return step % 10 == 0
    return step % 20 == 0


def adam_config(optimizer: torch.optim.Adam, params: list[torch.Tensor], lr: float) -> Any:
    """Adam's linearisation with the v_hat the coming step will use (gradients already in
    ``p.grad``): v <- beta2 v + (1 - beta2) g^2, v_hat = v / (1 - beta2^(t + 1)), in float64.
    The library's ``optimizer_config(optimizer, params, upcoming=True)`` reads the same (in the
    state's float32, as torch steps it); this script keeps its float64 arithmetic so that its
    recorded numbers stay those of docs/reproductions.md."""
    beta2 = ADAM_BETAS[1]
    parts, steps = [], set()
    for p in params:
        state = optimizer.state.get(p, {})
        v = state.get("exp_avg_sq", torch.zeros_like(p)).detach().to(torch.float64)
        g = p.grad.detach().to(torch.float64)
        step = int(state["step"]) if "step" in state else 0
        steps.add(step)
        parts.append(((beta2 * v + (1 - beta2) * g * g) / (1 - beta2 ** (step + 1))).reshape(-1))
    (step,) = steps
    return OptimizerConfig(
        "adam",
        lr=lr,
        momentum=ADAM_BETAS[0],
        beta2=beta2,
        eps=ADAM_EPS,
        v_hat=torch.cat(parts).numpy(),
        step=step + 1,
        optimizer="Adam",
    )


class Preconditioned:
    """S = D H D for a positive diagonal D (D = M^1/2 for Adam): symmetric, with the spectrum
    of M H; its eigenvectors u give those of M H as D u."""

    def __init__(self, hessian: Any, root: np.ndarray) -> None:
        self.hessian = hessian
        self.shape, self.dtype, self.device = hessian.shape, hessian.dtype, hessian.device
        self.root = torch.as_tensor(root).to(self.device, self.dtype)[:, None]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.root * self.hessian.matmat(self.root * V)


def measure(
    model: torch.nn.Module, data: list, config: OptimizerConfig, seed: int
) -> dict[str, Any]:
    """The signals of the linearised update at the model's current parameters.

    The top-r eigenpairs come from one Lanczos run (tol 1e-5; half the products of the ARPACK
    search nonnormal_report would start) and are passed to nonnormal_report as its basis.
    """
    hessian = HessianOperator(model, mse_loss, data)
    root = None if config.method != "adam" else np.sqrt(config.preconditioner())
    op = hessian if root is None else Preconditioned(hessian, root)
    pairs = top_eigenpairs(op, k=TOP, tol=TOL, seed=seed, method="lanczos")
    vectors = np.asarray(pairs.vectors)
    report = nonnormal_report(
        UpdateOperator(hessian, config),
        basis=vectors if root is None else root[:, None] * vectors,
        num_steps=1,
        eps=list(EPS),
        num_angles=ANGLES,
        num_refine=2,
    )
    b = report.bounds
    growth, growth_at = max_power_norm(report.restricted, POWERS)
    out = {
        "lambda": [float(v) for v in pairs.values],
        "edge_ratio": float(pairs.values[0]) / stability_threshold(config),
        "rho": b.rho,
        "kappa": b.kappa,
        "growth": growth,
        "growth_at": growth_at,
        "kreiss": b.kreiss_lower,
        "invariance": report.invariance_residual,
    }
    for i, radius in enumerate(b.pseudospectral_radii):
        out[f"rho_eps_{i}"] = float(radius)
    return out


def max_power_norm(T: np.ndarray, num_steps: int, cap: float = 1e12) -> tuple[float, int]:
    """max_{k <= num_steps} ||T^k||_2 and its k, stopping once a norm exceeds ``cap``.

    Stopping early saves the powers beyond the cap (curvscope.linalg.nonnormal.power_norms
    rescales and runs on to k = num_steps; before that fix it overflowed when rho(T)^k passed
    1e308, as for Adam far beyond its edge); every threshold here is far below the cap.
    """
    best, at = 1.0, 0
    power = np.eye(T.shape[0])
    for k in range(1, num_steps + 1):
        power = T @ power
        norm = float(np.linalg.norm(power, 2))
        if norm > best:
            best, at = norm, k
        if norm > cap:
            break
    return best, at


def initial_sharpness(seed: int) -> float:
    data = zoo.digits_subset(NUM_SAMPLES, seed=seed)
    op = HessianOperator(zoo.digits_mlp(HIDDEN, seed=seed), mse_loss, data)
    return float(top_eigenpairs(op, k=1, tol=1e-8, seed=seed).values[0])


def train(
    method: str, lr: float, seed: int, steps: int, factor: float | None, quick: bool = False
) -> dict:
    """One run: losses at every step, signals at the checkpoints before the first event."""
    data = zoo.digits_subset(NUM_SAMPLES, seed=seed)
    ((x, y),) = data
    model = zoo.digits_mlp(HIDDEN, seed=seed)
    params = list(model.parameters())
    if method == "heavy_ball":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=BETA)
        fixed = OptimizerConfig("heavy_ball", lr=lr, momentum=BETA, optimizer="SGD")
    else:
        optimizer = torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    started = time.perf_counter()
    losses: list[float] = []
    checkpoints: list[dict] = []
    event = kind = diverged = None
    low = math.inf
    for step in range(steps + 1):
        loss = mse_loss(model(x), y)
        value = float(loss.item())
        losses.append(value)
        if not math.isfinite(value) or value > DIVERGE * losses[0]:
            diverged = step
            if event is None:
                event, kind = step, "divergence"
            break
        if event is None and value > SPIKE * low:
            event, kind = step, "spike"
        low = min(low, value)
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        # Adam from step 1 on: at step 0 v_hat rests on one gradient and the first update is
        # sign descent (m's bias correction is 1 / (1 - beta1) = 10, taken as 1 by the
        # linearisation).
        first = 0 if method == "heavy_ball" else 1
        if event is None and step >= first and is_checkpoint(step, quick):
            config = fixed if method == "heavy_ball" else adam_config(optimizer, params, lr)
            checkpoints.append({"step": step, "loss": value, **measure(model, data, config, seed)})
        optimizer.step()
    return {
        "method": method,
        "lr": lr,
        "factor": factor,
        "seed": seed,
        "steps": steps,
        "event": event,
        "kind": kind,
        "diverged": diverged,
        "losses": losses,
        "checkpoints": checkpoints,
        "seconds": time.perf_counter() - started,
    }


def first_crossing(run: dict, signal: Signal) -> int | None:
    for c in run["checkpoints"]:
        if c[signal.key] > signal.threshold:
            return c["step"]
    return None


def onsets(run: dict, signal: Signal) -> list[int]:
    """Checkpoint steps where the signal goes above its threshold (from below, or at the
    first checkpoint): the starts of its warning episodes before the event."""
    out, above = [], False
    for c in run["checkpoints"]:
        now = c[signal.key] > signal.threshold
        if now and not above:
            out.append(c["step"])
        above = now
    return out


def score(run: dict, signal: Signal) -> float:
    values = [c[signal.key] for c in run["checkpoints"]]
    return float(max(values)) if values else -math.inf


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a run with an event > score of a run without), ties counted 1/2."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    total = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def evaluate(runs: list[dict], signal: Signal) -> dict[str, Any]:
    """Hits, lead times, false alarms, accuracy and AUC of one signal over ``runs``."""
    rho, control = SIGNALS[0], SIGNALS[-1]
    labels = [r["event"] is not None for r in runs]
    crossed = [first_crossing(r, signal) for r in runs]
    leads = [
        r["event"] - c
        for r, c in zip(runs, crossed, strict=True)
        if r["event"] is not None and c is not None
    ]
    events = sum(labels)
    hits = sum(1 for y, c in zip(labels, crossed, strict=True) if y and c is not None)
    alarms = sum(1 for y, c in zip(labels, crossed, strict=True) if not y and c is not None)
    earlier = {"rho": 0, "edge": 0, "last": 0}
    last_leads, episodes = [], []
    for r, c, y in zip(runs, crossed, labels, strict=True):
        if not y or c is None:
            continue
        for ref in (rho, control):
            c_ref = first_crossing(r, ref)
            earlier[ref.name] += c_ref is None or c < c_ref
        mine, theirs = onsets(r, signal), onsets(r, rho)
        last_leads.append(r["event"] - mine[-1])
        episodes.append(len(mine))
        earlier["last"] += not theirs or mine[-1] < theirs[-1]
    correct = sum(1 for y, c in zip(labels, crossed, strict=True) if y == (c is not None))
    return {
        "events": events,
        "stable": len(runs) - events,
        "hits": hits,
        "false_alarms": alarms,
        "leads": leads,
        "median_lead": float(np.median(leads)) if leads else math.nan,
        "earlier_than_rho": earlier["rho"] / events if events else math.nan,
        "earlier_than_control": earlier["edge"] / events if events else math.nan,
        "last_leads": last_leads,
        "median_last_lead": float(np.median(last_leads)) if last_leads else math.nan,
        "last_earlier_than_rho": earlier["last"] / events if events else math.nan,
        "episodes": float(np.median(episodes)) if episodes else math.nan,
        "accuracy": correct / len(runs),
        "auc": auc([score(r, signal) for r in runs], labels),
    }


def spread(values: list[float], digits: int = 3) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return "-"
    if v.size == 1:
        return f"{v[0]:.{digits}g}"
    return f"{np.median(v):.{digits}g} [{v.min():.{digits}g}, {v.max():.{digits}g}]"


def run_label(run: dict) -> str:
    if run["method"] == "heavy_ball":
        return f"heavy ball c={run['factor']:g} (eta={run['lr']:.3g})"
    return f"Adam eta={run['lr']:g}"


def outcome(run: dict) -> str:
    if run["event"] is None:
        return "stable"
    tail = ", diverged" if run["kind"] == "spike" and run["diverged"] is not None else ""
    return f"{run['kind']} at {run['event']}{tail}"


def table_rows(runs: list[dict], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per signal and optimizer group: pooled counts, per-seed spreads."""
    rows = []
    for group in ("heavy_ball", "adam", "all"):
        chosen = [r for r in runs if group == "all" or r["method"] == group]
        for signal in SIGNALS:
            pooled = evaluate(chosen, signal)
            per_seed = [evaluate([r for r in chosen if r["seed"] == s], signal) for s in seeds]
            rows.append(
                {
                    "group": group,
                    "signal": signal.name,
                    "label": signal.label,
                    "hits": f"{pooled['hits']}/{pooled['events']}",
                    "false_alarms": f"{pooled['false_alarms']}/{pooled['stable']}",
                    "lead_all": spread(pooled["leads"]),
                    "lead_seed_medians": spread([p["median_lead"] for p in per_seed]),
                    "last_lead_seed_medians": spread([p["median_last_lead"] for p in per_seed]),
                    "episodes": pooled["episodes"],
                    "earlier_than_rho": pooled["earlier_than_rho"],
                    "last_earlier_than_rho": pooled["last_earlier_than_rho"],
                    "earlier_than_control": pooled["earlier_than_control"],
                    "accuracy": pooled["accuracy"],
                    "auc": pooled["auc"],
                    "auc_seeds": spread([p["auc"] for p in per_seed], 2),
                    "per_seed": per_seed,
                }
            )
    return rows


def markdown_table(rows: list[dict], group: str) -> str:
    head = (
        "| signal | hits (events) | false alarms (stable) | lead from first crossing | "
        "lead from last onset | episodes | first crossing before rho | last onset before rho "
        "| first crossing before control | accuracy | AUC pooled | AUC per seed |"
    )
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        if row["group"] != group:
            continue
        lines.append(
            f"| {row['label']} | {row['hits']} | {row['false_alarms']} | "
            f"{row['lead_seed_medians']} | {row['last_lead_seed_medians']} | "
            f"{_count(row['episodes'])} | {_pct(row['earlier_than_rho'])} | "
            f"{_pct(row['last_earlier_than_rho'])} | {_pct(row['earlier_than_control'])} | "
            f"{_pct(row['accuracy'])} | {_num(row['auc'])} | {row['auc_seeds']} |"
        )
    return "\n".join(lines)


def _count(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:g}"


def _pct(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.2f}"


def earlier_than(runs: list[dict], names: tuple[str, ...], reference: str) -> float:
    """Fraction of the runs with an event in which one of the signals ``names`` crossed at an
    earlier checkpoint than ``reference`` (a reference that never crossed counts as later)."""
    by_name = {s.name: s for s in SIGNALS}
    chosen = [r for r in runs if r["event"] is not None]
    if not chosen:
        return math.nan
    count = 0
    for run in chosen:
        steps = [first_crossing(run, by_name[n]) for n in names]
        steps = [c for c in steps if c is not None]
        ref = first_crossing(run, by_name[reference])
        count += bool(steps) and (ref is None or min(steps) < ref)
    return count / len(chosen)


def _auc_by_seed(runs: list[dict], seeds: list[int], name: str) -> list[float]:
    signal = next(s for s in SIGNALS if s.name == name)
    return [evaluate([r for r in runs if r["seed"] == s], signal)["auc"] for s in seeds]


def claims(runs: list[dict], seeds: list[int], rows: list[dict], figure: Path) -> list[Claim]:
    """The claim's testable parts; one value per seed (heavy-ball and Adam runs pooled)."""

    def of_seed(seed: int) -> list[dict]:
        return [r for r in runs if r["seed"] == seed]

    labels = [f"seed {s}" for s in seeds]
    rho_auc = float(np.nanmedian(_auc_by_seed(runs, seeds, "rho")))
    out = []
    for name, what, short in (
        ("kappa", "κ(V) > 10", "κ(V)"),
        ("pseudo2", "ρ_ε(T) > 1 (ε = 1e-2)", "the pseudospectral radius"),
        ("growth10", "max_k ‖T^k‖ > 10", "the transient growth"),
    ):
        values = [earlier_than(of_seed(s), (name,), "rho") for s in seeds]
        verdict = judge(values, reproduces=Band(0.5, None), partly=Band(0.2, None))
        out.append(
            Claim(
                key=f"{short} before ρ(T)",
                paper=PAPER,
                claim=f"For the linearised update of a training run (heavy ball, Adam), {short} "
                "crosses its threshold before the spectral radius ρ(T) crosses 1, ahead of a "
                "divergence or loss spike.",
                paper_value="qualitative: non-normal quantities warn before ρ(T) > 1",
                metric=f"fraction of the runs with an event in which {what} crossed at an "
                "earlier checkpoint than ρ(T) > 1 (ρ not crossing before the event counts as "
                "later); per seed, all learning rates of both optimizers",
                values=values,
                labels=labels,
                rule=verdict.rule,
                verdict=verdict.verdict,
                figure=str(figure),
                details=_claim_details(rows, name) if name != "kappa" else tables(rows, runs),
            )
        )
        values = _auc_by_seed(runs, seeds, name)
        verdict = judge(values, reproduces=Band(0.8, None), partly=Band(0.65, None))
        final = verdict.verdict
        if final == "reproduces" and float(np.nanmedian(values)) < rho_auc:
            final = "partly"
        out.append(
            Claim(
                key=f"{short} separates",
                paper=PAPER,
                claim=f"{_capitalised(short)} separates the training runs that "
                "diverge or spike from those that stay stable.",
                paper_value=KAPPA_SEPARATION if name == "kappa" else "qualitative",
                metric=f"AUC of the run's largest pre-event value of {what.split(' >')[0]} as "
                "a score for 'the run diverged or spiked'; per seed, all learning rates of "
                "both optimizers",
                values=values,
                labels=labels,
                rule=verdict.rule + "; reproduces becomes partly when the median is below "
                f"that of ρ(T) ({_num(rho_auc)})",
                verdict=final,
                figure=str(figure),
            )
        )
    values = [earlier_than(of_seed(s), ("kappa", "pseudo2"), "edge") for s in seeds]
    verdict = judge(values, reproduces=Band(0.5, None), partly=Band(0.2, None))
    out.append(
        Claim(
            key="warning beyond the sharpness",
            paper=PAPER,
            claim="The early warning comes from non-normality: κ(V) or the pseudospectral "
            "radius crosses before the sharpness itself reaches 99% of its threshold.",
            paper_value="implied: the warning needs the non-normal analysis",
            metric="fraction of the runs with an event in which κ(V) > 10 or ρ_ε(T) > 1 "
            "(ε = 1e-2) crossed at an earlier checkpoint than λ_max / threshold > 0.99 "
            "(λ_max(H) for heavy ball, λ_max(MH) for Adam: no eigenvectors, no pseudospectra)",
            values=values,
            labels=labels,
            rule=verdict.rule,
            verdict=verdict.verdict,
            figure=str(figure),
            details=reading(rows, runs),
            tried=TRIED,
        )
    )
    out[-1].details += f"\n\n**Over all claims: {_verdict(out)}.** {_verdict_text(out[-1])}"
    return out


TRIED = (
    "Two lead times (from the first crossing and from the onset of the last episode above "
    "threshold before the event), two ε (1e-2, 1e-3), the Kreiss bound, max_k ‖T^k‖ at 1 and "
    "10, and a threshold-free separation (AUC). Thresholds were fixed from the heavy-ball "
    "2 x 2 block before the runs, at 99% of the edge for κ and ρ_ε, and matched by the "
    "control's 0.99; a lower κ threshold (say 5) warns earlier but also fires at the slow "
    "end of the spectrum and in every Adam run (κ is U-shaped in ηλ). The checkpoints are "
    "5 steps apart through step 150 (10 to 300, 20 after): a lead shorter than that is not "
    "resolved, for every signal alike."
)


def plot(runs: list[dict], rows: list[dict], path: Path) -> None:
    seed = min(r["seed"] for r in runs)
    candidates = [r for r in runs if r["seed"] == seed and len(r["checkpoints"]) >= 3]
    shown: list[dict] = []
    for method in ("heavy_ball", "adam"):
        mine = [r for r in candidates if r["method"] == method]
        stable = [r for r in mine if r["event"] is None]
        late = [r for r in mine if r["event"] is not None]
        if stable:
            shown.append(stable[-1])
        if late:
            shown.append(max(late, key=lambda r: len(r["checkpoints"])))
    fig = Figure(figsize=(17, 10), layout="constrained")
    grid = fig.add_gridspec(2, max(len(shown), 1), height_ratios=(1.0, 0.85))
    curves = (
        ("rho", 1.0, "ρ(T)"),
        ("kappa", 10.0, "κ(V) / 10"),
        ("growth", 10.0, "max_k ||T^k|| / 10"),
        ("rho_eps_0", 1.0, "ρ_ε(T), ε = 1e-2"),
        ("kreiss", 1.0, "Kreiss bound"),
        ("edge_ratio", 0.99, "sharpness / (0.99 threshold)"),
    )
    for i, run in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        steps = [c["step"] for c in run["checkpoints"]]
        for j, (key, scale, label) in enumerate(curves):
            values = np.array([c[key] for c in run["checkpoints"]]) / scale
            style = {"color": "k", "linewidth": 2.2} if key == "rho" else {"color": f"C{j}"}
            ax.semilogy(steps, np.clip(values, 1e-2, 1e3), label=label, **style)
        ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        if run["event"] is not None:
            ax.axvline(run["event"], color="C3", linestyle="--", label=f"{run['kind']}")
        twin = ax.twinx()
        twin.semilogy(run["losses"], color="0.6", linewidth=0.8)
        twin.set_ylabel("training loss (grey)")
        ax.set_xlim(0, max(run["event"] or run["steps"], 10))
        ax.set_ylim(3e-2, 2e2)
        ax.set_xlabel("step")
        ax.set_ylabel("signal / threshold (crosses 1)")
        ax.set_title(f"{run_label(run)}, seed {seed}: {outcome(run)}", fontsize="small")
        ax.grid(True, alpha=0.3, linestyle="--")
        if i == 0:
            ax.legend(fontsize="x-small", loc="upper left")
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    head = (
        f"{'signal':<39} {'group':<10} {'hits':>5} {'false al.':>9} {'lead: first':>17} "
        f"{'lead: last onset':>17} {'episodes':>8} {'1st<rho':>7} {'last<rho':>8} "
        f"{'1st<ctl':>7} {'acc':>5} {'AUC':>5} {'AUC seeds':>17}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['label']:<39} {row['group']:<10} {row['hits']:>5} {row['false_alarms']:>9} "
            f"{row['lead_seed_medians']:>17} {row['last_lead_seed_medians']:>17} "
            f"{_count(row['episodes']):>8} {_pct(row['earlier_than_rho']):>7} "
            f"{_pct(row['last_earlier_than_rho']):>8} {_pct(row['earlier_than_control']):>7} "
            f"{_pct(row['accuracy']):>5} {_num(row['auc']):>5} {row['auc_seeds']:>17}"
        )
    ax.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=7.2, va="top")
    ax.set_title(
        "lead (steps) = event − first crossing, or − onset of the last episode above threshold "
        "(median per seed, then median [min, max] over seeds);\nepisodes: median number before "
        "the event; '<rho', '<ctl': crossed at an earlier checkpoint than ρ(T) > 1 / than the "
        "sharpness control; AUC of the largest pre-event value",
        fontsize="small",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--out", type=Path, default=FIGURES, help="figures (docs/figures)")
    parser.add_argument("--steps", type=int, help="steps per run (default 600; 150 --quick)")
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="no training: redo tables, figure and summary from the runs that the last run "
        "wrote beside the summary (NAME_runs.json)",
    )
    add_arguments(parser)
    args = resolve(parser.parse_args(), NAME)
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)
    runs_file = args.summary.with_name(f"{NAME}_runs.json")
    if args.reanalyse:
        if not runs_file.exists():
            parser.error(f"--reanalyse needs {runs_file}: run once without --reanalyse first")
        stored = json.loads(runs_file.read_text())
        runs, steps = stored["runs"], stored["steps"]
        args.seeds, args.quick = len(stored["seeds"]), stored["quick"]
        args.started = time.perf_counter() - stored["wall_s"]
    else:
        steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
        runs = train_all(list(range(args.seeds)), steps, args.quick)
        stored = {
            "quick": args.quick,
            "seeds": list(range(args.seeds)),
            "steps": steps,
            "wall_s": time.perf_counter() - args.started,
            "runs": runs,
        }
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        # Python's JSON (Infinity, NaN kept): read back by --reanalyse only.
        runs_file.write_text(json.dumps(stored) + "\n")
    seeds = list(range(args.seeds))
    rows = table_rows(runs, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / f"{NAME}.png"
    plot(runs, rows, figure)
    found = claims(runs, seeds, rows, figure)
    text = setup(runs, steps, args.quick)
    path = write_summary(args, NAME, TITLE, text, found, [figure])
    section = section_text(text, found, rows, runs, command(NAME, args), figure)
    path.with_suffix(".md").write_text(section)
    worst = max((c["invariance"] for r in runs for c in r["checkpoints"]), default=math.nan)
    print()
    print(section)
    print(f"wrote {figure} and {path.with_suffix('.md')}; runs in {runs_file}")
    print(f"largest invariance residual of a restriction: {worst:.1e}")
    print(f"total {time.perf_counter() - args.started:.1f} s with {args.threads} thread(s)")


def train_all(seeds: list[int], steps: int, quick: bool) -> list[dict]:
    factors = QUICK_HB_FACTORS if quick else HB_FACTORS
    adam_lrs = QUICK_ADAM_LRS if quick else ADAM_LRS
    runs = []
    for seed in seeds:
        sharp = initial_sharpness(seed)
        settings = [("heavy_ball", c * 2 * (1 + BETA) / sharp, c) for c in factors]
        settings += [("adam", lr, None) for lr in adam_lrs]
        for method, lr, factor in settings:
            runs.append(train(method, lr, seed, steps, factor, quick))
            print(
                f"seed {seed} {run_label(runs[-1])}: {outcome(runs[-1])}, "
                f"{len(runs[-1]['checkpoints'])} checkpoints, {runs[-1]['seconds']:.1f} s",
                flush=True,
            )
    return runs


def _row(rows: list[dict], group: str, name: str) -> dict:
    return next(r for r in rows if r["group"] == group and r["signal"] == name)


def setup(runs: list[dict], steps: int, quick: bool) -> str:
    factors = sorted({r["factor"] for r in runs if r["method"] == "heavy_ball"})
    lrs = sorted({r["lr"] for r in runs if r["method"] == "adam"})
    return "\n\n".join(
        [
            f"64-32-32-10 tanh MLP (3,466 parameters), the first {NUM_SAMPLES} digits, MSE on "
            f"one-hot targets, full batch, {steps} steps; heavy ball (β = {BETA}) at "
            "η = c · 2(1+β)/λ_max(H_0) with c in "
            f"{{{', '.join(f'{c:g}' for c in factors)}}} (H_0: the seed's Hessian at "
            f"initialisation); Adam (β = {ADAM_BETAS}, ε = {ADAM_EPS:g}) at η in "
            f"{{{', '.join(f'{lr:g}' for lr in lrs)}}}. Seeds vary the weights and the "
            f"digits. At checkpoints ({SCHEDULE_QUICK if quick else SCHEDULE}; Adam from step "
            "1) the update is linearised at the "
            "current parameters (`UpdateOperator`; Adam with its preconditioner M = "
            "1/(√v̂ + ε) frozen at the value of the coming step) and restricted to the "
            f"invariant top-{TOP} eigenspace of H (of M^1/2 H M^1/2 for Adam; Lanczos, "
            f"`nonnormal_report`): T is {2 * TOP} x {2 * TOP}. Signals: ρ(T), κ(V), "
            f"max_{{k≤{POWERS}}} ‖T^k‖, ρ_ε(T) at ε = 1e-2 and 1e-3, the Kreiss bound "
            "max_ε (ρ_ε − 1)/ε, and a control without non-normal analysis: "
            "λ_max / threshold (λ_max(H) vs 2(1+β)/η, λ_max(MH) vs 2(1+β1)/((1−β1)η)).",
            f"Events: loss > {DIVERGE:g}x the initial loss or not finite (divergence), or "
            f"loss > {SPIKE:g}x its running minimum (spike); measurements stop at the first "
            "event. Lead time = event step − first crossing (also − onset of the last episode "
            "above threshold); separation: AUC of the run's largest pre-event value as a "
            "score for 'the run had an event', and the accuracy of 'crossed'.",
            "Thresholds, set before the runs from the heavy-ball 2 x 2 block at β = 0.9 (ρ "
            "stays at √β = 0.949 until ηλ = (1+√β)² = 3.797, just below the edge 3.8): "
            "ρ(T) > 1; κ(V) > 10 and ρ_ε(T) > 1 at ε = 1e-2 (both reached at ηλ ≈ 3.76-3.77, "
            "99% of the edge); max_k ‖T^k‖ > 1 and > 10; ρ_ε(T) > 1 at ε = 1e-3; Kreiss "
            "bound > 1; control: λ_max / threshold > 0.99.",
        ]
    )


def section_text(
    text: str, found: list[Claim], rows: list[dict], runs: list[dict], cmd: str, figure: Path
) -> str:
    """A Markdown section with everything in the summary, for readers of the results folder."""
    lines = [f"## {TITLE}", "", text, "", f"Command: `{cmd}`.", "", tables(rows, runs), ""]
    for claim in found:
        median = float(np.nanmedian(claim.values)) if claim.values else math.nan
        lines.append(
            f"- **{claim.key}**: {claim.metric}: median {_num(median)} "
            f"[{_num(min(claim.values))}, {_num(max(claim.values))}] over seeds: "
            f"**{claim.verdict}** ({claim.rule})"
        )
    lines += ["", found[-1].details, "", f"![{NAME}]({relative(figure)})", ""]
    return "\n".join(lines)


def tables(rows: list[dict], runs: list[dict]) -> str:
    """Outcomes per run and the lead-time / separation tables, as Markdown."""
    lines = ["Outcomes, per seed:", ""]
    keys = sorted({(r["method"], r["lr"] if r["method"] == "adam" else r["factor"]) for r in runs})
    for method, value in keys:
        chosen = [
            r
            for r in runs
            if r["method"] == method and (r["lr"] if method == "adam" else r["factor"]) == value
        ]
        name = f"heavy ball c = {value:g}" if method == "heavy_ball" else f"Adam η = {value:g}"
        lines.append(f"- {name}: " + "; ".join(outcome(r) for r in chosen))
    lines += [
        "",
        "Leads in steps, as the median over a seed's runs, then median [min, max] over seeds; "
        "'before ρ' / 'before control': crossed at an earlier checkpoint than ρ(T) > 1 / than "
        "the sharpness control; episodes: median number of episodes above threshold before "
        "the event.",
    ]
    for group, title in (("heavy_ball", "Heavy ball"), ("adam", "Adam"), ("all", "All runs")):
        lines += ["", f"{title}:", "", markdown_table(rows, group)]
    return "\n".join(lines)


def _claim_details(rows: list[dict], name: str) -> str:
    parts = []
    for group, title in (("heavy_ball", "heavy ball"), ("adam", "Adam")):
        row = _row(rows, group, name)
        parts.append(
            f"{title}: hits {row['hits']}, false alarms {row['false_alarms']}, lead from the "
            f"first crossing {row['lead_seed_medians']} steps, from the last onset "
            f"{row['last_lead_seed_medians']}, before ρ {_pct(row['earlier_than_rho'])}, "
            f"before the control {_pct(row['earlier_than_control'])}, AUC {_num(row['auc'])}"
        )
    return "; ".join(parts) + " (all tables under the first claim)."


def reading(rows: list[dict], runs: list[dict]) -> str:
    """What the numbers say, in sentences built from them."""
    kappa_hb, kappa_adam = _row(rows, "heavy_ball", "kappa"), _row(rows, "adam", "kappa")
    pseudo_hb, pseudo_adam = _row(rows, "heavy_ball", "pseudo2"), _row(rows, "adam", "pseudo2")
    rho_hb, rho_adam = _row(rows, "heavy_ball", "rho"), _row(rows, "adam", "rho")
    rho_all, growth1 = _row(rows, "all", "rho"), _row(rows, "all", "growth1")
    kappa = SIGNALS[1]
    early = [
        first_crossing(r, kappa)
        for r in runs
        if r["method"] == "adam" and first_crossing(r, kappa) is not None
    ]
    early_text = (
        f"; {sum(c <= 4 for c in early)} of the {len(early)} Adam runs in which κ crossed "
        "did so by step 4, stable or not"
        if early
        else ""
    )
    return (
        "**Reading.** Heavy ball: ρ(T) sits at √β = 0.949 while ηλ_max passes through the "
        "complex range, so any signal that grows with ηλ_max crosses first. κ(V) > 10 crossed "
        f"before ρ(T) > 1 in {_pct(kappa_hb['earlier_than_rho'])} of the runs with an event "
        f"and missed {_miss(kappa_hb)} (κ peaks at the defective point ηλ = 3.797 and falls "
        "again past the edge, a narrow window that the checkpoints can step over); "
        f"ρ_ε(1e-2) > 1 crossed first in {_pct(pseudo_hb['earlier_than_rho'])}. Before the "
        f"sharpness control they crossed in {_pct(kappa_hb['earlier_than_control'])} and "
        f"{_pct(pseudo_hb['earlier_than_control'])} of the runs: at these thresholds they say "
        "what λ_max / threshold > 0.99 says, at the same checkpoint. ρ(T) > 1 came in a "
        f"median of {_count(rho_hb['episodes'])} episode(s) before the event (heavy ball) and "
        f"{_count(rho_adam['episodes'])} (Adam); lead from its first crossing: heavy ball "
        f"{rho_hb['lead_seed_medians']} steps, Adam {rho_adam['lead_seed_medians']}; from the "
        f"onset of its last episode: {rho_hb['last_lead_seed_medians']} and "
        f"{rho_adam['last_lead_seed_medians']} (median per seed, then median [range] over "
        f"seeds){_episodes_text(rho_hb, rho_adam)}. Adam: κ(V) > 10 in "
        f"{kappa_adam['false_alarms']} stable runs{early_text}; "
        f"ρ_ε(1e-2) > 1 in {pseudo_adam['false_alarms']} stable runs. κ(V) is U-shaped in "
        "ηλ: it also peaks at the slow end, the second defective point ηλ = (1−√β)² = 0.0026 "
        "(η(1−β1)λ(MH) for Adam), and for Adam it grows with the non-orthogonality of the "
        "eigenvectors of MH; at small η the slow directions have ρ within ε of 1. "
        f"max_k ‖T^k‖ > 1 holds in {growth1['false_alarms']} stable runs: a momentum "
        "update amplifies transiently at any learning rate. ρ(T) > 1 itself: "
        f"{rho_all['hits']} events preceded by it, {rho_all['false_alarms']} stable runs "
        f"with it, AUC {_num(rho_all['auc'])}."
    )


def _episodes_text(*rows: dict) -> str:
    if not any(np.isfinite(r["episodes"]) and r["episodes"] > 1 for r in rows):
        return ""
    return (
        ": the runs cross the edge, come back below it (edge of stability) and spike later, "
        "so a first crossing can come long before the event"
    )


def _miss(row: dict) -> str:
    hits, events = (int(x) for x in row["hits"].split("/"))
    return f"{events - hits} of {events}"


def _verdict(found: list[Claim]) -> str:
    verdicts = [c.verdict for c in found]
    if all(v == "reproduces" for v in verdicts):
        return "reproduces"
    if all(v == "does not" for v in verdicts):
        return "does not reproduce"
    return "partly"


def _verdict_text(control: Claim) -> str:
    if control.verdict == "does not":
        return (
            "κ(V) and the pseudospectral radius do cross before ρ(T) in part of the runs, "
            "but only because ρ(T) of a momentum update is blind below the edge; the same "
            "warning, at the same checkpoint, comes from the sharpness over its threshold, "
            "with no eigenvectors and no pseudospectra. We find no warning that only "
            "non-normality gives."
        )
    return (
        "κ(V) or the pseudospectral radius crossed before the sharpness control in a median "
        f"{_num(float(np.nanmedian(control.values)))} of the runs with an event: some "
        "warning beyond the spectrum of H."
    )


if __name__ == "__main__":
    main()
