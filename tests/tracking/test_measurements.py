"""The measurement registry: the built-ins come from the module that defines it, not from an
import elsewhere, and user measurements are added and refused explicitly."""

from __future__ import annotations

import pytest

from curvscope.tracking import measurements


def test_the_registry_starts_as_the_builtin_table():
    builtins = measurements.builtin_measurements()
    assert list(builtins) == ["top", "trace", "density", "stability", "ntk", "stochastic_edge"]
    for name, fn in builtins.items():
        assert measurements.MEASUREMENTS[name] is fn


def test_register_measurement_adds_and_refuses_a_clash():
    def mine(op, model, optimizer, tracker):
        return {}, {}

    try:
        assert measurements.register_measurement("mine_test", mine) is mine
        assert measurements.MEASUREMENTS["mine_test"] is mine
        with pytest.raises(ValueError, match="already registered"):
            measurements.register_measurement("mine_test", lambda *args: ({}, {}))
        with pytest.raises(ValueError, match="already registered"):
            measurements.register_measurement("top", mine)
    finally:
        measurements.MEASUREMENTS.pop("mine_test", None)
    assert measurements.MEASUREMENTS["top"] is measurements.measure_top
