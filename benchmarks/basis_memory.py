"""Peak RSS of an SLQ density run with the Lanczos basis in RAM vs on disk.

Only the basis storage is measured, so the operator is a cheap matrix-free diagonal one with a
planted spectrum (float64, n entries: a bulk spread over [0, 1] plus three outliers 5, 10, 20);
it costs one n-vector, the "model". Each configuration (basis kind x steps) runs
:func:`curvscope.linalg.slq.spectral_density` in a fresh subprocess, which reports

- ``VmHWM``: the kernel's peak resident set size of the child (anonymous memory *and*
  file-backed pages mapped into it, e.g. memmap pages read back);
- peak ``RssAnon`` / ``RssFile``: the two parts of RSS, sampled every 10 ms by a thread, so a
  large RSS of the disk basis can be told apart into heap copies and mapped file pages;
- the RSS before the run (interpreter, torch, the operator) and the wall time of the run.

The parent prints one table (sizes also in n-vectors of 8n bytes), the ratio of each disk run's
peak to the memory run's at the same steps, and checks that both kinds give the same quadrature
nodes (max |difference| <= 1e-10 x the largest |node|). The memory basis runs all probes in one
lockstep group (``max_basis_bytes`` is raised to fit), so the two kinds do the same arithmetic.
Configurations at one step count alternate which kind runs first.

Run from the repository root::

    .venv/bin/python benchmarks/basis_memory.py                 # n=10M, 90 steps: ~10 min idle
    .venv/bin/python benchmarks/basis_memory.py --steps 8 16    # docs/memory.md, ~8 min
    .venv/bin/python benchmarks/basis_memory.py --n 100000 --steps 10   # smoke run, seconds

The disk basis is written to ``--basis-dir`` (default: a temporary folder under /tmp, removed at
the end); it needs ``steps x probes x n x 8`` bytes of free disk, and the memory run needs about
three times that in free RAM, as its reorthogonalization copies the basis (see docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

KINDS = ("memory", "disk")
OUTLIERS = (5.0, 10.0, 20.0)


class PlantedDiagonal:
    """Diagonal symmetric operator of size n with a planted spectrum, behind the operator
    protocol (``shape``, ``dtype``, ``device``, ``matmat`` on (n, k) blocks).

    Eigenvalues: ``n - 3`` values evenly spread over [0, 1], then 5, 10 and 20. Memory: one
    float64 n-vector.
    """

    def __init__(self, n: int) -> None:
        diagonal = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        diagonal[-len(OUTLIERS) :] = torch.tensor(OUTLIERS, dtype=torch.float64)
        self.diagonal = diagonal
        self.shape = (n, n)
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.diagonal[:, None] * V


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status in bytes (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class PeakSampler(threading.Thread):
    """Samples RssAnon and RssFile every ``interval`` seconds and keeps their peaks."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            status = proc_status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status.get(key, 0))
            self.halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self.halt.set()
        self.join()
        return self.peaks


def child(args: argparse.Namespace) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    from curvscope.linalg.slq import spectral_density

    torch.set_num_threads(args.threads)
    op = PlantedDiagonal(args.n)
    before = proc_status()["VmRSS"]
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    density = spectral_density(
        op,
        num_iters=args.steps,
        num_probes=args.probes,
        seed=0,
        basis=args.kind,
        basis_dir=args.basis_dir,
        max_basis_bytes=args.steps * args.probes * args.n * 8,
    )
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    status = proc_status()
    report = {
        "kind": args.kind,
        "n": args.n,
        "steps": args.steps,
        "probes": args.probes,
        "before": before,
        "vm_hwm": status["VmHWM"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": peaks["RssAnon"],
        "peak_file": peaks["RssFile"],
        "wall_s": wall,
        "lockstep": density.meta["probes_in_lockstep"],
        "nodes": density.nodes.tolist(),
    }
    print(json.dumps(report))


def run_child(kind: str, n: int, steps: int, probes: int, basis_dir: Path, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(n),
        "--steps",
        str(steps),
        "--probes",
        str(probes),
        "--basis-dir",
        str(basis_dir),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {platform.platform()} | cpu: {cpu} | os.cpu_count()={os.cpu_count()} | "
        f"RAM {total:.1f} GiB | torch {torch.__version__} | "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f}"


def vectors(num_bytes: float, n: int) -> str:
    return f"{num_bytes / (8 * n):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="operator size (parameters)")
    parser.add_argument("--steps", type=int, nargs="+", default=[90], help="Lanczos steps")
    parser.add_argument("--probes", type=int, default=1, help="probes in lockstep")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--basis-dir", type=Path, default=None, help="folder of the disk basis")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each run (memory does not depend on it; 1 avoids OpenMP "
        "spin-waits inflating the wall time on a shared machine)",
    )
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.kind = args.child
        args.steps = args.steps[0]
        child(args)
        return

    own_dir = args.basis_dir is None
    basis_dir = Path(tempfile.mkdtemp(prefix="basis_memory_")) if own_dir else args.basis_dir
    basis_dir.mkdir(parents=True, exist_ok=True)
    n, probes = args.n, args.probes
    print(machine_line())
    print(
        f"operator: planted diagonal, float64, n={n:,}; SLQ seed 0, {probes} probe(s) in "
        f"lockstep; {args.threads} torch thread(s) per run; one n-vector = "
        f"{8 * n / 2**20:.0f} MiB; basis dir {basis_dir} "
        f"(free disk {shutil.disk_usage(basis_dir).free / 2**30:.0f} GiB)"
    )
    reports = []
    try:
        for i, steps in enumerate(args.steps):
            kinds = args.kinds if i % 2 == 0 else args.kinds[::-1]
            for kind in kinds:
                report = run_child(kind, n, steps, probes, basis_dir, args.threads)
                reports.append(report)
                print(
                    f"  done: {kind:6s} steps={steps:3d} peak RSS {gib(report['vm_hwm'])} GiB "
                    f"in {report['wall_s']:.1f} s",
                    flush=True,
                )
    finally:
        if own_dir:
            shutil.rmtree(basis_dir, ignore_errors=True)
        leftovers = list(basis_dir.glob("**/*.f64")) if basis_dir.exists() else []
        if leftovers:
            print(f"warning: basis files left behind: {leftovers}")

    header = (
        f"{'basis':6s} {'n':>11s} {'steps':>5s} {'probes':>6s} {'basis GiB':>9s} "
        f"{'RSS before':>10s} {'peak RSS (VmHWM)':>16s} {'peak anon':>9s} {'peak file':>9s} "
        f"{'peak-before':>11s} {'wall s':>7s}"
    )
    print()
    print("sizes in GiB; peak-before also in n-vectors (8n bytes) in brackets")
    print(header)
    print("-" * len(header))
    for r in reports:
        basis_bytes = r["steps"] * r["probes"] * r["n"] * 8
        grown = r["vm_hwm"] - r["before"]
        print(
            f"{r['kind']:6s} {r['n']:>11,} {r['steps']:>5d} {r['probes']:>6d} "
            f"{gib(basis_bytes):>9s} {gib(r['before']):>10s} {gib(r['vm_hwm']):>16s} "
            f"{gib(r['peak_anon']):>9s} {gib(r['peak_file']):>9s} "
            f"{gib(grown) + ' [' + vectors(grown, r['n']) + ']':>11s} {r['wall_s']:>7.1f}"
        )

    print()
    for steps in args.steps:
        by_kind = {r["kind"]: r for r in reports if r["steps"] == steps}
        if len(by_kind) < 2:
            continue
        memory, disk = by_kind["memory"], by_kind["disk"]
        a, b = np.array(memory["nodes"]), np.array(disk["nodes"])
        scale = np.nanmax(np.abs(a))
        diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("inf")
        same = diff <= 1e-10 * scale and np.array_equal(np.isnan(a), np.isnan(b))
        print(
            f"steps={steps}: disk/memory peak RSS {disk['vm_hwm'] / memory['vm_hwm']:.2f}x, "
            f"peak anon {disk['peak_anon'] / memory['peak_anon']:.2f}x, "
            f"wall {disk['wall_s'] / memory['wall_s']:.2f}x; "
            f"max |node difference| {diff:.1e} (largest |node| {scale:.3g}) "
            f"-> {'same nodes' if same else 'NODES DIFFER'}; "
            f"largest node {scale:.12g} (planted {max(OUTLIERS)})"
        )


if __name__ == "__main__":
    main()
