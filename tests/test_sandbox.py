"""The sandbox runs code in a separate, limited process and reports how it ended."""

from __future__ import annotations

import os
import time
from pathlib import Path

from psynth_jax.eval.sandbox import run_code, run_many


def test_clean_exit_passes():
    result = run_code("x = sum(range(10))\nassert x == 45\n")
    assert result.passed and result.status == "passed"


def test_failing_assert_is_failed_with_traceback():
    result = run_code("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not result.passed
    assert result.status == "failed"
    assert "AssertionError: arithmetic" in result.stderr_tail


def test_syntax_error_is_failed():
    assert run_code("def f(:\n").status == "failed"


def test_infinite_loop_times_out_promptly():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert elapsed < 1.0 + 2.0, f"took {elapsed:.2f}s for a 1 s timeout"


def test_sleeping_program_times_out_and_its_children_die():
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "print(child.pid, file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    result = run_code(code, timeout_s=1.0)
    assert result.status == "timeout"
    pid = int(result.stderr_tail.split()[0])
    time.sleep(0.2)
    status = Path(f"/proc/{pid}/status")
    # Killed with its process group: gone, or a zombie waiting for init to reap it.
    assert not status.exists() or "\nState:\tZ" in status.read_text()


def test_memory_bomb_is_contained():
    one_shot = run_code("x = bytearray(4 * 1024**3)\n", memory_mb=256)
    assert one_shot.status in ("memory", "failed") and not one_shot.passed
    growing = run_code("chunks = []\nwhile True:\n    chunks.append(b' ' * 10**7)\n", memory_mb=256, timeout_s=5.0)
    assert growing.status in ("memory", "failed")
    assert run_code("print('still alive')").passed  # this process is unharmed


def test_isolated_interpreter_in_fresh_temp_dir():
    code = (
        "import os, sys\n"
        "assert sys.flags.isolated == 1\n"
        "assert os.listdir('.') == []\n"
        "open('scratch.txt', 'w').write('x')\n"
        "print(os.getcwd(), file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    result = run_code(code)
    assert result.status == "failed"
    workdir = result.stderr_tail.strip().splitlines()[-1]
    assert workdir != os.getcwd() and not Path(workdir).exists()  # removed afterwards


def test_main_guard_runs_only_as_main():
    code = "if __name__ == '__main__':\n    raise SystemExit(3)\n"
    assert run_code(code).status == "failed"
    assert run_code(code, as_main=False).passed


def test_stdin_is_closed():
    assert "EOFError" in run_code("input()\n").stderr_tail


def test_run_many_keeps_order_and_runs_in_parallel():
    codes = ["assert True", "assert False", "while True: pass", "import sys; sys.exit(0)"]
    results = run_many(codes, workers=2, timeout_s=1.0)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]
    start = time.monotonic()
    assert all(r.passed for r in run_many(["import time; time.sleep(0.5)"] * 6, workers=3))
    elapsed = time.monotonic() - start
    assert elapsed < 2.2, f"6 x 0.5 s on 3 workers took {elapsed:.2f}s (3 s if run one by one)"


def test_child_runs_under_its_limits():
    code = (
        "import resource as r\n"
        "assert r.getrlimit(r.RLIMIT_AS) == (256 * 1024**2,) * 2, r.getrlimit(r.RLIMIT_AS)\n"
        "assert r.getrlimit(r.RLIMIT_CPU) == (4, 5), r.getrlimit(r.RLIMIT_CPU)\n"
        "assert r.getrlimit(r.RLIMIT_CORE) == (0, 0)\n"
        "assert r.getrlimit(r.RLIMIT_FSIZE)[0] == 64 * 1024**2\n"
    )
    result = run_code(code, timeout_s=3.0, memory_mb=256)
    assert result.passed, result.stderr_tail


def test_spawning_does_not_fork_the_calling_interpreter():
    # os.fork() in a multi-threaded process (JAX's) runs Python at-fork hooks and makes JAX warn.
    # The sandbox sets limits inside the child, so subprocess never needs a Python-level fork.
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    assert run_code("pass").passed and run_many(["pass"] * 2)[1].passed
    assert forks == []
