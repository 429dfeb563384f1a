"""Two CPU processes (gloo), each on its shard of the batches, give the single-process
density, eigenvalues and products to 1e-10 relative."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import make_case

from curvscope import HessianOperator, spectral_density, top_eigenpairs
from curvscope.analysis.overlap import full_gradient
from curvscope.distributed import Shard, is_distributed, slurm_environment
from curvscope.operators.class_structure import class_decomposition
from curvscope.operators.ntk import ntk_trace
from curvscope.tracking import Tracker, load_run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(op: HessianOperator) -> dict[str, np.ndarray]:
    V = torch.randn(
        op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    density = spectral_density(op, num_iters=30, num_probes=3, seed=2)
    top = top_eigenpairs(op, k=2, tol=1e-10)
    return {
        "product": op.matmat(V).numpy(),
        "nodes": density.nodes,
        "weights": density.weights,
        "top": top.values,
        "num_samples": np.array([op.num_samples]),
    }


def worker(rank: int, world: int, port: int, out_dir: str, case_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert is_distributed()
        case = make_case(case_name)
        op = HessianOperator(case.model, case.loss_fn, Shard(case.batches))
        result = measure(op)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case_name", ["tanh_mlp_ce", "cnn_bn_train_ce"])
def test_two_processes_match_one(tmp_path, case_name):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), case_name), nprocs=2, join=True)
    case = make_case(case_name)
    single = measure(HessianOperator(case.model, case.loss_fn, case.batches))
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for key in ("product", "top", "nodes", "weights"):
        # both ranks hold bit-identical numbers: the all-reduce hands them the same sums
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        scale = np.nanmax(np.abs(single[key]))
        assert np.nanmax(np.abs(ranks[0][key] - single[key])) <= 1e-10 * scale, key
    assert ranks[0]["num_samples"][0] == single["num_samples"][0] == 21


def structure(model, loss_fn, data) -> dict[str, np.ndarray]:
    """NTK trace (exact), the class terms of G applied to fixed vectors, the full gradient."""
    ntk = ntk_trace(model, data, method="exact")
    terms = class_decomposition(model, loss_fn, data, loss="cross_entropy")
    V = torch.randn(
        terms.ggn.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    return {
        "ntk": np.array([ntk.value, ntk.num_samples, ntk.num_outputs]),
        "class_means": terms.class_means.matmat(V).numpy(),
        "cross_class": terms.cross_class.matmat(V).numpy(),
        "within_class": terms.within_class.matmat(V).numpy(),
        "counts": terms.class_counts.numpy(),
        "gradient": full_gradient(terms.ggn).numpy(),
    }


def structure_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        case = make_case("tanh_mlp_ce")
        result = structure(case.model, case.loss_fn, Shard(case.batches))
        np.savez(os.path.join(out_dir, f"structure{rank}.npz"), **result)
    finally:
        dist.destroy_process_group()


def test_ntk_trace_and_class_terms_on_two_processes_match_one(tmp_path):
    mp.spawn(structure_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    case = make_case("tanh_mlp_ce")
    single = structure(case.model, case.loss_fn, case.batches)
    ranks = [dict(np.load(tmp_path / f"structure{r}.npz")) for r in range(2)]
    for key, value in single.items():
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        scale = np.abs(value).max()
        assert np.abs(ranks[0][key] - value).max() <= 1e-10 * scale, key
    assert ranks[0]["ntk"][1] == 21  # the all-reduced sample count, not one rank's shard


def test_shard_splits_batches_round_robin():
    batches = list(range(7))
    shards = [list(Shard(batches, rank_=r, world=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="outside"):
        Shard(batches, rank_=3, world=3)


def test_slurm_variables_become_torch_distributed_ones():
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"}
    assert slurm_environment(slurm) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_PORT": "29500",
    }
    assert slurm_environment({**slurm, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_environment({**slurm, "WORLD_SIZE": "8"}) == {}  # torchrun already set it
    assert slurm_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert slurm_environment({}) == {}
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        slurm_environment({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def track_one_snapshot(run_dir, data) -> None:
    """One Tracker snapshot (top eigenvalue and trace) of the tanh MLP case on ``data``."""
    case = make_case("tanh_mlp_ce")
    tracker = Tracker(
        run_dir,
        case.loss_fn,
        data,
        "every:1",
        measurements=("top", "trace"),
        trace_probes=12,
        progress=False,
    )
    tracker.step(0, case.model)
    tracker.close()


def tracker_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        track_one_snapshot(os.path.join(out_dir, "run"), Shard(make_case("tanh_mlp_ce").batches))
    finally:
        dist.destroy_process_group()


def test_tracker_under_two_processes_writes_one_run_per_rank_with_the_single_numbers(tmp_path):
    mp.spawn(tracker_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    track_one_snapshot(tmp_path / "single", make_case("tanh_mlp_ce").batches)
    expected = load_run(tmp_path / "single").scalars
    for folder in ("run", "run.rank1"):  # rank 0 writes run_dir, rank 1 its own sibling
        got = load_run(tmp_path / folder).scalars
        for key in ("lambda_max", "trace"):
            assert abs(got[key][0] - expected[key][0]) <= 1e-10 * abs(expected[key][0]), key
