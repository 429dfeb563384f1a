"""Seconds of a CLI-like workload under torch's thread settings, with and without a competing
CPU-bound process on the machine.

Settings, each run in a fresh Python process so that its environment is in place before torch
(and with it the OpenMP runtime, which reads the environment once, when it loads) is imported:

- ``1 thread``: ``torch.set_num_threads(1)``;
- ``torch default``: nothing set (torch's thread count; GNU OpenMP's idle threads spin
  GOMP_SPINCOUNT = 300000 times, about 3 ms, before they sleep);
- ``torch default, KMP_BLOCKTIME=0``: Intel OpenMP's knob, to check whether it matters here;
- ``curvscope default``: what the ``curvscope`` program sets where the user has not
  (``curvscope.program.THREAD_ENV`` in the environment before torch loads, and
  ``torch.set_num_threads(curvscope.resources.available_cpus())``).

The ``spin`` column is the spin count the OpenMP runtime reports it uses
(``OMP_DISPLAY_ENV=VERBOSE``). ``competitor`` runs one pure-Python busy loop per CPU this
process may use beside the setting's process (started before it, killed after it); ``alone``
runs none, but other users of the machine are not stopped: the load average is printed.

The workload is what ``curvscope top``/``trace`` and ``density`` do: the float64
``HessianOperator`` of a digits MLP (``curvscope.zoo.digits_mlp``, all 1,797 digits in batches
of 256), Hessian-vector products one after another, then ``spectral_density``, on two
problems: ``small``, the MLP of the built-in problem (64-32-32-10, n = 3,466; 20 products, then
2 probes x 10 Lanczos steps) and ``wide`` (64-512-512-10, n = 301,066; 4 products, then 2 x 3).
Each process runs it once untimed, then ``--repeats`` times; every setting runs in
``--rounds`` processes, the rounds in rotated order so that each setting meets the machine's
other load at several times. The table gives the median and the largest seconds over all timed
runs of a setting, and the ratio of the medians to one thread under the same load. The last
line gives the start-up of the program with OMP_WAIT_POLICY unset and set (``python -m
curvscope top --loss hinge``, a command that stops right after parsing): the program sets the
variable before torch loads (curvscope.program), so the two should be equal.

Run from the repository root::

    .venv/bin/python benchmarks/threads.py                 # ~35 minutes on 2 loaded cores
    .venv/bin/python benchmarks/threads.py --quick         # smoke run, a few minutes
    .venv/bin/python benchmarks/threads.py --problems wide
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from curvscope.program import THREAD_ENV
from curvscope.resources import available_cpus

#: Variables every setting starts without (a user's shell usually has none of them).
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_BLOCKTIME")

#: Problem name -> (hidden widths, products, Lanczos steps, probes).
PROBLEMS = {"small": ((32, 32), 20, 10, 2), "wide": ((512, 512), 4, 3, 2)}

CHILD = r"""
import json, sys, time
config = json.loads(sys.argv[1])
import torch
if config["threads"]:
    torch.set_num_threads(config["threads"])
from torch.nn import functional as F
from curvscope import HessianOperator, spectral_density
from curvscope.zoo import digits_data, digits_mlp

model = digits_mlp(hidden=tuple(config["hidden"]), seed=0)
op = HessianOperator(model, F.cross_entropy, digits_data(batch_size=256))
v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=op.dtype)

def workload():
    started = time.perf_counter()
    for _ in range(config["hvps"]):
        op.matvec(v)
    spectral_density(op, num_iters=config["iters"], num_probes=config["probes"], seed=0)
    return time.perf_counter() - started

workload()
times = [workload() for _ in range(config["repeats"])]
print(json.dumps({"times": times, "threads": torch.get_num_threads(), "n": op.shape[0]}))
"""


@dataclass
class Setting:
    """One thread setting: environment before torch loads and a thread count."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None


def settings() -> list[Setting]:
    return [
        Setting("1 thread", threads=1),
        Setting("torch default"),
        Setting("torch default, KMP_BLOCKTIME=0", env={"KMP_BLOCKTIME": "0"}),
        Setting("curvscope default", env=dict(THREAD_ENV), threads=available_cpus()),
    ]


def clean_environment(extra: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    environ.update(extra)
    return environ


def start_competitors(count: int) -> list[subprocess.Popen]:
    """``count`` pure-Python busy loops (one CPU each)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


@dataclass
class Run:
    """What one process of a setting reported."""

    times: list[float]
    threads: int
    spin: str
    n: int


def run_setting(setting: Setting, problem: str, args: argparse.Namespace, busy: bool) -> Run:
    """The timed workloads of one fresh process with ``setting``."""
    hidden, hvps, iters, probes = PROBLEMS[problem]
    if args.quick:
        hvps, iters, probes = max(1, hvps // 4), max(1, iters // 3), 1
    config = {
        "threads": setting.threads,
        "hidden": hidden,
        "hvps": hvps,
        "iters": iters,
        "probes": probes,
        "repeats": args.repeats,
    }
    competitors = start_competitors(available_cpus()) if busy else []
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(config)],
            env=clean_environment({**setting.env, "OMP_DISPLAY_ENV": "VERBOSE"}),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        stop(competitors)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    spins = [
        line.split("=", 1)[1].strip().strip("'")
        for line in done.stderr.splitlines()
        if line.strip().startswith("GOMP_SPINCOUNT")
    ]
    return Run(result["times"], int(result["threads"]), spins[-1] if spins else "?", result["n"])


def startup_cost(repeats: int) -> tuple[float, float]:
    """Median seconds of ``python -m curvscope top --loss hinge`` with OMP_WAIT_POLICY unset
    (the program sets it before torch loads) and set by the user."""
    command = [sys.executable, "-m", "curvscope", "top", "--loss", "hinge"]
    medians = []
    for env in ({}, dict(THREAD_ENV)):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, env=clean_environment(env), capture_output=True, check=False)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return medians[0], medians[1]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )


def measure(problem: str, args: argparse.Namespace) -> None:
    combos = [(setting, busy) for setting in settings() for busy in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {(s.name, b): [] for s, b in combos}
    runs: dict[str, Run] = {}
    for round_ in range(args.rounds):
        # rotated order: every combination meets the machine's other load at another time
        shift = round_ * len(combos) // args.rounds
        for setting, busy in combos[shift:] + combos[:shift]:
            run = run_setting(setting, problem, args, busy)
            times[setting.name, busy] += run.times
            runs[setting.name] = run
        print(f"  {problem}: round {round_ + 1}/{args.rounds} done (load {load()})", flush=True)
    n = next(iter(runs.values())).n
    median = {key: statistics.median(values) for key, values in times.items()}
    one = {busy: median["1 thread", busy] for busy in (False, True)}
    rows = [("setting", "threads", "spin", "alone s", "competitor s", "alone", "competitor")]
    rows.append(("", "", "", "median (max)", "median (max)", "/ 1 thread", "/ 1 thread"))
    for setting in settings():
        run = runs[setting.name]
        cells = [setting.name, str(run.threads), run.spin]
        for busy in (False, True):
            cells.append(f"{median[setting.name, busy]:.2f} ({max(times[setting.name, busy]):.2f})")
        cells += [f"{median[setting.name, busy] / one[busy]:.2f}" for busy in (False, True)]
        rows.append(tuple(cells))
    print(f"{problem} (n = {n:,}), load average now {load()}")
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS), help="(both)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process (2)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting (3)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the work, 1 x 1")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds = 1, 1

    import torch

    cpus = available_cpus()
    print(
        f"torch {torch.__version__}, {cpus} CPUs for this process (os.sched_getaffinity), "
        f"torch's default {torch.get_num_threads()} threads; "
        + ", ".join(
            line.strip()
            for line in torch.__config__.parallel_info().splitlines()
            if "backend" in line or line.startswith("OpenMP")
        )
    )
    print(
        f"median and largest of {args.rounds} processes x {args.repeats} runs after a warm-up "
        f"each; competitor = {cpus} pure-Python busy loops; load average before: {load()}"
    )
    for problem in args.problems:
        measure(problem, args)
    unset, preset = startup_cost(max(3, args.repeats * args.rounds))
    print(
        f"start-up of the program: {unset:.2f} s with OMP_WAIT_POLICY unset, {preset:.2f} s with "
        f"it set ({unset - preset:+.2f} s)"
    )


if __name__ == "__main__":
    main()
