"""Cost of exact Hessian-vector products on the model zoo, relative to one gradient, on this CPU.

The architectures are those of the compatibility suite (``tests/zoo/zoo_models.py``: the
tests check their products against double-backward and finite-difference references), built
here at sizes that suit a 2-core CPU in float64 (curvscope's CPU default; ``--dtype float32``
for the other). For each model the script measures:

- ``grad``: one gradient of the mean loss over the whole data: per batch, the operator's
  forward (``op.batch_loss``, on its float64 parameter copies, with the kernels products use:
  attention on the MATH backend, recurrent layers without oneDNN) and one
  ``torch.autograd.grad``, accumulated with weights |b| / N. This is the unit of the ratios.
- ``plain grad``: the same gradient through a float64 copy of the model called directly, with
  PyTorch's default kernels (fused flash attention, oneDNN RNNs): what the analysis-friendly
  kernels cost by themselves.
- ``HVP kept``: one ``op @ v`` with ``keep_graphs=True``: every batch's gradient graph is kept
  across products (built by a warm-up product), so a product is one double backward per batch.
- ``HVP rebuilt``: one ``op @ v`` with ``keep_graphs=False``: forward, backward and double
  backward per batch.

Timing: one subprocess per model; every alternative runs once untimed, then ``--repeats`` times
with the order rotated from one repeat to the next; the table shows medians (seconds) and the
ratios of the product medians to the gradient median. The target is a product within 2.5
gradients with kept graphs. On a busy machine other processes steal time and torch's threads
wait for each other; ``--threads 1 --clock cpu`` then counts only the CPU time of the process
itself (with several threads, CPU time would include threads spinning at barriers).

Peak memory: torch allocates outside Python's heap, so ``tracemalloc`` cannot see it; the
script reads the process's resident set size from ``/proc/self/status``. Each phase (gradient,
product with rebuilt graphs, products with kept graphs) runs in a fresh subprocess that builds
the model, the data and the operator, resets the kernel's high-water mark (``echo 5 >
/proc/self/clear_refs``), notes the resident size, runs the phase (for kept graphs: two
products, the second one on the kept graphs) and reports ``VmHWM`` minus the resident size
before the phase: the extra memory the phase needed at its peak, including the kept graphs.
Where the high-water mark cannot be reset, ``resource.getrusage`` ``ru_maxrss`` minus the
resident size after the build is used (then the build's own peak may show). Before the
phase, ``malloc_trim(0)`` hands the memory that malloc kept from freed blocks (the build's
forward passes) back to the system, so that the phase cannot reuse it unseen.
Before the build, a gradient and products on a tiny MLP load what a process's first product
loads (``torch.autograd.grad`` with ``grad_outputs`` imports sympy: ~40 MiB, once).

Run from the repository root::

    .venv/bin/python benchmarks/zoo_cost.py                 # all models, ~15 minutes on 2 cores
    .venv/bin/python benchmarks/zoo_cost.py --threads 1 --clock cpu   # on a busy machine
    .venv/bin/python benchmarks/zoo_cost.py --threads 1 --clock cpu --tune-malloc
    .venv/bin/python benchmarks/zoo_cost.py --quick         # tiny sizes: a smoke run
    .venv/bin/python benchmarks/zoo_cost.py --models gpt2,lstm --repeats 7
    .venv/bin/python benchmarks/zoo_cost.py --profile gpt2  # torch.profiler tables for one model

Page faults: with glibc's default settings, a freed block of more than a few MiB goes back to
the system, and the next allocation of that size is fresh pages that the kernel must zero on
first touch. Products allocate many such temporaries (the composite double-backward formulas of
the normalization layers: ~20 activation-sized tensors per layer), so they can spend as much
CPU time in page faults as in arithmetic (GroupNorm CNN: 98,000 minor faults, 0.20 s system vs
0.16 s user time per product). ``--tune-malloc`` runs the measurements with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=8589934592`` (blocks up to 32 MiB
from the heap, freed memory kept for reuse), which users can set as well (or preload jemalloc
or tcmalloc); the peak memory then includes what malloc keeps.

Hugging Face models need ``transformers`` and ResNet-18 ``torchvision``; a model whose package
is missing is reported as skipped. Timings are only as good as the machine is quiet: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT / "tests", ROOT / "tests" / "zoo"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import zoo_models as zm  # noqa: E402
from zoo_models import ZooCase  # noqa: E402

from curvscope import HessianOperator  # noqa: E402
from curvscope.operators.batches import call_model  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: glibc malloc settings of ``--tune-malloc``: blocks up to 32 MiB come from the heap (not from
#: a fresh mmap each time) and freed memory is not handed back to the system.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**33)}
TARGET = 2.5  # product (kept graphs) / gradient


def _batches(num: int, size: int) -> tuple[int, ...]:
    return tuple([size] * (num // size) + ([num % size] if num % size else []))


# name -> (realistic builder, quick builder)
MODELS: dict[str, tuple[Callable[[], ZooCase], Callable[[], ZooCase]]] = {
    "mlp": (
        lambda: zm.mlp(batch_sizes=(256,), hidden=(512, 512), digits=True),
        lambda: zm.mlp(batch_sizes=(16, 8)),
    ),
    "cnn_bn_train": (
        lambda: zm.cnn_bn(True, batch_sizes=(64, 64), channels=32, image=32, classes=10),
        lambda: zm.cnn_bn(True),
    ),
    "cnn_bn_eval": (
        lambda: zm.cnn_bn(False, batch_sizes=(64, 64), channels=32, image=32, classes=10),
        lambda: zm.cnn_bn(False),
    ),
    "resnet18": (
        lambda: zm.resnet18(train=True, batch_sizes=(32, 32), image=32, classes=10),
        lambda: zm.resnet18(train=True, batch_sizes=(2, 2), image=16),
    ),
    "lstm": (
        lambda: zm.recurrent(
            "lstm", batch_sizes=(64,) * 4, features=32, hidden=128, layers=2, seq_len=32
        ),
        lambda: zm.recurrent("lstm"),
    ),
    "gru": (
        lambda: zm.recurrent(
            "gru", batch_sizes=(64,) * 4, features=32, hidden=128, layers=2, seq_len=32
        ),
        lambda: zm.recurrent("gru"),
    ),
    "transformer_encoder": (
        lambda: zm.transformer_encoder(
            batch_sizes=(32,) * 4, features=32, d_model=128, nhead=4, layers=2, ff=512, seq_len=32
        ),
        lambda: zm.transformer_encoder(),
    ),
    "multihead_attention": (
        lambda: zm.multihead_attention(
            batch_sizes=(32,) * 4, features=32, d_model=128, nhead=4, seq_len=32
        ),
        lambda: zm.multihead_attention(),
    ),
    "gpt2": (
        lambda: zm.gpt2(
            batch_sizes=(16,) * 4,
            n_layer=4,
            n_embd=128,
            n_head=4,
            vocab=1000,
            n_positions=64,
            seq_len=32,
        ),
        lambda: zm.gpt2(),
    ),
    "bert_classification": (
        lambda: zm.bert(
            "classification",
            batch_sizes=(16,) * 4,
            hidden=128,
            layers=4,
            heads=4,
            intermediate=512,
            vocab=1000,
            max_positions=64,
            seq_len=32,
        ),
        lambda: zm.bert("classification"),
    ),
    "bert_masked": (
        lambda: zm.bert(
            "masked",
            batch_sizes=(16,) * 4,
            hidden=128,
            layers=4,
            heads=4,
            intermediate=512,
            vocab=1000,
            max_positions=64,
            seq_len=32,
        ),
        lambda: zm.bert("masked"),
    ),
    "layernorm_mlp": (
        lambda: zm.layernorm_mlp(batch_sizes=(256,) * 4, features=64, hidden=512, classes=10),
        lambda: zm.layernorm_mlp(),
    ),
    "groupnorm_cnn": (
        lambda: zm.groupnorm_cnn(batch_sizes=(64, 64), channels=32, groups=8, image=32, classes=10),
        lambda: zm.groupnorm_cnn(),
    ),
    "weight_norm_mlp": (
        lambda: zm.weight_norm_mlp(batch_sizes=(256,) * 4, features=64, hidden=512, classes=10),
        lambda: zm.weight_norm_mlp(),
    ),
    "embedding": (
        lambda: zm.embedding_bag(
            batch_sizes=(128,) * 4, vocab=5000, dim=64, seq_len=32, classes=10
        ),
        lambda: zm.embedding_bag(),
    ),
}

MISSING = {"resnet18": "torchvision", "gpt2": "transformers"}
MISSING.update({name: "transformers" for name in MODELS if name.startswith("bert")})


# ----- what one subprocess measures ------------------------------------------------------------


def make_operator(case: ZooCase, dtype: torch.dtype, keep_graphs: bool) -> HessianOperator:
    return HessianOperator(
        case.model,
        case.loss_fn,
        case.batches,
        dtype=dtype,
        unpack_batch=case.unpack,
        keep_graphs=keep_graphs,
    )


def gradient(op: HessianOperator) -> torch.Tensor:
    """Full-data gradient through the operator's own forward path (module docstring)."""
    leaves = op.function.param_list()
    total = torch.zeros(op.num_params, dtype=op.dtype)
    num = 0
    with torch.enable_grad():
        for batch in op.source:
            grads = torch.autograd.grad(
                op.batch_loss(batch), leaves, allow_unused=True, materialize_grads=True
            )
            total.add_(torch.cat([g.reshape(-1) for g in grads]), alpha=float(batch.size))
            num += batch.size
    return total.div_(num)


def plain_gradient(model: torch.nn.Module, op: HessianOperator, loss_fn: Any) -> torch.Tensor:
    """Full-data gradient of ``model`` (a copy in the operator's dtype) called directly."""
    leaves = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(op.num_params, dtype=op.dtype)
    num = 0
    with torch.enable_grad():
        for batch in op.source:
            loss = loss_fn(call_model(model, batch.inputs), batch.targets)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            total.add_(torch.cat([g.reshape(-1) for g in grads]), alpha=float(batch.size))
            num += batch.size
    return total.div_(num)


def probe(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_model(case: ZooCase, dtype: torch.dtype, repeats: int, clock: str) -> dict[str, Any]:
    """Medians of the four alternatives, each warmed up once, the order rotated per repeat."""
    kept = make_operator(case, dtype, keep_graphs=True)
    rebuilt = make_operator(case, dtype, keep_graphs=False)
    plain = copy.deepcopy(case.model).to(dtype)
    v = probe(kept.num_params, dtype)
    work: dict[str, Callable[[], Any]] = {
        "grad": lambda: gradient(kept),
        "plain grad": lambda: plain_gradient(plain, kept, case.loss_fn),
        "HVP kept": lambda: kept @ v,
        "HVP rebuilt": lambda: rebuilt @ v,
    }
    first = {name: fn() for name, fn in work.items()}  # warm-up; the kept graphs are built
    if not torch.equal(first["HVP kept"], rebuilt @ v):
        raise AssertionError("kept and rebuilt graphs gave different products")
    times: dict[str, list[float]] = {name: [] for name in work}
    names = list(work)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = CLOCKS[clock]()
            work[name]()
            times[name].append(CLOCKS[clock]() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give the memory malloc keeps from freed blocks back to the system (glibc only), so that
    a phase cannot reuse it unseen."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def warm_up(dtype: torch.dtype) -> None:
    """A gradient and products on a tiny MLP: loads what the first product of a process loads
    (torch.autograd.grad with grad_outputs imports sympy, ~40 MiB), so that it does not count
    as the measured phase's memory."""
    op = make_operator(zm.mlp(), dtype, keep_graphs=True)
    gradient(op)
    op.matmat(torch.ones(op.num_params, 2, dtype=dtype))


def measure_memory(case: ZooCase, dtype: torch.dtype, phase: str) -> dict[str, Any]:
    """Extra peak resident memory (MiB) of one phase over the resident size before it."""
    warm_up(dtype)
    op = make_operator(case, dtype, keep_graphs=(phase == "HVP kept"))
    v = probe(op.num_params, dtype)
    _trim_heap()
    before = _status_kib("VmRSS") or 0
    method = "VmHWM" if _reset_peak() and _status_kib("VmHWM") is not None else "ru_maxrss"
    if phase == "grad":
        gradient(op)
    elif phase == "HVP rebuilt":
        op @ v
    else:
        op @ v  # builds and keeps every batch's graph
        op @ v  # runs on the kept graphs
    if method == "VmHWM":
        peak = _status_kib("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"extra_mib": (peak - before) / 1024, "rss_before_mib": before / 1024, "method": method}


def profile_model(case: ZooCase, dtype: torch.dtype) -> None:
    """torch.profiler tables of one gradient and one product on kept graphs."""
    from torch.profiler import ProfilerActivity, profile

    op = make_operator(case, dtype, keep_graphs=True)
    v = probe(op.num_params, dtype)
    op @ v
    gradient(op)
    for label, fn in (("gradient", lambda: gradient(op)), ("HVP, kept graphs", lambda: op @ v)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== {case.name}: {label}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    case = MODELS[args.model][1 if args.quick else 0]()
    dtype = DTYPES[args.dtype]
    if args.worker == "time":
        result: dict[str, Any] = {
            "description": case.description,
            "n": case.num_params,
            "N": case.num_samples,
            "batches": len(case.batches),
            "median_s": time_model(case, dtype, args.repeats, args.clock),
        }
    elif args.worker == "profile":
        profile_model(case, dtype)
        return
    else:
        result = measure_memory(case, dtype, args.worker)
    print("RESULT " + json.dumps(result))


# ----- the parent: one subprocess per model and phase, then the table --------------------------


def run_worker(args: argparse.Namespace, model: str, kind: str) -> dict[str, Any] | str:
    """Run one measurement in a fresh interpreter; its result, or why there is none."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--model",
        model,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads or 0),
    ]
    if args.quick:
        command.append("--quick")
    env = {**os.environ, **(TUNED_MALLOC if args.tune_malloc else {})}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed ({last[:160]})"


def available(model: str) -> str | None:
    """None when the model can be built here, else the missing package."""
    package = MISSING.get(model)
    if package is None:
        return None
    import importlib.util

    return None if importlib.util.find_spec(package) is not None else package


def print_table(rows: list[dict[str, Any]], dtype: str) -> None:
    header = (
        "| model | n | N | grad s | plain grad s | HVP kept s | kept / grad | HVP rebuilt s | "
        "rebuilt / grad | peak MiB grad / rebuilt / kept |"
    )
    print(f"\nProducts vs gradients, {dtype}, medians of the repeats:\n")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in rows:
        if "skipped" in row:
            print(f"| {row['name']} | {row['skipped']} |" + " |" * (header.count("|") - 3))
            continue
        t = row["median_s"]
        kept, rebuilt = t["HVP kept"] / t["grad"], t["HVP rebuilt"] / t["grad"]
        flag = "" if kept <= TARGET else " (miss)"
        mem = " / ".join(
            f"{row['memory'][p]:.0f}" if isinstance(row["memory"][p], float) else "?"
            for p in ("grad", "HVP rebuilt", "HVP kept")
        )
        print(
            f"| {row['name']}: {row['description']} | {row['n']:,} | {row['N']} "
            f"| {t['grad']:.3f} | {t['plain grad']:.3f} | {t['HVP kept']:.3f} "
            f"| {kept:.2f}{flag} | {t['HVP rebuilt']:.3f} | {rebuilt:.2f} | {mem} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float64")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (robust on a busy machine with "
        "--threads 1)",
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="run the measurements with glibc malloc keeping freed memory (no page faults on "
        "reallocation; see the module docstring)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--profile", metavar="MODEL", help="print profiler tables for MODEL")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.profile:
        args.worker, args.model = "profile", args.profile
        worker(args)
        return
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}, "
        f"dtype {args.dtype}, repeats {args.repeats}, {args.clock} clock, "
        f"malloc {'tuned' if args.tune_malloc else 'default'}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for name in names:
        missing = available(name)
        if missing:
            rows.append({"name": name, "skipped": f"skipped: {missing} is not installed"})
            print(f"{name}: skipped ({missing} is not installed)", flush=True)
            continue
        start = time.perf_counter()
        timing = run_worker(args, name, "time")
        if isinstance(timing, str):
            rows.append({"name": name, "skipped": timing})
            print(f"{name}: {timing}", flush=True)
            continue
        memory = {}
        for phase in ("grad", "HVP rebuilt", "HVP kept"):
            result = run_worker(args, name, phase)
            memory[phase] = result["extra_mib"] if isinstance(result, dict) else result
        rows.append({"name": name, **timing, "memory": memory})
        t = timing["median_s"]
        print(
            f"{name}: n={timing['n']:,} grad {t['grad']:.3f}s, HVP kept "
            f"{t['HVP kept'] / t['grad']:.2f}x, rebuilt {t['HVP rebuilt'] / t['grad']:.2f}x "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    print_table(rows, args.dtype)
    print(
        f"\nTarget: HVP with kept graphs <= {TARGET} gradients. Peak MiB: extra resident memory "
        "of one phase at its peak (gradient / product with rebuilt graphs / products with kept "
        f"graphs), a fresh process each. Load average after: {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
