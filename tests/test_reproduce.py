"""`make reproduce QUICK=1`: every experiment runs end to end and the rendered table has one
row per claim (experiments/reproduce.py, experiments/_reproduce.py).

The quick run takes a few minutes (tiny settings, one seed, two experiments at a time); it
checks that every reproduction runs and writes a valid summary, not its verdicts.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from _reproduce import (  # noqa: E402
    FORMAT,
    Band,
    Claim,
    judge,
    load_summary,
)


def table_rows(markdown: str) -> list[str]:
    """The rows of the first Markdown table (after its header and separator)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Paper |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_judge_bands_and_nan():
    assert judge([1.0, 1.02, 0.98, 1.05, 0.99], Band(0.95, 1.1), Band(0.8, 1.25)).verdict == (
        "reproduces"
    )
    # the median is inside, but only 3 of 5 runs are (< 80%): partly
    v = judge([1.0, 1.0, 1.0, 2.0, 2.0], Band(0.95, 1.1), Band(0.8, 1.25))
    assert v.verdict == "partly"
    assert judge([1.2, 1.2, 1.2], Band(0.95, 1.1), Band(0.8, 1.25)).verdict == "partly"
    assert judge([0.1, 0.2], Band(0.95, 1.1), Band(0.8, 1.25)).verdict == "does not"
    # a diverged run counts as outside, and half of them NaN makes the median NaN
    v = judge([1.0, 1.0, 1.0, 1.0, math.nan], Band(0.95, 1.1), Band(0.8, 1.25))
    assert v.verdict == "reproduces" and "n/a" in v.rule
    assert judge([1.0, math.nan], Band(0.95, 1.1), Band(0.8, 1.25)).verdict == "does not"
    assert judge([math.inf, 3.0], Band(2.0, None), Band(1.0, None)).verdict == "reproduces"


def test_claim_checks_its_fields():
    with pytest.raises(ValueError, match="labels"):
        Claim("k", "p", "c", "v", "m", [1.0], [], "r", "reproduces")
    with pytest.raises(ValueError, match="verdict"):
        Claim("k", "p", "c", "v", "m", [1.0], ["a"], "r", "maybe")


def test_load_summary_names_the_field(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": FORMAT, "experiment": "x"}))
    with pytest.raises(ValueError, match=r"x\.json: field 'title'"):
        load_summary(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON"):
        load_summary(path)


def test_quick_reproduce_runs_every_experiment(tmp_path):
    experiments = sorted(
        p.stem
        for p in EXPERIMENTS.glob("*.py")
        if not p.name.startswith("_") and p.stem != "reproduce"
    )
    doc = tmp_path / "reproductions.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXPERIMENTS / "reproduce.py"),
            "--quick",
            "--jobs",
            "2",
            "--results",
            str(tmp_path),
            "--figures",
            str(tmp_path / "figures"),
            "--doc",
            str(doc),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    logs = {name: (tmp_path / f"{name}.log") for name in experiments}
    failed = {
        name: log.read_text()[-3000:] if log.exists() else "no log"
        for name, log in logs.items()
        if not (tmp_path / f"{name}.json").exists()
    }
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], failed)
    assert not failed
    claims = 0
    for name in experiments:
        summary = load_summary(tmp_path / f"{name}.json")
        assert summary["experiment"] == name
        assert summary["quick"] is True
        claims += len(summary["claims"])
        for figure in summary["figures"]:
            assert Path(figure).is_file() or (ROOT / figure).is_file(), figure
            # quick mode never writes into docs/
            assert not str(Path(figure).resolve()).startswith(str(ROOT / "docs")), figure
    text = doc.read_text()
    assert "QUICK MODE" in text
    rows = table_rows(text)
    assert len(rows) == claims
    assert not any("**failed**" in row for row in rows)
    verdicts = re.findall(r"\| (reproduces|partly|\*\*does not\*\*) \|", "\n".join(rows))
    assert len(verdicts) == claims
