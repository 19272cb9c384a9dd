"""The XLA flags of the whole test suite, for this process and every process a test starts.

The suite's programs are tiny and run briefly, so XLA:CPU's compilation is most of its time; without
LLVM's expensive passes it compiles them in about half the time (tests/test_zero_copy.py: 80 -> 62 s
on the 2-core VM). The programs compute the same functions: tolerances and bit-equalities between
two runs hold as before (both sides compile alike). Benchmarks never run with these flags.
"""

from __future__ import annotations

FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a child process: the suite's flags and `extra` (e.g. a forced device count)."""
    return " ".join((*FLAGS, *extra))
