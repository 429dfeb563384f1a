"""Cost of exact Hessian products relative to one gradient, on this CPU.

For each model (an MLP of about 1M parameters and a small CNN, with and without BatchNorm in
train mode, all on scikit-learn's digits: 1797 samples in batches of 512, the last one of 261)
the script times, in one process:

- ``gradient``: one full-data gradient, forward and backward over every batch with
  ``torch.autograd.grad`` on the operator's own parameter copies (``op.function.param_list()``,
  ``op.batch_loss`` over ``op.source``), accumulated with batch-size weights as the operator does;
- ``HVP``: one ``op.matvec``;
- ``matmat(10) loop`` and ``matmat(10) batched``: one ``op.matmat`` of 10 vectors with
  ``matmat_mode="loop"`` and ``"batched"``;
- ``10 x HVP``: 10 separate ``op.matvec`` calls;
- ``HVP, kept graphs`` and ``matmat(10), kept graphs``: the same products with every batch's
  gradient graph kept across products (``keep_graphs=True``; the default "auto" keeps those
  that fit a memory budget). The rows above use ``keep_graphs=False``.

Each alternative runs once untimed (warm-up; its results feed the sanity checks), then
``--repeats`` times with the order of the alternatives rotated from one repeat to the next. The
table gives median seconds and the ratio of each median to the gradient's median, with the
target beside it.

Run from the repository root::

    .venv/bin/python benchmarks/hvp_cost.py               # full run, ~2-3 minutes on 2 cores
    .venv/bin/python benchmarks/hvp_cost.py --quick       # tiny smoke run, seconds
    .venv/bin/python benchmarks/hvp_cost.py --dtype float32 --threads 1

Timings are only as good as the machine is quiet: the load average is printed before and after,
and a warning is printed when it exceeds the number of CPUs (other processes then steal time,
and torch's threads wait for each other at every parallel region). On a shared machine,
``--threads 1 --clock cpu`` counts only the CPU time the process itself used, which other
processes barely change (with several threads, CPU time would also count threads spinning at
barriers, so ``--clock cpu`` is meant for one thread).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from curvscope.operators import HessianOperator

NUM_VECTORS = 10
BATCH_SIZE = 512
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# name -> (target ratio to the gradient or None, text printed in the target column)
TARGETS: dict[str, tuple[float | None, str]] = {
    "gradient": (None, "1 (reference)"),
    "HVP": (3.3, "<= 3.3"),
    f"matmat({NUM_VECTORS}) loop": (24.0, "<= 24"),
    f"matmat({NUM_VECTORS}) batched": (24.0, "<= 24"),
    f"{NUM_VECTORS} x HVP": (None, "~30-33 (reference)"),
    "HVP, kept graphs": (None, "~2 (no forward)"),
    f"matmat({NUM_VECTORS}), kept graphs": (None, "~20"),
}


@dataclass(frozen=True)
class Case:
    """One model on one data set: what a table block is measured on."""

    name: str
    model: nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]


def digits_batches(
    images: bool, num_samples: int | None = None, batch_size: int = BATCH_SIZE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Digits as a fixed list of (inputs, targets) batches, pixels scaled to [0, 1].

    Inputs have shape (b, 64), or (b, 1, 8, 8) when ``images``; the last batch is uneven
    (1797 = 3 * 512 + 261).
    """
    X, y = load_digits(return_X_y=True)
    if num_samples is not None:
        X, y = X[:num_samples], y[:num_samples]
    inputs = torch.tensor(X / 16.0, dtype=torch.float32)
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    targets = torch.tensor(y, dtype=torch.long)
    return [
        (inputs[i : i + batch_size], targets[i : i + batch_size])
        for i in range(0, len(targets), batch_size)
    ]


def mlp(widths: tuple[int, ...]) -> nn.Module:
    """Tanh MLP 64 -> widths -> 10."""
    layers: list[nn.Module] = []
    sizes = (64, *widths)
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], 10))
    return nn.Sequential(*layers)


def cnn(c1: int, c2: int, batchnorm: bool) -> nn.Module:
    """Conv(1->c1, 3x3) -> Conv(c1->c2, 3x3, stride 2) -> Linear(c2*4*4 -> 10), tanh, on 8x8."""

    def norm(channels: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(channels)] if batchnorm else []

    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        *norm(c1),
        nn.Tanh(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        *norm(c2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, 10),
    )
    return model.train()  # BatchNorm normalises with batch statistics


def build_cases(quick: bool) -> list[Case]:
    """The measured models; ``quick`` shrinks widths and data for a smoke run."""
    num_samples = 300 if quick else None
    batch_size = 128 if quick else BATCH_SIZE
    widths = (32, 16) if quick else (1024, 896)  # 64-1024-896-10: 993,930 parameters
    c1, c2 = (4, 8) if quick else (16, 32)
    flat = digits_batches(False, num_samples, batch_size)
    images = digits_batches(True, num_samples, batch_size)
    cases = []
    for name, make, data in [
        ("MLP " + "-".join(map(str, (64, *widths, 10))) + " tanh", lambda: mlp(widths), flat),
        ("CNN", lambda: cnn(c1, c2, batchnorm=False), images),
        ("CNN+BN (train)", lambda: cnn(c1, c2, batchnorm=True), images),
    ]:
        torch.manual_seed(0)
        cases.append(Case(name, make(), data))
    return cases


def full_gradient(op: HessianOperator) -> list[torch.Tensor]:
    """Gradient of the mean loss over ``op.source``, on the operator's own parameter copies."""
    leaves = op.function.param_list()
    total = [torch.zeros_like(p) for p in leaves]
    num_samples = 0
    for batch in op.source:
        grads = torch.autograd.grad(op.batch_loss(batch), leaves)
        for acc, g in zip(total, grads, strict=True):
            acc.add_(g, alpha=float(batch.size))
        num_samples += batch.size
    return [acc.div_(num_samples) for acc in total]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_alternatives(
    alternatives: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of each alternative, ``repeats`` times, order rotated per repeat."""
    names = list(alternatives)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            alternatives[name]()
            times[name].append(clock() - start)
    return times


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| in the Frobenius norm."""
    return float((a - b).norm() / a.norm())


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def load_text() -> str:
    load = load_average()
    return "?" if load is None else "/".join(f"{x:.2f}" for x in load)


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {platform.platform()} | cpu: {cpu} | os.cpu_count()={os.cpu_count()} | "
        f"torch {torch.__version__} | torch.get_num_threads()={torch.get_num_threads()}"
    )


def measure(
    case: Case, dtype: torch.dtype, repeats: int, clock: Callable[[], float]
) -> tuple[list[tuple], dict[str, float]]:
    """Table rows and sanity-check differences for one case."""
    # keep_graphs=False: these rows measure a product that rebuilds each batch's graph; the
    # "kept graphs" rows measure the default, where graphs that fit are kept across products.
    ops = {
        mode: HessianOperator(
            case.model, F.cross_entropy, case.data, dtype=dtype, matmat_mode=mode, keep_graphs=False
        )
        for mode in ("loop", "batched")
    }
    kept = HessianOperator(case.model, F.cross_entropy, case.data, dtype=dtype, keep_graphs=True)
    op = ops["loop"]
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(op.num_params, NUM_VECTORS, generator=generator, dtype=dtype)

    def separate() -> torch.Tensor:
        return torch.stack([op.matvec(V[:, j]) for j in range(NUM_VECTORS)], dim=1)

    alternatives: dict[str, Callable[[], object]] = {
        "gradient": lambda: full_gradient(op),
        "HVP": lambda: op.matvec(V[:, 0]),
        f"matmat({NUM_VECTORS}) loop": lambda: ops["loop"].matmat(V),
        f"matmat({NUM_VECTORS}) batched": lambda: ops["batched"].matmat(V),
        f"{NUM_VECTORS} x HVP": separate,
        "HVP, kept graphs": lambda: kept.matvec(V[:, 0]),
        f"matmat({NUM_VECTORS}), kept graphs": lambda: kept.matmat(V),
    }
    warm = {name: fn() for name, fn in alternatives.items()}  # warm-up, kept for the checks
    checks = {
        "matmat loop vs batched": relative_difference(
            warm[f"matmat({NUM_VECTORS}) loop"], warm[f"matmat({NUM_VECTORS}) batched"]
        ),
        "matmat loop vs 10 x HVP": relative_difference(
            warm[f"matmat({NUM_VECTORS}) loop"], warm[f"{NUM_VECTORS} x HVP"]
        ),
        "kept vs rebuilt graphs": relative_difference(
            warm[f"matmat({NUM_VECTORS}), kept graphs"], warm[f"matmat({NUM_VECTORS}) loop"]
        ),
        "HVP vs matmat column 0": relative_difference(
            warm["HVP"], warm[f"matmat({NUM_VECTORS}) loop"][:, 0]
        ),
    }
    times = time_alternatives(alternatives, repeats, clock)
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, median in medians.items():
        ratio = median / medians["gradient"]
        target, target_text = TARGETS[name]
        verdict = "" if target is None else ("met" if ratio <= target else "MISSED")
        rows.append((case.name, op.num_params, name, median, ratio, target_text, verdict))
    return rows, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per alternative")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: smoke run")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed seconds; cpu: process CPU seconds (use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    repeats = min(args.repeats, 2) if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    dtype = DTYPES[args.dtype]
    threads = torch.get_num_threads()

    started = time.perf_counter()
    print(machine_line())
    print(f"load average (1/5/15 min) at start: {load_text()}")
    load = load_average()
    if load is not None and load[0] > (os.cpu_count() or 1):
        print(f"WARNING: load {load[0]:.1f} exceeds {os.cpu_count()} CPUs: timings will be noisy")
    print(
        f"dtype {args.dtype}, {args.clock} clock, {repeats} timed repeats after one warm-up, "
        "medians; "
        f"{NUM_VECTORS} vectors per matmat{'; QUICK smoke run' if args.quick else ''}"
    )
    all_rows, all_checks = [], []
    for case in build_cases(args.quick):
        sizes = ", ".join(str(len(targets)) for _, targets in case.data)
        print(f"measuring {case.name}: batches of {sizes} samples ...", end=" ", flush=True)
        case_started = time.perf_counter()
        rows, checks = measure(case, dtype, repeats, CLOCKS[args.clock])
        print(f"{time.perf_counter() - case_started:.0f} s", flush=True)
        all_rows += rows
        all_checks.append((case.name, checks))

    header = (
        f"{'model':<24} {'params':>9} {'dtype':<8} {'thr':>3}  {'product':<19} "
        f"{args.clock + ' s':>9} {'x grad':>7}  {'target x grad':<19} {''}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, n, product, median, ratio, target_text, verdict in all_rows:
        print(
            f"{name:<24} {n:>9,} {args.dtype:<8} {threads:>3}  {product:<19} "
            f"{median:>9.4f} {ratio:>7.2f}  {target_text:<19} {verdict}"
        )
    eps = torch.finfo(dtype).eps
    print()
    print(f"sanity: relative differences (Frobenius), expected a small multiple of eps={eps:.1e}")
    for name, checks in all_checks:
        text = ", ".join(f"{label} {value:.1e}" for label, value in checks.items())
        print(f"  {name:<24} {text}")
    print(f"\nload average (1/5/15 min) at end: {load_text()}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
