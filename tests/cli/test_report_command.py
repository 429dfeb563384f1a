"""``curvscope report``: the page of every command's results folder and of a run folder holds
the numbers of the result files (read back here with the result classes), is self-contained
and escapes what it shows; bad input is one line and exit status 2. The browser check of the
same pages is test_report_browser.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clitools import HOSTILE, assert_one_line_error, run_one_thread
from htmlpage import image_bytes, parse, rows

from curvscope.analysis import BlockSpectra, GradientOverlap, SpectrumStructure
from curvscope.html_report import build_report
from curvscope.html_report.page import number, png_size
from curvscope.linalg import Eigenpairs, TraceEstimate
from curvscope.plot import TERM_LABELS
from curvscope.tracking import load_run


@pytest.fixture(scope="module")
def page(results_report):
    return parse(results_report[0].read_text())


def test_results_page_has_a_section_per_result(page, results_report):
    _, out = results_report
    # In the order of the commands, whatever the folders' names: density, top, trace, ...
    assert [(s.title, s.source) for s in page.sections] == [
        ("Hessian eigenvalue density", "density/density.npz"),
        ("Largest eigenvalues of the Hessian", "top/eigenpairs.npz"),
        ("Trace of the Hessian", "trace/trace.npz"),
        ("Largest eigenvalues of the Hessian", "overlap/eigenpairs.npz"),
        ("Gradient in the top eigenspace", "overlap/overlap.npz"),
        ("Decomposition of the Hessian", "decompose/decompose.npz"),
        ("Diagonal Hessian blocks", "blocks/blocks/index.json"),
    ]
    assert out.startswith("curvscope report: folder of results ")
    assert "7 section(s), 4 figure(s)" in out and "wrote" in out and "report.html" in out


def test_density_section_shows_its_files(page, all_results):
    section = page.section("Hessian eigenvalue density")
    facts = section.facts
    assert facts["model"] == "structmod:model" and facts["data"] == "structmod:data"
    assert facts["n (parameters)"] == "610" and facts["samples"] == "120"
    assert facts["dtype of the products"] == "float64"
    assert facts["Lanczos steps per probe"] == "12" and facts["probes"] == "2"
    assert f"torch {torch.__version__}" in facts["versions"]
    assert facts["wall time"].endswith(" s")
    assert len(section.images) == 1
    # --mark-top 2: the two eigenvalues and residuals of top_eigenpairs.npz
    pairs = Eigenpairs.load(all_results / "density" / "top_eigenpairs")
    table = section.tables["Top 2 eigenvalues"]
    assert [r[1] for r in table[1:]] == [number(v, 12) for v in pairs.values]
    assert [r[2] for r in table[1:]] == [number(v, 3) for v in pairs.residuals]
    # --structure: the saved structure, not one computed by the report
    structure = SpectrumStructure.load(all_results / "density" / "density.structure")
    table = rows(section.tables["Spectrum structure"])
    assert table[f"outliers above the bulk ({structure.num_outliers})"]
    assert table["bulk edges"] == [f"[{number(structure.bulk_min)}, {number(structure.bulk_max)}]"]
    resolved = f"negative mass below -{number(structure.band, 3)} (resolved)"
    assert table[resolved] == [number(structure.negative_mass_band, 4)]
    assert "Computed for this report" not in section.text


def test_top_trace_and_overlap_tables(page, all_results):
    pairs = Eigenpairs.load(all_results / "top" / "eigenpairs")
    table = page.section("Largest eigenvalues", "top/").tables["3 largest eigenvalues"]
    assert table[0] == ["#", "eigenvalue", "residual", "converged"]
    assert [r[1:] for r in table[1:]] == [
        [number(v, 12), number(r, 3), "yes" if c else "NO"]
        for v, r, c in zip(pairs.values, pairs.residuals, pairs.converged, strict=True)
    ]
    estimate = TraceEstimate.load(all_results / "trace" / "trace")
    table = rows(page.section("Trace of the Hessian").tables["Trace"])
    assert table["tr(H)"] == [number(estimate.value, 8)]
    assert table["standard error"] == [number(estimate.std_error, 3)]
    half = 1.96 * estimate.std_error
    interval = f"[{number(estimate.value - half, 6)}, {number(estimate.value + half, 6)}]"
    assert table["95% interval (± 1.96 standard errors)"] == [interval]
    result = GradientOverlap.load(all_results / "overlap" / "overlap")
    section = page.section("Gradient in the top eigenspace")
    assert rows(section.tables["Overlap"])["overlap with the top-3 eigenspace"] == [
        number(result.overlap, 4)
    ]
    shares = [r[2] for r in section.tables["Per eigenvector"][1:]]
    assert shares == [number(s, 4) for s in result.shares]
    assert len(section.images) == 1


def test_decompose_and_blocks_sections(page, all_results):
    section = page.section("Decomposition of the Hessian")
    terms = [r[0] for r in section.tables["Structure of each term"][1:]]
    assert terms == list(TERM_LABELS.values())  # H, G, H - G, G0, G1, G2, W in this order
    hessian = SpectrumStructure.load(all_results / "decompose" / "structure_hessian")
    row = rows(section.tables["Structure of each term"])["Hessian H"]
    assert row[:3] == ["610", number(hessian.lambda_min, 4), number(hessian.lambda_max, 4)]
    assert row[6].startswith(f"{hessian.num_outliers}: ")
    assert section.facts["versions"] and section.facts["n (parameters)"] == "610"
    blocks = BlockSpectra.load(all_results / "blocks" / "blocks")
    section = page.section("Diagonal Hessian blocks")
    table = rows(section.tables["Structure of each block"])
    assert list(table) == blocks.names
    assert [table[name][0] for name in blocks.names] == [
        f"{blocks.structures[name].n:,}" for name in blocks.names
    ]
    assert len(section.images) == 1


def test_page_is_self_contained_and_escapes_what_it_shows(page, results_report):
    text = results_report[0].read_text()
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["iframe"] == 0
    assert page.tags["img"] == 4 == len(page.images)
    for image in page.images:
        width, height = png_size(image_bytes(image))  # the base64 decodes to a PNG
        assert (str(width), str(height)) == (image["width"], image["height"])
        assert image["alt"]
    for tag, name, value in page.attributes:
        if name in ("src", "href"):
            assert value.startswith(("data:image/png;base64,", "#")), (tag, value[:80])
    assert "http://" not in text and "https://" not in text
    assert HOSTILE not in text and "<script" not in text
    assert page.title == HOSTILE  # shown as text, character for character
    assert page.section("Trace of the Hessian").facts["model"] == HOSTILE


def test_run_page(run_report, tracked):
    page_path, out = run_report
    run = load_run(tracked[0])
    page = parse(page_path.read_text())
    assert page.titles == [
        "Training run",
        "Density at step 4 (last snapshot with one)",
        "Top eigenvalues at step 4 (last snapshot)",
    ]
    section = page.sections[0]
    assert len(section.images) == 3  # sharpness, density evolution, traces
    assert len(page.images) == 4
    facts = section.facts
    assert facts["model"] == "trackmod:model" and facts["optimizer"] == "sgd"
    assert facts["learning rate"] == "0.5" and facts["n (parameters)"] == "610"
    assert set(facts["measurements"].split(", ")) == {"top", "stability", "trace", "density", "ntk"}
    assert "time in measurements" in facts and f"torch {torch.__version__}" in facts["versions"]
    table = section.tables["Snapshots"]
    head = table[0]
    assert head[:3] == ["step", "loss", "accuracy"] and "trace ± s.e." in head
    assert [r[0] for r in table[1:]] == ["0", "2", "4"]
    loss = [r[head.index("loss")] for r in table[1:]]
    assert loss == [number(v, 4) for v in run.scalars["loss"]]
    traces = [r[head.index("trace ± s.e.")] for r in table[1:]]
    assert traces == [
        f"{number(v, 4)} ± {number(e, 2)}"
        for v, e in zip(run.scalars["trace"], run.scalars["trace_std_error"], strict=True)
    ]
    pairs = run.load(4, "top")
    top = page.sections[2].tables["1 largest eigenvalue"]
    assert top[1][1] == number(pairs.values[0], 12)
    assert out.startswith("curvscope report: run folder ")


def test_each_results_folder_alone(all_results):
    titles = {
        "top": ["Largest eigenvalues of the Hessian"],
        "trace": ["Trace of the Hessian"],
    }  # (the other folders alone take the same path as in the page of all of them)
    for name, expected in titles.items():
        report = build_report(all_results / name, dpi=30)
        assert report.kind == "results"
        assert [s.title for s in report.sections] == expected
        assert report.skipped == []


def test_a_density_without_structure_gets_one_computed(all_results, tmp_path):
    folder = tmp_path / "density"
    folder.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(all_results / "density" / f"density{suffix}", folder)
    (folder / "notes.json").write_text("{}")
    report = build_report(folder, dpi=30)
    (section,) = report.sections
    assert "Computed for this report" in section.tables[0].note
    assert report.skipped == ["notes.json: no .npz beside it, so not a result"]


def _copy(source, target):
    shutil.copytree(source, target)
    return target


def test_bad_input_is_one_line_and_status_2(all_results, tracked, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a result")
    bad_json = _copy(all_results / "trace", tmp_path / "bad_json")
    (bad_json / "trace.json").write_text('{"kind": "Trace",')
    bad_npz = _copy(all_results / "top", tmp_path / "bad_npz")
    data = (bad_npz / "eigenpairs.npz").read_bytes()
    (bad_npz / "eigenpairs.npz").write_bytes(data[: len(data) // 3])
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(all_results / "trace" / "trace.npz", lonely)
    bad_run = _copy(tracked[0], tmp_path / "bad_run")
    (bad_run / "run.json").write_text("[1, 2")
    not_json = _copy(all_results / "trace", tmp_path / "not_object")
    (not_json / "trace.json").write_text("[1, 2]")
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(all_results / "trace" / "trace.json")], "is a file"),
        ([str(empty)], "holds no curvscope results"),
        ([str(other)], "holds no curvscope results"),
        ([str(lonely)], "trace.npz: no .json beside it"),
        ([str(bad_json)], "trace.json: not valid JSON"),
        ([str(not_json)], "trace.json: must hold a JSON object"),
        ([str(bad_npz)], "eigenpairs.npz"),
        ([str(bad_run)], "run.json: not valid JSON"),
        ([str(all_results / "trace"), "--out", str(tmp_path)], "is a folder"),
        ([str(all_results / "trace"), "--dpi", "0"], "--dpi"),
        ([str(all_results / "trace"), "--dpi", "601"], "between 10 and 600"),
    ]
    for args, message in cases:
        assert_one_line_error(*run_one_thread("report", *args), message)


def test_a_run_without_snapshots_is_refused(tmp_path):
    from curvscope.tracking import RunStore

    RunStore(tmp_path / "run", config={}).close()
    code, out, err = run_one_thread("report", str(tmp_path / "run"))
    assert_one_line_error(code, out, err, "holds no snapshots yet")


def test_problems_of_a_run_are_warned_and_listed(tmp_path):
    """A Tracker run of a user's own loop (no training settings), one snapshot damaged."""
    from curvscope.tracking import RunStore

    with RunStore(tmp_path / "run", config={"schedule": "every:10"}) as store:
        for step in (0, 10, 20):
            store.write_snapshot(step, {"loss": 1.0 / (1 + step), "lambda_max": 1.0 + step})
    scalars = tmp_path / "run" / "snapshots" / "step_00000010" / "scalars.json"
    scalars.write_text(json.dumps({"step": 10, "loss": 5.0, "lambda_max": 9.0}))
    code, _, err = run_one_thread("report", str(tmp_path / "run"))
    assert code == 0, err
    assert "curvscope: warning: " in err and "step_00000010" in err
    page = parse((tmp_path / "run" / "report.html").read_text())
    assert "Problems in the run folder" in page.text and "step_00000010" in page.text
    table = page.sections[0].tables["Snapshots"]
    assert [r[0] for r in table[1:]] == ["0", "20"]  # the damaged snapshot is left out
    assert [r[1] for r in table[1:]] == ["1", number(1 / 21, 4)]
    assert page.sections[0].facts["schedule"] == "every:10"
    assert len(page.images) == 1  # the sharpness; no density, no trace


def test_dpi_sets_the_size_of_the_figures(all_results):
    report = build_report(all_results / "overlap", dpi=40)
    (image,) = report.sections[1].figures
    assert image.size == (7 * 40, int(3.6 * 40))  # plot_overlap's 7 x 3.6 inch figure


def test_json_names_the_page_and_its_sections(all_results, tmp_path):
    out_file = tmp_path / "page.html"
    code, out, err = run_one_thread("report", str(all_results), "--out", str(out_file), "--json")
    assert code == 0, err
    record = json.loads(out)  # one object on stdout; the summary went to stderr
    assert record["command"] == "report" and record["kind"] == "folders"
    assert record["files"] == [str(out_file)] and record["bytes"] == out_file.stat().st_size
    assert [s["source"] for s in record["sections"]][:3] == [
        "density/density.npz",
        "top/eigenpairs.npz",
        "trace/trace.npz",
    ]
    assert record["num_figures"] == 4 and "wrote" in err


def test_sections_name_the_operator_measured(structure_module, tmp_path):
    """G, F and F_emp results are titled by their operator (not "the operator"), with
    "Gauss-Newton" spelled as a name."""
    from clitools import STRUCTURE, TINY

    for command, operator, slq in [
        ("density", "ggn", TINY),
        ("top", "fisher", ["-k", "2"]),
        ("trace", "empirical-fisher", ["--probes", "9"]),
    ]:
        out = str(tmp_path / operator)
        code, _, err = run_one_thread(
            command, *STRUCTURE, *slq, "--operator", operator, "--out", out
        )
        assert code == 0, err
    code, _, err = run_one_thread("report", str(tmp_path))
    assert code == 0, err
    titles = [s.title for s in parse((tmp_path / "report.html").read_text()).sections]
    assert titles == [
        "Gauss-Newton matrix eigenvalue density",
        "Largest eigenvalues of the Fisher",
        "Trace of the empirical Fisher",
    ]
