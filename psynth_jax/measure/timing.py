"""The one timer every latency in the project goes through (TTFT of the synthesis paths, benchmarks).

`time_calls(fn, repeats)` calls `fn` once to compile (recorded, not counted), then `repeats`
times, each until its result is ready on the device, and returns the wall times. Inputs a call
consumes (a donated cache) come from `setup`, built and waited for before the clock starts.
`wait` says how to wait for a result: `jax.block_until_ready` by default, a CUDA synchronize
for the PyTorch peer. A device that runs out of memory raises `OutOfMemory` (a result the
benchmarks record), any other error propagates unchanged.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


class OutOfMemory(RuntimeError):
    """A timed call ran out of device memory (the message is the runtime's first line)."""


def is_oom(err: BaseException) -> bool:
    """Whether an exception from JAX or PyTorch reports exhausted device memory."""
    if isinstance(err, OutOfMemory):
        return True
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError"


@dataclasses.dataclass
class Timing:
    """One timed function: the first call (compilation included) and the timed calls, seconds."""

    first_s: float
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median_s

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times_s)


def time_once(fn: Callable[..., Any], *, setup: Callable[[], Any] | None = None,
              wait: Callable[[Any], Any] | None = None) -> float:
    """One call of fn, waited for with `wait` (default `jax.block_until_ready`): its wall time, s.

    setup: the call gets a fresh `setup()` result as its only argument, built and waited for
    before the clock starts. A call that runs out of device memory raises `OutOfMemory`.
    Benchmarks that alternate two implementations call this per call (time_calls: per function).
    """
    if wait is None:
        wait = jax.block_until_ready
    try:
        if setup is None:
            t0 = time.perf_counter()
            wait(fn())
        else:
            arg = setup()
            wait(arg)
            t0 = time.perf_counter()
            wait(fn(arg))
        return time.perf_counter() - t0
    except Exception as err:  # XlaRuntimeError has no stable import path across jax versions
        if is_oom(err) and not isinstance(err, OutOfMemory):
            raise OutOfMemory(str(err).splitlines()[0][:300]) from err
        raise


def time_calls(
    fn: Callable[..., Any],
    repeats: int,
    *,
    setup: Callable[[], Any] | None = None,
    wait: Callable[[Any], Any] | None = None,
) -> Timing:
    """Call fn once (compile), then max(repeats, 1) timed times; each call is waited for with `wait`.

    setup: each call gets a fresh `setup()` result as its only argument, built and waited for
    before the clock starts (for functions that donate their input). wait: blocks until a
    result is ready (default `jax.block_until_ready`).
    """
    first = time_once(fn, setup=setup, wait=wait)
    times = [time_once(fn, setup=setup, wait=wait) for _ in range(max(int(repeats), 1))]
    return Timing(first, times)
