"""What the run store does with files changed after the commit: content (sha256) checks by
default, in load_run and in resume; index lines that disagree with their snapshot are reported;
a manifest's type name never reaches an import or a call outside the result classes."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from curvscope.analysis import SpectrumStructure, spectrum_structure
from curvscope.linalg import Eigenpairs, SpectralDensity, TraceEstimate
from curvscope.tracking import Problem, RunProblem, RunStore, load_run
from curvscope.tracking import store as store_module
from curvscope.tracking.store import DAMAGED_PREFIX, INDEX_FILE

LAMBDA_MAX = 0.554


def density(step: int) -> SpectralDensity:
    rng = np.random.default_rng(step)
    nodes = np.sort(rng.standard_normal((3, 10)), axis=1)
    weights = rng.random((3, 10))
    weights /= weights.sum(axis=1, keepdims=True)
    return SpectralDensity(nodes, weights, np.full(3, 10), 500, {"seed": step})


def write_run(run_dir: Path, steps=range(3)) -> None:
    with RunStore(run_dir, config={}) as store:
        for step in steps:
            store.write_snapshot(
                step,
                {"lambda_max": LAMBDA_MAX, "loss": 1.0 / (step + 1)},
                {"density": density(step)},
            )


def snapshot(run_dir: Path, step: int) -> Path:
    return run_dir / "snapshots" / f"step_{step:08d}"


def rehash(folder: Path) -> None:
    """Make the manifest agree with the files again (what a crafted folder would do)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_same_size_corruption_is_found_by_default(tmp_path):
    """One digit edited in scalars.json (0.554 -> 9.554) keeps the size: the default
    load_run finds it by its sha256 and leaves the step out, with a problem."""
    run_dir = tmp_path / "run"
    write_run(run_dir)
    scalars = snapshot(run_dir, 1) / "scalars.json"
    text = scalars.read_text()
    assert f"{LAMBDA_MAX}" in text
    scalars.write_text(text.replace(f"{LAMBDA_MAX}", "9.554"))

    with pytest.warns(UserWarning, match="problem"):
        run = load_run(run_dir)
    assert run.steps.tolist() == [0, 2]
    assert not np.any(run.scalars["lambda_max"] > 1)
    (problem,) = [p for p in run.problems if p.path == str(snapshot(run_dir, 1))]
    assert isinstance(problem, RunProblem) and RunProblem is Problem  # Problem: former name
    assert "scalars.json does not match its sha256" in problem.reason
    assert "left out" in problem.reason

    # The opt-out checks sizes only, and so misses it (documented).
    unchecked = load_run(run_dir, check_hashes=False, warn=False)
    assert unchecked.steps.tolist() == [0, 1, 2]
    assert unchecked.scalars["lambda_max"][1] == 9.554


def test_resume_moves_a_corrupted_snapshot_aside_and_redoes_it(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    npz = snapshot(run_dir, 1) / "density.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    npz.write_bytes(bytes(data))

    with RunStore(run_dir, config={}, resume=True) as store:
        assert store.completed_steps == {0, 2}
        reasons = [p.reason for p in store.problems]
        assert any("density.npz does not match its sha256" in r for r in reasons), reasons
        assert any("damaged snapshot of step 1 moved aside; step redone" in r for r in reasons)
        store.write_snapshot(1, {"lambda_max": 0.5, "loss": 0.5}, {"density": density(1)})
    aside = [e for e in (run_dir / "snapshots").iterdir() if e.name.startswith(DAMAGED_PREFIX)]
    assert len(aside) == 1 and (aside[0] / "density.npz").read_bytes() == bytes(data)

    run = load_run(run_dir, warn=False)
    assert run.steps.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(run.densities[1].nodes, density(1).nodes)
    assert run.scalars["lambda_max"].tolist() == [LAMBDA_MAX, 0.5, LAMBDA_MAX]
    # The redone step's old index line is reported as superseded, not as a disagreement.
    old_line = [p for p in run.problems if p.path == f"{run_dir / INDEX_FILE}:2"]
    assert len(old_line) == 1 and "superseded by line 4" in old_line[0].reason
    assert not any("disagrees" in p.reason for p in run.problems)


def test_an_index_line_that_disagrees_with_its_snapshot_is_reported(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    index = run_dir / INDEX_FILE
    lines = index.read_text().splitlines(keepends=True)
    row = json.loads(lines[1])
    row["lambda_max"], row["extra"] = 9.554, 1.0
    lines[1] = json.dumps(row) + "\n"
    index.write_text("".join(lines))

    with pytest.warns(UserWarning, match="1 problem"):
        run = load_run(run_dir)
    (problem,) = run.problems
    assert problem.path == f"{index}:2"
    assert "line for step 1 disagrees with snapshots/step_00000001/scalars.json" in problem.reason
    assert f"lambda_max (index 9.554, snapshot {LAMBDA_MAX})" in problem.reason
    assert "extra (index 1.0, snapshot absent)" in problem.reason
    assert "loss" not in problem.reason
    # The snapshot folder stays the truth.
    assert run.scalars["lambda_max"].tolist() == [LAMBDA_MAX] * 3
    assert "extra" not in run.scalars


def test_nan_scalars_agree_with_their_index_line(tmp_path):
    with RunStore(tmp_path / "run", config={}) as store:
        store.write_snapshot(0, {"a": None, "b": float("nan"), "c": float("inf")})
    assert load_run(tmp_path / "run").problems == []


# --------------------------------------------------------------------------------------------
# Type names from a manifest


def all_results(step: int) -> dict:
    rng = np.random.default_rng(step)
    vectors = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    return {
        "density": density(step),
        "top": Eigenpairs(np.array([2.0, 1.0]), vectors, np.zeros(2), np.ones(2, bool), {}),
        "trace": TraceEstimate(3.0, 0.1, rng.standard_normal(5), {"method": "hutch++"}),
        "payload": {"x": np.arange(4.0)},
    }


def test_each_result_loads_as_the_class_that_wrote_it(tmp_path):
    with RunStore(tmp_path / "run", config={}) as store:
        store.write_snapshot(0, {}, all_results(0))
    run = load_run(tmp_path / "run")
    manifest = json.loads((snapshot(tmp_path / "run", 0) / "manifest.json").read_text())
    for name, result in all_results(0).items():
        loaded = run.results(name)[0]
        type_name = manifest["results"][name]["type"]
        if isinstance(result, dict):
            assert type_name == "arrays"
            arrays, _ = loaded
            np.testing.assert_array_equal(arrays["x"], result["x"])
        else:
            assert store_module.result_classes()[type_name] is type(result)
            assert type(loaded) is type(result)
    assert set(store_module.result_classes()) == {
        "curvscope.linalg.density.SpectralDensity",
        "curvscope.linalg.trace.TraceEstimate",
        "curvscope.linalg.eigs.Eigenpairs",
        "curvscope.linalg.nonnormal.TransientBounds",
        "curvscope.analysis.structure.SpectrumStructure",
        "curvscope.analysis.overlap.GradientOverlap",
        "curvscope.analysis.blocks.BlockSpectra",
    }


def test_a_result_written_under_a_former_type_name_loads_with_its_class(tmp_path):
    """SpectrumStructure moved from analysis.density to analysis.structure: manifests written
    before the move name the old module, and their structures still load as structures."""
    structure = spectrum_structure(density(0))
    with RunStore(tmp_path / "run", config={}) as store:
        store.write_snapshot(0, {}, {"structure": structure})
    folder = snapshot(tmp_path / "run", 0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["results"]["structure"]["type"] == (
        "curvscope.analysis.structure.SpectrumStructure"
    )
    manifest["results"]["structure"]["type"] = "curvscope.analysis.density.SpectrumStructure"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_run(tmp_path / "run").results("structure")[0]
    assert isinstance(loaded, SpectrumStructure)
    assert loaded.to_dict() == structure.to_dict()


CRAFTED_TYPES = [
    "curvscope.cli.torch",  # -> torch.load (weights_only off under an environment variable)
    "curvscope.linalg.eigs.torch",
    "curvscope.planted.Planted",  # a class in the curvscope namespace whose load runs code
    "curvscope.evil_plugin.Evil",  # a module that would run code on import
    "curvscope.tracking.store.shutil",
    "os.system",
    "builtins.eval",
    "curvscope",
    "",
]


def test_a_crafted_type_name_never_imports_or_calls_anything(tmp_path, monkeypatch):
    with RunStore(tmp_path / "run", config={}) as store:
        store.write_snapshot(0, {}, all_results(0))
    folder = snapshot(tmp_path / "run", 0)
    calls: list[str] = []

    def fake_torch_load(*args, **kwargs):
        calls.append("torch.load")
        raise AssertionError("torch.load called for a type name read from a run folder")

    class Planted:
        @classmethod
        def load(cls, path):
            calls.append("Planted.load")
            raise AssertionError("a planted class's load called")

    planted = types.ModuleType("curvscope.planted")
    planted.Planted = Planted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "curvscope.planted", planted)
    monkeypatch.setattr(torch, "load", fake_torch_load)
    real_import_module = importlib.import_module

    def watch_import_module(name, *args, **kwargs):
        calls.append(f"import_module({name!r})")
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", watch_import_module)

    for type_name in CRAFTED_TYPES:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["results"]["payload"]["type"] = type_name
        (folder / "manifest.json").write_text(json.dumps(manifest))
        run = load_run(tmp_path / "run")
        loaded = run.results("payload")[0]
        assert calls == [], type_name
        arrays, meta = loaded  # plain (arrays, meta), as for "arrays"
        np.testing.assert_array_equal(arrays["x"], np.arange(4.0))
        assert meta == {"kind": "arrays"}
    assert "curvscope.evil_plugin" not in sys.modules


def test_a_manifest_naming_files_outside_its_folder_is_damaged(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, steps=[0, 1])
    (tmp_path / "outside.npz").write_bytes(b"x")
    folder = snapshot(run_dir, 1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["results"]["../../../outside"] = {"type": "arrays"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run = load_run(run_dir, warn=False)
    assert run.steps.tolist() == [0]
    assert any("not a valid file stem" in p.reason for p in run.problems)

    manifest["results"].pop("../../../outside")
    manifest["files"]["../x"] = {"size": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run = load_run(run_dir, warn=False)
    assert run.steps.tolist() == [0]
    assert any("not a file name of a snapshot" in p.reason for p in run.problems)


def test_a_crafted_result_file_raises_a_clear_error_on_access(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, steps=[0, 1])
    folder = snapshot(run_dir, 1)
    with np.load(folder / "density.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["weights"][0, 0] = np.nan
    np.savez(folder / "density.npz", **arrays)
    rehash(folder)  # hashes agree: only the loader can tell
    run = load_run(run_dir)
    assert run.steps.tolist() == [0, 1] and run.problems == []
    assert run.densities[0].n == 500
    with pytest.raises(
        ValueError, match=r"result 'density' of step 1 in .*density\.npz: weights has NaN entries"
    ):
        run.densities[1]
    with pytest.raises(KeyError, match="no committed snapshot at step 7"):
        run.load(7, "density")
