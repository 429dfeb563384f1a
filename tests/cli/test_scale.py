"""The CLI's scale features: a resumable density run, and the same command under torchrun with
two CPU processes giving the single-process numbers, written once by rank 0."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from clitools import QUIET

from curvscope import SpectralDensity
from curvscope.cli import main

PROBLEM = ["--model", "usermod:build", "--data", "usermod:batches", "--loss", "mse"]


def test_checkpointed_density_resumes_to_the_same_numbers(user_module, tmp_path):
    out = tmp_path / "ckpt"
    args = ["density", *PROBLEM, *QUIET, "--iters", "12", "--probes", "3", "--out", str(out)]
    assert main([*args, "--checkpoint"]) == 0
    first = SpectralDensity.load(out / "density")
    assert (out / "checkpoint" / "state.json").exists()
    assert main([*args, "--resume"]) == 0  # a finished run resumes to itself
    again = SpectralDensity.load(out / "density")
    np.testing.assert_array_equal(first.nodes, again.nodes)
    assert again.meta["resumed"] is True
    plain_out = tmp_path / "plain"
    assert (
        main(
            ["density", *PROBLEM, *QUIET, "--iters", "12", "--probes", "3", "--out", str(plain_out)]
        )
        == 0
    )
    plain = SpectralDensity.load(plain_out / "density")
    assert np.nanmax(np.abs(plain.nodes - first.nodes)) <= 1e-10 * np.nanmax(np.abs(plain.nodes))


def test_torchrun_two_processes_match_one(user_module, tmp_path):
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    common = ["density", *PROBLEM, *QUIET, "--iters", "10", "--probes", "2", "--threads", "1"]
    assert main([*common, "--out", str(single_out)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module.parent), *sys.path])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def launch_density(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*launch, "-m", "curvscope", *common, "--out", str(multi_out), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = launch_density("--checkpoint")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("curvscope density:") == 1  # only rank 0 reports and writes
    single = SpectralDensity.load(single_out / "density")
    multi = SpectralDensity.load(multi_out / "density")
    scale = np.nanmax(np.abs(single.nodes))
    assert np.nanmax(np.abs(multi.nodes - single.nodes)) <= 1e-10 * scale
    assert "20 samples" in done.stdout  # the all-reduced count, not one rank's shard
    # Each rank checkpoints into its own folder (no two processes write one file), and a
    # resumed run under torchrun ends with the same numbers.
    for r in (0, 1):
        assert (multi_out / "checkpoint" / f"rank{r}" / "state.json").is_file()
    assert not (multi_out / "checkpoint" / "state.json").exists()
    done = launch_density("--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = SpectralDensity.load(multi_out / "density")
    np.testing.assert_array_equal(resumed.nodes, multi.nodes)
    assert resumed.meta["resumed"] is True


def test_torchrun_decompose_matches_one_process(user_module, tmp_path):
    """curvscope decompose under torchrun: the H, G and H - G densities of one process,
    written once by rank 0."""
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    common = ["decompose", *PROBLEM, *QUIET, "--classes", "none", "--iters", "8", "--probes", "2"]
    common += ["--threads", "1"]
    assert main([*common, "--out", str(single_out)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module.parent), *sys.path])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launch, "-m", "curvscope", *common, "--out", str(multi_out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("curvscope decompose:") == 1  # only rank 0 reports and writes
    for term in ("hessian", "ggn", "residual"):
        single = SpectralDensity.load(single_out / f"density_{term}")
        multi = SpectralDensity.load(multi_out / f"density_{term}")
        scale = np.nanmax(np.abs(single.nodes))
        assert np.nanmax(np.abs(multi.nodes - single.nodes)) <= 1e-10 * scale, term
        assert multi.meta["num_samples"] == single.meta["num_samples"] == 20
