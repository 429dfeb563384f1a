"""``curvscope compare``: saved densities in one figure, and per density its extreme Ritz values,
resolved negative mass and Wasserstein-1 distance to the first (checked against the distance
computed from the two cumulative distribution functions); bad input is one line, status 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_one_line_error, run

from curvscope.analysis import spectrum_structure
from curvscope.linalg import SpectralDensity, spectral_density


def planted(top: float, seed: int) -> np.ndarray:
    eigenvalues = np.concatenate([np.linspace(-0.4, 1.0, 27), [top, 3.0, 2.0]])
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((30, 30)))
    return (q * eigenvalues) @ q.T


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[SpectralDensity]]:
    """Three densities: early/density (a run folder), late.npz/.json, split/density_ggn."""
    folder = tmp_path_factory.mktemp("saved")
    densities = [
        spectral_density(planted(top, seed), num_iters=12, num_probes=3, seed=seed)
        for top, seed in ((5.0, 0), (9.0, 1), (7.0, 2))
    ]
    densities[0].save(folder / "early" / "density")
    densities[1].save(folder / "late")
    densities[2].save(folder / "split" / "density_ggn")
    densities[2].save(folder / "split" / "density_hessian")
    return folder, densities


def w1_by_cdf(a: SpectralDensity, b: SpectralDensity) -> float:
    """W1 = integral |F_a(x) - F_b(x)| dx of the two quadrature measures, by hand."""
    (xa, wa), (xb, wb) = a.flat(), b.flat()
    wa, wb = wa / wa.sum(), wb / wb.sum()
    points = np.unique(np.concatenate([xa, xb]))
    cdf_a = np.array([wa[xa <= x].sum() for x in points[:-1]])
    cdf_b = np.array([wb[xb <= x].sum() for x in points[:-1]])
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_two_densities_table_json_and_figure(saved, tmp_path, capsys):
    folder, (early, late, _) = saved
    figure = tmp_path / "figs" / "ab.png"
    args = ["compare", str(folder / "early"), str(folder / "late.npz"), "--labels", "early,late"]
    code, out, err = run(capsys, *args, "--out", str(figure), "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["command"] == "compare" and record["files"] == [str(figure)]
    first, second = record["densities"]
    assert (first["label"], second["label"]) == ("early", "late")
    assert first["path"] == str(folder / "early" / "density")
    assert first["lambda_max"] == early.lambda_max and second["lambda_min"] == late.lambda_min
    assert second["lambda_max"] == pytest.approx(9.0, rel=1e-6)  # the planted top eigenvalue
    assert second["negative_mass_band"] == spectrum_structure(late).negative_mass_band
    assert first["negative_mass"] == early.negative_mass()
    assert record["wasserstein_to_first"][0] == 0.0
    assert record["wasserstein_to_first"][1] == pytest.approx(w1_by_cdf(early, late), rel=1e-10)
    assert record["wasserstein_to_first"][1] > 0.05  # outliers at 5 and 9 are mass 1/30 apart
    assert png_width(figure) == 1650  # linear and log panels: 11 inches at 150 dpi
    assert "W1 to early" in err and "late" in err and "curvscope compare: 2 densities" in err


def test_three_densities_print_every_pair_and_log_draws_one_panel(
    saved, tmp_path, capsys, monkeypatch
):
    folder, densities = saved
    monkeypatch.chdir(tmp_path)
    args = ["compare", str(folder / "early"), str(folder / "late.json")]
    code, out, err = run(capsys, *args, str(folder / "split" / "density_ggn"), "--log")
    assert code == 0, err
    figure = tmp_path / "results" / "compare" / "compare.png"
    assert png_width(figure) == 1050  # one panel, 7 inches
    assert "Wasserstein-1 distances of every pair" in out
    assert f"{w1_by_cdf(densities[1], densities[2]):.4g}" in out
    label = str(folder / "late")  # the default label: the RESULT without its suffix
    assert any(line.strip().startswith(label) for line in out.splitlines())

    code, out, err = run(capsys, *args, str(folder / "split" / "density_ggn"), "--json")
    pairwise = np.array(json.loads(out)["wasserstein"])
    np.testing.assert_array_equal(pairwise, pairwise.T)
    np.testing.assert_array_equal(np.diag(pairwise), 0.0)
    assert pairwise[1, 2] == pytest.approx(w1_by_cdf(densities[1], densities[2]), rel=1e-10)


@pytest.mark.parametrize(
    ("inputs", "extra", "message"),
    [
        (["split"], [], "'split' is a folder without density.npz/.json: it holds density_ggn, "),
        (["nowhere"], [], "nowhere.npz does not exist"),
        (["early", "late"], ["--labels", "a"], "--labels 'a' gives 1 label(s) for 2 RESULTs"),
        (["early", "late"], ["--labels", "a,"], "give one non-empty label per RESULT"),
        (["early"], ["--out", "split"], "--out 'split' is a folder"),
        (["early"], ["--out", "f.weird"], "cannot write the figure: Format 'weird' is not"),
        (["early"], ["--sigma", "0"], "--sigma: must be positive"),
    ],
)
def test_bad_input_is_one_line(saved, capsys, monkeypatch, inputs, extra, message):
    folder, _ = saved
    monkeypatch.chdir(folder)
    code, out, err = run(capsys, "compare", *inputs, *extra, "--json")
    assert out == ""
    assert_one_line_error(code, out, err, message)


def test_another_result_kind_is_not_a_density(saved, tmp_path, capsys):
    folder, densities = saved
    spectrum_structure(densities[0]).save(tmp_path / "structure")
    code, out, err = run(capsys, "compare", str(folder / "late"), str(tmp_path / "structure"))
    assert_one_line_error(code, out, err, "is not a saved density: ")
    assert "field 'kind' is 'SpectrumStructure', not 'SpectralDensity'" in err
