"""Every result class's ``load`` round-trips what its ``save`` wrote, and refuses a damaged or
crafted file with a ValueError naming the file and the field (never a raw KeyError or
BadZipFile, never a NaN weight or a negative dimension accepted)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from curvscope.analysis import (
    BlockSpectra,
    GradientOverlap,
    SpectrumStructure,
    gradient_overlap,
    spectrum_structure,
)
from curvscope.linalg import (
    Eigenpairs,
    SpectralDensity,
    TraceEstimate,
    diagonal,
    spectral_density,
    top_eigenpairs,
    trace,
)
from curvscope.linalg.nonnormal import TransientBounds, transient_bounds
from curvscope.results import _jsonable, load_result, save_result


def symmetric(n: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.r_[[9.0, 5.0, 3.0], np.linspace(-0.5, 1.0, n - 3)]
    return (q * values) @ q.T


def make_density() -> SpectralDensity:
    return spectral_density(symmetric(), num_iters=12, num_probes=4, seed=1)


def make_results() -> dict[str, Any]:
    """One real result of each class, from the library's own functions."""
    A = symmetric()
    density = make_density()
    pairs = top_eigenpairs(A, k=3)
    gradient = torch.from_numpy(np.random.default_rng(2).standard_normal(A.shape[0]))
    T = np.array([[0.5, 4.0], [0.0, 0.6]])
    return {
        "density": density,
        "trace": trace(A, num_probes=30, seed=3),
        "top": pairs,
        "bounds": transient_bounds(T, num_steps=20),
        "structure": spectrum_structure(density),
        "overlap": gradient_overlap(A, gradient, k=3, eigenpairs=pairs),
        "diagonal": diagonal(A, num_products=20, seed=3),
    }


def assert_same(a: Any, b: Any) -> None:
    """Dataclass results equal field by field: arrays bit for bit (dtype included), numbers
    with their type, metadata as JSON reads it back (lists for tuples, ...)."""
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        elif isinstance(x, dict):
            assert json.loads(json.dumps(x, default=_jsonable)) == y, f.name
        elif isinstance(x, float) and np.isnan(x):
            assert isinstance(y, float) and np.isnan(y), f.name
        else:
            assert x == y and type(x) is type(y), f.name


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return make_results()


def test_every_class_round_trips_what_its_save_writes(results, tmp_path):
    for name, result in results.items():
        result.save(tmp_path / name)
        loaded = type(result).load(tmp_path / name)
        assert_same(result, loaded)
        loaded.save(tmp_path / f"{name}-again")  # and saves the same metadata again
        again = (tmp_path / f"{name}-again.json").read_bytes()
        assert again == (tmp_path / f"{name}.json").read_bytes(), name


def test_edge_values_that_real_results_hold_still_load(tmp_path):
    """NaN where a computation can give it: one stochastic sample (std_error NaN), a zero
    matrix's residuals, inf kappa and NaN upper bounds of a defective matrix, no vectors."""
    one_sample = TraceEstimate(1.5, float("nan"), np.array([0.25]), {"method": "hutchinson"})
    one_sample.save(tmp_path / "trace")
    assert_same(one_sample, TraceEstimate.load(tmp_path / "trace"))

    pairs = Eigenpairs(
        np.array([0.0, 0.0]), np.eye(3)[:, :2], np.array([np.nan, 0.0]), np.array([False, True])
    )
    pairs.save(tmp_path / "top", with_vectors=False)
    loaded = Eigenpairs.load(tmp_path / "top")
    assert loaded.vectors.shape == (0, 2)
    np.testing.assert_array_equal(loaded.residuals, pairs.residuals)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jordan = transient_bounds(np.array([[0.0, 1.0], [0.0, 0.0]]), num_steps=5)
    assert np.isinf(jordan.kappa) and np.isnan(jordan.upper).any()
    jordan.save(tmp_path / "bounds")
    assert_same(jordan, TransientBounds.load(tmp_path / "bounds"))

    density = make_density()
    table = BlockSpectra(
        {"layer 1": ["w", "b"], "(root)": ["scale"]},
        {"layer 1": density, "(root)": density},
        {"layer 1": spectrum_structure(density), "(root)": spectrum_structure(density)},
        {"seed": 0},
    )
    table.save(tmp_path / "blocks")
    again = BlockSpectra.load(tmp_path / "blocks")
    assert again.groups == table.groups and again.meta == table.meta
    for name in table.groups:
        assert_same(table.densities[name], again.densities[name])
        assert_same(table.structures[name], again.structures[name])


# --------------------------------------------------------------------------------------------
# Damaged and crafted files


def edit_arrays(base: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(f"{base}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    change(arrays)
    np.savez(f"{base}.npz", **arrays)


def edit_meta(base: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = Path(f"{base}.json")
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def set_array(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(base: Path) -> None:
        edit_arrays(base, lambda arrays: arrays.__setitem__(name, value(arrays[name])))

    return edit


def drop_array(name: str) -> Callable[[Path], None]:
    return lambda base: edit_arrays(base, lambda arrays: arrays.pop(name))


def set_field(name: str, value: Any) -> Callable[[Path], None]:
    return lambda base: edit_meta(base, lambda meta: meta.__setitem__(name, value))


def drop_field(name: str) -> Callable[[Path], None]:
    return lambda base: edit_meta(base, lambda meta: meta.pop(name))


def with_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64, copy=True)
    a.flat[0] = np.nan
    return a


def negated(a: np.ndarray) -> np.ndarray:
    return -np.abs(a) - 0.5


CRAFTED = [
    # SpectralDensity
    ("density", set_array("weights", with_nan), r"density\.npz: weights has NaN entries"),
    ("density", set_array("weights", negated), r"density\.npz: weights has entries below 0"),
    (
        "density",
        set_array("weights", lambda a: a[:, :-1]),
        r"density\.npz: weights has shape \(4, 11\), expected \(4, 12\) as nodes",
    ),
    ("density", drop_array("nodes"), r"density\.npz: missing array 'nodes'"),
    (
        "density",
        set_array("num_steps", lambda a: a.astype(float)),
        r"density\.npz: num_steps must hold integers, got dtype float64",
    ),
    ("density", set_array("num_steps", lambda a: a + 100), r"num_steps has entries above 12"),
    ("density", set_array("nodes", lambda a: a.ravel()), r"nodes has shape \(48,\)"),
    (
        "density",
        set_field("n", -3),
        r"density\.json: field 'n' must be a positive integer, got -3",
    ),
    ("density", set_field("n", "40"), r"field 'n' must be a positive integer, got '40'"),
    ("density", set_field("n", 40.5), r"field 'n' must be a positive integer, got 40\.5"),
    ("density", drop_field("n"), r"density\.json: missing field 'n'"),
    ("density", set_field("kind", "Trace"), r"field 'kind' is 'Trace', not 'SpectralDensity'"),
    # TraceEstimate
    ("trace", set_field("std_error", -1.0), r"trace\.json: field 'std_error' must be >= 0"),
    ("trace", set_field("value", "big"), r"trace\.json: field 'value' must be a number"),
    ("trace", set_field("value", True), r"field 'value' must be a number, got True"),
    ("trace", drop_field("value"), r"trace\.json: missing field 'value'"),
    ("trace", set_array("samples", lambda a: a[:, None]), r"trace\.npz: samples has shape"),
    ("trace", drop_array("samples"), r"missing array 'samples'"),
    # DiagonalEstimate
    ("diagonal", set_array("std_error", negated), r"diagonal\.npz: std_error has entries below 0"),
    (
        "diagonal",
        set_array("std_error", lambda a: a[:-1]),
        r"std_error has shape \(39,\), expected \(40,\) as 'values'",
    ),
    ("diagonal", drop_array("values"), r"diagonal\.npz: missing array 'values'"),
    ("diagonal", set_field("method", "exact"), r"diagonal\.json: field 'method' must be one of"),
    ("diagonal", drop_field("method"), r"field 'method' must be one of .*, got None"),
    ("diagonal", set_field("num_products", 0), r"'num_products' must be a positive integer"),
    ("diagonal", set_field("kind", "Trace"), r"field 'kind' is 'Trace', not 'Diagonal'"),
    # Eigenpairs
    (
        "top",
        set_array("converged", lambda a: a.astype(np.int64)),
        r"top\.npz: converged must hold booleans",
    ),
    ("top", set_array("values", with_nan), r"top\.npz: values has NaN entries"),
    ("top", set_array("residuals", lambda a: a[:2]), r"residuals has shape \(2,\), expected"),
    ("top", set_array("residuals", negated), r"residuals has entries below 0"),
    ("top", set_array("vectors", lambda a: a[:, :2]), r"vectors has shape \(40, 2\)"),
    ("top", set_array("vectors", with_nan), r"top\.npz: vectors has NaN entries"),
    # TransientBounds
    (
        "bounds",
        set_field("measured_argmax", 99),
        r"bounds\.json: field 'measured_argmax' must be an integer in \[0, 20\], got 99",
    ),
    ("bounds", set_array("eps_values", negated), r"bounds\.npz: eps_values must be > 0"),
    ("bounds", set_array("upper", lambda a: a[:3]), r"upper has shape \(3,\), expected \(21,\)"),
    ("bounds", set_field("n", -2), r"field 'n' must be a positive integer, got -2"),
    ("bounds", set_field("kappa", float("nan")), r"field 'kappa' is NaN"),
    ("bounds", set_array("power_norms", negated), r"power_norms has entries below 0"),
    # SpectrumStructure
    ("structure", set_field("n", -3), r"structure\.json: field 'n' must be a positive integer"),
    (
        "structure",
        set_array("outliers_mass", lambda a: np.r_[a, 0.1]),
        r"structure\.npz: outliers_mass has shape",
    ),
    ("structure", set_field("num_outliers", 7), r"field 'num_outliers' is 7 but"),
    ("structure", set_field("params", [1, 2]), r"field 'params' must be a JSON object"),
    ("structure", drop_field("bulk_max"), r"missing field 'bulk_max'"),
    ("structure", set_field("negative_mass", -0.5), r"field 'negative_mass' must be >= 0"),
    ("structure", set_field("num_unresolved", -1), r"'num_unresolved' must be an integer >= 0"),
    # GradientOverlap
    ("overlap", set_field("k", 41), r"overlap\.json: field 'k' must be an integer in \[1, 40\]"),
    ("overlap", set_field("n", 0), r"field 'n' must be a positive integer, got 0"),
    ("overlap", set_array("shares", lambda a: a[:1]), r"shares has shape \(1,\), expected \(3,\)"),
    ("overlap", set_field("converged", "yes"), r"field 'converged' must be true or false"),
    ("overlap", set_field("gradient_norm", -1), r"field 'gradient_norm' must be >= 0"),
]


@pytest.mark.parametrize(
    ("name", "damage", "message"), CRAFTED, ids=[f"{c[0]}-{c[2][:40]}" for c in CRAFTED]
)
def test_crafted_fields_are_refused_naming_file_and_field(results, tmp_path, name, damage, message):
    result = results[name]
    result.save(tmp_path / name)
    damage(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        type(result).load(tmp_path / name)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def flip_data_byte(path: Path) -> None:
    """Change one byte inside an array's data (not its header): the zip CRC no longer fits."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def write_with(path: Path, save: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Write with numpy's ``save``/``savez`` to exactly ``path`` (no suffix added)."""
    with open(path, "wb") as handle:
        save(handle, *args, **kwargs)


DAMAGED = [
    ("npz", truncate, r"density\.npz: not a readable \.npz file \(BadZipFile"),
    ("npz", flip_data_byte, r"density\.npz: array '\w+' is not readable \(BadZipFile: Bad CRC"),
    ("npz", lambda p: p.write_bytes(b"hello"), r"density\.npz: not a readable \.npz file"),
    ("npz", lambda p: write_with(p, np.save, np.zeros(3)), r"density\.npz: a single \.npy array"),
    (
        "npz",
        lambda p: write_with(p, np.savez, nodes=np.array([{"a": 1}], dtype=object)),
        r"density\.npz: array 'nodes' is not readable \(ValueError: Object arrays",
    ),
    ("json", truncate, r"density\.json: not valid JSON"),
    ("json", lambda p: p.write_bytes(b"\xff\xfe"), r"density\.json: not valid JSON"),
    ("json", lambda p: p.write_text("[1, 2]"), r"density\.json: must hold a JSON object"),
]


@pytest.mark.parametrize(("suffix", "damage", "message"), DAMAGED)
def test_damaged_files_raise_a_value_error_naming_the_file(tmp_path, suffix, damage, message):
    make_density().save(tmp_path / "density")
    damage(tmp_path / f"density.{suffix}")
    with pytest.raises(ValueError, match=message):
        SpectralDensity.load(tmp_path / "density")
    with pytest.raises(ValueError, match=message):
        load_result(tmp_path / "density")


def test_load_result_round_trips_and_says_which_file_is_missing(tmp_path):
    arrays = {"a": np.arange(3), "b": np.eye(2, dtype=np.float32)}
    save_result(tmp_path / "x", arrays, {"kind": "arrays", "note": [1, 2]})
    got, meta = load_result(tmp_path / "x.json")
    assert meta == {"kind": "arrays", "note": [1, 2]}
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value)
    (tmp_path / "x.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.npz does not exist"):
        load_result(tmp_path / "x")


def saved_blocks(tmp_path: Path) -> Path:
    density = make_density()
    BlockSpectra(
        {"fc.weight": ["fc.weight"]},
        {"fc.weight": density},
        {"fc.weight": spectrum_structure(density)},
        {"seed": 0},
    ).save(tmp_path / "blocks")
    return tmp_path / "blocks"


def edit_index(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda i: i["groups"][0].__setitem__("stem", "../outside"),
            r"index\.json: groups\[0\] field 'stem' must be a file stem inside the folder",
        ),
        (lambda i: i["groups"][0].__setitem__("stem", "/etc/passwd"), r"field 'stem'"),
        (lambda i: i.__setitem__("groups", {"a": 1}), r"field 'groups' must be a list"),
        (lambda i: i["groups"].append(dict(i["groups"][0])), r"groups\[1\] field 'name' is rep"),
        (lambda i: i["groups"][0].__setitem__("params", "w"), r"field 'params' must be a list"),
        (lambda i: i["groups"][0].pop("name"), r"groups\[0\] field 'name' is not a string"),
        (lambda i: i.__setitem__("kind", "Eigenpairs"), r"field 'kind' is 'Eigenpairs'"),
        (lambda i: i.__setitem__("meta", [1]), r"field 'meta' must be a JSON object"),
    ],
)
def test_block_spectra_index_is_checked(tmp_path, change, message):
    folder = saved_blocks(tmp_path)
    edit_index(folder, change)
    with pytest.raises(ValueError, match=message):
        BlockSpectra.load(folder)


def test_block_spectra_reports_damaged_member_files(tmp_path):
    folder = saved_blocks(tmp_path)
    (folder / "index.json").write_text("{")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        BlockSpectra.load(folder)
    folder = saved_blocks(tmp_path / "again")
    set_field("n", -3)(folder / "000_fc.weight")
    with pytest.raises(ValueError, match=r"000_fc\.weight\.json: field 'n' must be a positive"):
        BlockSpectra.load(folder)


def test_gradient_overlap_and_structure_load_as_their_class(results, tmp_path):
    """The kind written by each save is the kind its load expects (no cross-loading)."""
    results["overlap"].save(tmp_path / "overlap")
    with pytest.raises(ValueError, match=r"field 'kind' is 'GradientOverlap'"):
        SpectrumStructure.load(tmp_path / "overlap")
    results["structure"].save(tmp_path / "structure")
    with pytest.raises(ValueError, match=r"field 'kind' is 'SpectrumStructure'"):
        GradientOverlap.load(tmp_path / "structure")
