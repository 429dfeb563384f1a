"""Throughput of exact Hessian products on a ResNet-18 (11.2M parameters), synthetic images.

Issue 5 asks for the GPU path measured on a ResNet-18-sized model. This script builds the
CIFAR-style ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm) by hand
(torchvision is not a dependency), feeds it seeded synthetic images and random labels, and
times, in one process, on one device:

- ``gradient``: forward + backward over every batch (the unit of cost);
- ``HVP rebuilt``: one ``HessianOperator.matvec`` with ``keep_graphs=False``;
- ``HVP kept``: the same with every batch's graph kept (the default keeps those that fit);
- ``matmat(k) kept``: ``k`` vectors in lockstep through the kept graphs;
- ``SLQ step``: one Lanczos step of ``k`` probes (product + float64 reorthogonalization
  against ``--steps`` basis vectors, held in memory: m x k x n x 8 bytes), extrapolated to
  a full ``--steps`` x ``k`` density.

It prints medians, ratios to the gradient, samples x vectors per second, and peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on the CPU).

Run from the repository root::

    .venv/bin/python benchmarks/resnet_throughput.py --device cuda            # a GPU
    .venv/bin/python benchmarks/resnet_throughput.py --device cuda --bn eval --dtype float32
    .venv/bin/python benchmarks/resnet_throughput.py --quick                  # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from curvscope.operators import HessianOperator


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 11,173,962 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def synthetic_batches(
    num_samples: int, batch_size: int, size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(num_samples, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    return [
        (images[s : s + batch_size].to(device), labels[s : s + batch_size].to(device))
        for s in range(0, num_samples, batch_size)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (builds kept graphs, cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="product dtype (default: float32 on CUDA, float64 on the CPU)",
    )
    parser.add_argument(
        "--bn",
        choices=["train", "eval"],
        default="train",
        help="BatchNorm mode the Hessian is taken in (default: train)",
    )
    parser.add_argument("--samples", type=int, default=512, help="synthetic images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vectors", type=int, default=4, help="k: vectors / probes in lockstep")
    parser.add_argument("--steps", type=int, default=90, help="Lanczos steps m of the density")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: 32 images in batches of 16, k = 2, 3 repeats",
    )
    args = parser.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.vectors, args.repeats = 32, 16, 2, 3
        args.steps = 10
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.dtype or "")
    if dtype is None:
        dtype = torch.float32 if device.type == "cuda" else torch.float64

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNet18().to(device).train(args.bn == "train")
    data = synthetic_batches(args.samples, args.batch_size, args.image_size, device)
    n = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__} | {device} ({name or 'cpu'}) | threads "
        f"{torch.get_num_threads()} | ResNet-18, n = {n:,}, BatchNorm in {args.bn} mode | "
        f"{args.samples} synthetic {args.image_size}x{args.image_size} images in batches of "
        f"{args.batch_size} | products in {str(dtype).replace('torch.', '')}, recurrences "
        f"float64 | k = {args.vectors}, medians of {args.repeats}"
    )

    rebuilt = HessianOperator(model, F.cross_entropy, data, dtype=dtype, keep_graphs=False)
    # "auto" with an unbounded budget keeps every graph and counts their bytes.
    kept = HessianOperator(
        model, F.cross_entropy, data, dtype=dtype, keep_graphs="auto", graph_memory=1 << 62
    )
    k = args.vectors
    generator = torch.Generator().manual_seed(1)
    V = torch.randn(n, k, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    leaves = rebuilt.function.param_list()

    def gradient() -> None:
        with torch.enable_grad():
            for batch in rebuilt.source:
                torch.autograd.grad(rebuilt.batch_loss(batch), leaves)

    basis = torch.randn(args.steps, k, n, dtype=torch.float64, device=device)
    basis /= basis.norm(dim=2, keepdim=True)

    def slq_step() -> None:
        w = kept.matmat(V).T.to(torch.float64)
        for p in range(k):  # one reorthogonalization pass against m basis vectors
            rows = basis[:, p]
            w[p].addmv_(rows.T, torch.mv(rows, w[p]), alpha=-1.0)

    rows = [
        ("gradient", median_seconds(gradient, args.repeats, device), 1),
        ("HVP rebuilt", median_seconds(lambda: rebuilt.matvec(V[:, 0]), args.repeats, device), 1),
        ("HVP kept", median_seconds(lambda: kept.matvec(V[:, 0]), args.repeats, device), 1),
        (f"matmat({k}) kept", median_seconds(lambda: kept.matmat(V), args.repeats, device), k),
        (f"SLQ step (k={k}, m={args.steps})", median_seconds(slq_step, args.repeats, device), k),
    ]
    unit = rows[0][1]
    print(f"{'':34} {'seconds':>9} {'x grad':>7} {'samples*vectors/s':>18}")
    for label, seconds, vectors in rows:
        rate = args.samples * vectors / seconds
        print(f"{label:34} {seconds:9.4f} {seconds / unit:7.2f} {rate:18.1f}")
    density = rows[-1][1] * args.steps
    print(
        f"a full density of {args.steps} steps x {k} probes: about {density:.0f} s "
        f"({density / 60:.1f} min) for {args.samples} images; kept graphs hold "
        f"{kept.kept_graph_bytes / 2**30:.2f} GiB, the float64 basis "
        f"{basis.numel() * 8 / 2**30:.2f} GiB (basis='disk' keeps it in a file); peak memory "
        f"{peak_memory_gib(device):.2f} GiB"
    )


if __name__ == "__main__":
    main()
