"""Messages of ``curvscope`` for mistakes in the user's data, run in-process through
``curvscope.cli.main``: a model given without ``--data`` (the built-in digits are used), uint8
inputs, batches that are not (inputs, targets) pairs, and regression targets in ``decompose``.

Each mistake fails at the first forward pass (or before it), so every test runs in a second or
two; each checks the one-line error (exit status 2, no traceback) or the note on stderr.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from curvscope.cli import main

QUIET = ["--no-progress", "--threads", "1"]
TINY = ["--iters", "3", "--probes", "1"]

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def conv():
        # expects (B, 1, 64): the digits come as (B, 64)
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(240, 10))

    def mlp64():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 10))

    def image_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def uint8_images():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (24,), generator=g)
        return [(x[:12], y[:12]), (x[12:], y[12:])]

    def uint8_dicts():
        return [{"image": x, "label": y} for x, y in uint8_images()]

    def unpack(batch):
        return batch["image"], batch["label"]

    def regressor():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def regression_data():
        # float targets whose second column is always the larger: argmax never gives class 0
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g)
        y = torch.randn(16, 2, generator=g) + torch.tensor([0.0, 5.0])
        return [(x[:8], y[:8]), (x[8:], y[8:])]

    def one_hot_without_class_0():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g)
        y = torch.nn.functional.one_hot(torch.ones(16, dtype=torch.long), 2).float()
        return [(x, y)]
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``msgmod`` importable from a folder on sys.path, as a user's own file would be."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "msgmod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "msgmod.py"
    sys.modules.pop("msgmod", None)


def run(capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    code = main([*args, *QUIET, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(code: int, out: str, err: str) -> str:
    """The one error line of a user error (exit status 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if not line.startswith("curvscope: note")]
    assert len(lines) == 1, err
    assert lines[0].startswith("curvscope: error: ")
    return lines[0]


# --------------------------------------------------------------------------- 4a: --data


@pytest.mark.parametrize("command", [["density", *TINY], ["trace", "--probes", "6"]])
def test_model_without_data_names_the_digits_and_data_option(
    capsys, tmp_path, user_module, command
):
    code, out, err = run(capsys, tmp_path, *command, "--model", "msgmod:conv")
    note = err.strip().splitlines()[0]
    assert note.startswith("curvscope: note: --data not given: --model msgmod:conv gets the")
    assert "built-in digits data curvscope.zoo:digits_data" in note
    assert "inputs float32 (256, 64)" in note
    line = error_line(code, out, err)
    assert "--model msgmod:conv failed on the built-in digits data" in line
    assert "1,797 samples in 8 batches; batch 0: inputs float32 (256, 64)" in line
    assert "expected input[1, 256, 64]" in line  # torch's own words stay
    assert line.endswith("Pass your model's own data with --data MODULE:FACTORY")


def test_track_model_without_data_names_the_data_option(capsys, tmp_path, user_module):
    args = ["track", "--model", "msgmod:conv", "--steps", "1", "--measure", "top"]
    code, out, err = run(capsys, tmp_path, *args)
    line = error_line(code, out, err)
    assert "built-in digits data that --data defaults to (curvscope.zoo:digits_subset" in line
    assert "--data MODULE:FACTORY" in line


def test_a_working_model_on_the_digits_gets_the_note_only(capsys, tmp_path, user_module):
    code, _out, err = run(capsys, tmp_path, "density", *TINY, "--model", "msgmod:mlp64")
    assert code == 0, err
    assert err.startswith("curvscope: note: --data not given")
    # given explicitly, or a built-in model: no note
    args = ["density", *TINY, "--model", "msgmod:mlp64", "--data", "curvscope.zoo:digits_data"]
    assert run(capsys, tmp_path, *args)[2] == ""
    args = ["density", *TINY, "--model", "curvscope.zoo:digits_mlp"]
    assert run(capsys, tmp_path, *args)[2] == ""


# --------------------------------------------------------------------------- 4b: uint8


def test_uint8_inputs_are_named_with_the_fix(capsys, tmp_path, user_module):
    args = ["density", *TINY, "--model", "msgmod:image_mlp", "--data", "msgmod:uint8_images"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "failed on uint8 inputs (batch 0's inputs are uint8 of shape (12, 1, 8, 8))" in line
    assert "to floating point in the data factory (--data msgmod:uint8_images)" in line
    assert "x.float() / 255" in line


def test_uint8_inputs_through_unpack_batch(capsys, tmp_path, user_module):
    args = ["trace", "--probes", "6", "--model", "msgmod:image_mlp"]
    args += ["--data", "msgmod:uint8_dicts", "--unpack-batch", "msgmod:unpack"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "uint8 of shape (12, 1, 8, 8)" in line
    assert "or in --unpack-batch msgmod:unpack" in line


# --------------------------------------------------------------------------- 4c: pairs


def test_batches_that_are_not_pairs_name_the_unpack_batch_option(capsys, tmp_path, user_module):
    args = ["top", "-k", "1", "--model", "msgmod:image_mlp", "--data", "msgmod:uint8_dicts"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "--data msgmod:uint8_dicts: a batch is a dict, not an (inputs, targets) pair" in line
    assert "pass --unpack-batch MODULE:FN, a function fn(batch) -> (inputs, targets)" in line
    assert "unpack_batch=" not in line


def test_structure_commands_name_the_unpack_batch_option(capsys, tmp_path, user_module):
    args = ["blocks", *TINY, "--model", "msgmod:image_mlp", "--data", "msgmod:uint8_dicts"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "pass --unpack-batch MODULE:FN" in line


# --------------------------------------------------------------------------- 4d: classes


REGRESSION = ["--model", "msgmod:regressor", "--data", "msgmod:regression_data", "--loss", "mse"]


def test_decompose_refuses_class_terms_of_regression_targets(capsys, tmp_path, user_module):
    args = ["decompose", *TINY, *REGRESSION, "--classes", "mse"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "the targets are not class labels (batch 0: float32 (8, 2))" in line
    assert "regression (float) targets have no classes" in line
    assert "pass --classes none for the H, G and H - G split" in line
    assert "have no samples" not in line


def test_decompose_auto_splits_regression_targets_without_classes(capsys, tmp_path, user_module):
    code, out, err = run(capsys, tmp_path, "decompose", *TINY, *REGRESSION)
    assert code == 0, err
    assert err.startswith("curvscope: note: the targets are not class labels")
    assert "splitting H into G and H - G only (--classes none)" in err
    assert "class_means" not in out and "residual" in out


def test_decompose_missing_class_suggests_classes_none(capsys, tmp_path, user_module):
    args = ["decompose", *TINY, "--model", "msgmod:regressor"]
    args += ["--data", "msgmod:one_hot_without_class_0", "--loss", "mse"]
    line = error_line(*run(capsys, tmp_path, *args))
    assert "classes [0] have no samples" in line
    assert "(or pass --classes none for the H, G and H - G split alone)" in line
