"""The one timer (psynth_jax.measure.timing): what it calls, what it counts, what it raises."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from psynth_jax.measure.timing import OutOfMemory, is_oom, time_calls


def test_compile_call_is_separate_and_repeats_are_counted():
    calls = []
    t = time_calls(lambda: calls.append(1) or jnp.ones(3), 4)
    assert len(calls) == 5 and len(t.times_s) == 4  # one compile call + 4 timed
    assert t.first_s >= 0 and min(t.times_s) >= 0 and t.median_ms == pytest.approx(1e3 * t.median_s)
    assert len(time_calls(lambda: jnp.ones(3), 0).times_s) == 1  # at least one timed call


def test_setup_builds_a_fresh_input_per_call_outside_the_clock():
    made, seen, waited = [], [], []

    def setup():
        made.append(len(made))
        return made[-1]

    t = time_calls(lambda x: seen.append(x) or x, 2, setup=setup, wait=waited.append)
    assert seen == [0, 1, 2] and made == [0, 1, 2]
    assert waited == [0, 0, 1, 1, 2, 2]  # each setup result, then each call's result, is waited for
    assert len(t.times_s) == 2


def test_out_of_memory_is_a_result_other_errors_propagate():
    def boom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB")

    with pytest.raises(OutOfMemory, match="RESOURCE_EXHAUSTED"):
        time_calls(boom, 1)
    with pytest.raises(ValueError, match="plain"):
        time_calls(lambda: (_ for _ in ()).throw(ValueError("plain")), 1)
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(OutOfMemory("x")) and not is_oom(ValueError("shape mismatch"))
