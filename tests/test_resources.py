"""Default memory budgets read the device's available memory, with a fallback."""

import torch

from curvscope.resources import available_memory, memory_share


def test_cpu_memory_is_read_and_shared():
    available = available_memory("cpu")
    assert available is not None and available > 0
    share = memory_share("cpu", 0.25)
    assert 0 < share <= available  # a quarter of a number read a moment later


def test_unknown_device_falls_back():
    assert available_memory(torch.device("meta")) is None
    assert memory_share("meta", 0.25, fallback=123) == 123
