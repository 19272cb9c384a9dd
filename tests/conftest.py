"""Suite-wide: CPU only; one XLA compilation cache per session; fast-compile XLA flags
(tests/fast_compile.py); drop JAX's compiled executables after every
test module; run the longest modules first.

XLA's CPU backend maps each compiled executable's code into its own memory regions, and JAX keeps
every executable alive in its jit caches. One pytest process runs the whole suite, so the regions
add up (about 11,000 after tests/test_zero_copy.py alone) until the kernel's per-process limit
(vm.max_map_count, 65,530 by default) is reached and the next compile crashes with a segmentation
fault inside XLA. Clearing the caches between modules releases them; a module's tests still share
their compilations.

`make test` runs the suite on 2 pytest-xdist workers, a whole module per worker (`--dist
loadfile`, so module-scoped fixtures run once). Modules are handed out in collection order, so the
longest ones (measured on the 2-core VM, about 40-150 s each) are collected first and the short
ones fill the other worker at the end, instead of one long module running alone last; the two
modules that start 2-process pods are handed out far apart.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

# The suite runs on the CPU. The test extra installs libtpu (the TPU compiler, for `psynth plan`
# and tests/test_tpu_lowering.py): without JAX_PLATFORMS jax would try it as a backend first
# (and log libtpu's warnings, no TPU being here); libtpu lets one process at a time load it unless
# told that these are compile-only ones (two xdist workers, and the plans' child processes).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# XLA's persistent compilation cache, one fresh folder per test session (made by the first process
# that imports this file, inherited by the xdist workers and every process a test starts): many
# tests start the same command several times (a run killed and resumed, a pod relaunched, Ctrl-C
# at several moments), and each start compiled the same programs again. Every compile is kept
# (no minimum time or size); a cache hit skips only XLA's compilation, never JAX's tracing.
# Measured on the 2-core VM: tests/test_trainer.py's relaunched run 66 -> 48 s.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="psynth-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from fast_compile import xla_flags  # noqa: E402 - before jax reads XLA_FLAGS

os.environ["XLA_FLAGS"] = xla_flags(*os.environ.get("XLA_FLAGS", "").split())

import jax  # noqa: E402
import pytest  # noqa: E402

# serial seconds on the 2-core VM, longest first; except that the two modules running 2-process pods
# are handed out apart (test_multihost.py after ~450 s of the other worker's modules): two pods at once
# are 4 processes on 2 cores, each waiting in its collectives for a peer that is not running
LONGEST_FIRST = (
    "test_pods_documented.py", "test_sharded.py", "test_trainer.py", "test_gpu_check.py", "test_eval_runner.py",
    "test_multihost.py",
    "test_core_consistency.py", "test_train_step.py", "test_zero_copy.py", "test_default_model.py",
    "test_splash_attention.py", "test_checkpoint_safety.py", "test_bench.py", "test_serve.py",
    "test_serve_documented.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules in LONGEST_FIRST first, in that order; the others after them, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps order within a module


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's compilation cache goes with the process that made it."""
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
