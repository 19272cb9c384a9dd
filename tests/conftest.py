"""Suite-wide fixture: drop JAX's compiled executables after every test module.

XLA's CPU backend maps each compiled executable's code into its own memory regions, and JAX keeps
every executable alive in its jit caches. One pytest process runs the whole suite, so the regions
add up (about 11,000 after tests/test_zero_copy.py alone) until the kernel's per-process limit
(vm.max_map_count, 65,530 by default) is reached and the next compile crashes with a segmentation
fault inside XLA. Clearing the caches between modules releases them; a module's tests still share
their compilations.
"""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    yield
    jax.clear_caches()
    gc.collect()
