"""The model cache (curvscope.model_cache) of the trained default model.

A cache hit must give the model training gives, bit for bit, without training; every way the
cache can be turned off must train and write nothing; a damaged, foreign or truncated entry is
never loaded; an unwritable folder never stops a command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curvscope import model_cache, zoo


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(model_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(model_cache.ENV_OFF, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def count_training(monkeypatch) -> list[int]:
    """Counts calls of zoo.train (the training the cache saves)."""
    calls: list[int] = []
    real = zoo.train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "train", counting)
    return calls


def entries(folder: Path, name: str = "trained_digits_mlp") -> list[Path]:
    return sorted(folder.glob(f"{name}-*.pt")) if folder.exists() else []


def test_hit_is_the_trained_model_without_training(folder, count_training):
    fresh = zoo.trained_digits_mlp(steps=20, cache=False)
    assert count_training == [1] and entries(folder) == []  # (the digits are cached)
    first = zoo.trained_digits_mlp(steps=20)
    assert count_training == [1, 1] and len(entries(folder)) == 1
    second = zoo.trained_digits_mlp(steps=20)
    assert count_training == [1, 1], "the second call trained again"
    assert_same_model(first, fresh)
    assert_same_model(second, fresh)
    assert not second.training
    assert second is not first


def test_arguments_select_their_own_entry(folder, count_training):
    a = zoo.trained_digits_mlp(steps=5)
    b = zoo.trained_digits_mlp(steps=6)
    c = zoo.trained_digits_mlp(steps=5, hidden=(16,))
    d = zoo.trained_digits_mlp(steps=5, activation="relu", batchnorm=True)
    assert len(count_training) == 4 and len(entries(folder)) == 4
    assert_same_model(b, zoo.trained_digits_mlp(steps=6, cache=False))
    assert_same_model(c, zoo.trained_digits_mlp(steps=5, hidden=(16,), cache=False))
    assert_same_model(d, zoo.trained_digits_mlp(steps=5, activation="relu", batchnorm=True))
    assert not torch.equal(a[0].weight, b[0].weight)
    assert len(count_training) == 6  # the two cache=False calls; d came from the cache


def test_key_holds_versions_and_source(folder):
    key = model_cache.entry_key("m", {"steps": 1}, "abc")
    assert key["torch"] == str(torch.__version__) and key["source"] == "abc"
    changed = model_cache.entry_path(folder, {**key, "torch": "0.0"})
    assert changed != model_cache.entry_path(folder, key)
    assert model_cache.entry_path(folder, key).name.startswith("m-")


@pytest.mark.parametrize(
    "environment",
    [{"CURVSCOPE_NO_CACHE": "1"}, {"CURVSCOPE_CACHE_DIR": ""}],
    ids=["no-cache", "empty-dir"],
)
def test_turned_off_by_the_environment(folder, count_training, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    zoo.trained_digits_mlp(steps=3)
    zoo.trained_digits_mlp(steps=3)
    assert count_training == [1, 1] and entries(folder) == []


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(model_cache.ENV_DIR, raising=False)
    monkeypatch.delenv(model_cache.ENV_OFF, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_dir() == tmp_path / "xdg" / "curvscope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache.cache_dir() == tmp_path / "home" / ".cache" / "curvscope"
    monkeypatch.setenv(model_cache.ENV_OFF, "0")  # "0" leaves the cache on
    assert model_cache.cache_dir() == tmp_path / "home" / ".cache" / "curvscope"


def test_no_home_folder_turns_it_off(monkeypatch):
    monkeypatch.delenv(model_cache.ENV_DIR, raising=False)
    monkeypatch.delenv(model_cache.ENV_OFF, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert model_cache.cache_dir() is None


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def damage_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def damage_garbage(path: Path) -> None:
    path.write_bytes(b"not a cache file at all")


def damage_format(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"curvscope-model-cache 1 ", b"curvscope-model-cache 9 ", 1))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_garbage, damage_format])
def test_damaged_entry_is_replaced(folder, count_training, damage):
    trained = zoo.trained_digits_mlp(steps=4)
    (path,) = entries(folder)
    damage(path)
    with pytest.warns(RuntimeWarning, match="damaged model cache entry"):
        again = zoo.trained_digits_mlp(steps=4)
    assert count_training == [1, 1]
    assert_same_model(again, trained)
    zoo.trained_digits_mlp(steps=4)  # the replaced entry loads without a warning
    assert count_training == [1, 1]


def test_entry_of_another_model_is_refused(folder, count_training):
    """A well-formed file whose key differs (copied or renamed by hand) is not loaded."""
    zoo.trained_digits_mlp(steps=4)
    zoo.trained_digits_mlp(steps=5)
    four, five = sorted(entries(folder), key=lambda p: p.stat().st_mtime_ns)
    four.write_bytes(five.read_bytes())
    with pytest.warns(RuntimeWarning, match="another entry"):
        again = zoo.trained_digits_mlp(steps=4)
    assert_same_model(again, zoo.trained_digits_mlp(steps=4, cache=False))


def test_unwritable_folder_warns_and_still_gives_the_model(tmp_path, monkeypatch, count_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(model_cache.ENV_DIR, str(blocker / "cache"))  # below a file: mkdir fails
    with pytest.warns(RuntimeWarning, match="could not write the model cache entry"):
        model = zoo.trained_digits_mlp(steps=3)
    assert_same_model(model, zoo.trained_digits_mlp(steps=3, cache=False))


def test_failed_write_leaves_no_partial_file(folder, monkeypatch):
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.warns(RuntimeWarning, match="No space left"):
        zoo.trained_digits_mlp(steps=3)
    assert list(folder.iterdir()) == []


def test_second_process_starts_without_training(folder):
    """The CLI's case: a later process loads what an earlier one trained (default model)."""
    code = (
        "from curvscope import zoo; "
        "zoo.train = None; m = zoo.trained_digits_mlp(); "  # training would raise TypeError
        "print(sum(float(p.detach().sum()) for p in m.parameters()))"
    )
    env = {**os.environ, model_cache.ENV_DIR: str(folder)}
    zoo_model = zoo.trained_digits_mlp()  # fills the cache in this process
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert float(out.stdout) == sum(float(p.detach().sum()) for p in zoo_model.parameters())


def test_digits_arrays_cached_bit_for_bit_without_scikit_learn(folder):
    x, y = zoo.digits_arrays(seed=3)
    assert len(entries(folder, "digits")) == 1
    again_x, again_y = zoo.digits_arrays(seed=3)
    assert again_x.dtype == x.dtype and again_y.dtype == y.dtype
    assert np.array_equal(again_x, x) and np.array_equal(again_y, y)
    again_x[0, 0] = 99.0  # a fresh array each call: the next caller sees the data
    assert zoo.digits_arrays(seed=3)[0][0, 0] == x[0, 0]
    assert not np.array_equal(zoo.digits_arrays(seed=4)[1], y)
    code = (
        "import sys; from curvscope import zoo; x, y = zoo.digits_arrays(seed=3); "
        "print('sklearn' in sys.modules, float(x.sum()), int(y.sum()))"
    )
    env = {**os.environ, model_cache.ENV_DIR: str(folder)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", repr(float(x.sum())), str(int(y.sum()))]
