"""Run untrusted Python (model-written programs plus their tests) in a separate, limited process.

Generated code is never exec'd in the evaluating process. Each program runs as
`python -I` (isolated: no user site, no PYTHON* variables) in a fresh temporary directory, with
stdin closed and a minimal environment. The child's bootstrap sets its rlimits (address space,
CPU seconds, file size, no core files) before it reads the program. The child leads its own
process group, so a timeout kills everything it spawned. Output goes to files, not pipes, so a
chatty program cannot deadlock us.

The limits are set by the child itself, not by a `preexec_fn`: with no Python code to run between
fork and exec, `subprocess` spawns without `os.fork()` in the evaluating (multi-threaded JAX)
process. `run_many` gives parallelism by keeping several children alive from one thread.

Limits worth knowing: rlimits are not a security boundary against a hostile process (no network,
filesystem or process-count isolation beyond the above; a root child could raise its limits).
They are enough for benchmark solutions, which are merely buggy, not malicious.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Sequence

Status = Literal["passed", "failed", "timeout", "memory", "error"]

_STDERR_TAIL_CHARS = 2000
_MAX_FILE_BYTES = 64 * 1024 * 1024
_POLL_S = 0.005
# argv: program, run_name, memory bytes, CPU seconds. Sets the limits, then runs the program under
# `run_name` ("__main__" gives plain script semantics). RLIMIT_CPU counts the interpreter's
# start-up too (CPU time is cumulative).
_BOOTSTRAP = (
    "import resource as r, runpy, sys\n"
    "m, c, f = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])\n"
    "r.setrlimit(r.RLIMIT_AS, (m, m)); r.setrlimit(r.RLIMIT_CPU, (c, c + 1))\n"
    "r.setrlimit(r.RLIMIT_CORE, (0, 0)); r.setrlimit(r.RLIMIT_FSIZE, (f, f))\n"
    "del m, c, f, r\n"
    "runpy.run_path(sys.argv[1], run_name=sys.argv[2])"
)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: `passed` is True only for a clean exit (status "passed").

    status: "passed" (exit 0), "failed" (non-zero exit: an exception or failed assert),
    "timeout" (wall-clock or CPU limit hit), "memory" (MemoryError / allocation refused),
    "error" (killed by another signal, or the sandbox could not start it).
    """

    passed: bool
    status: Status
    stderr_tail: str


@dataclasses.dataclass
class _Running:
    proc: subprocess.Popen
    root: Path
    stderr_path: Path
    deadline: float


def _child_env(workdir: Path) -> dict[str, str]:
    """A small environment: single-threaded BLAS (keeps virtual memory under RLIMIT_AS)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _launch(code: str, timeout_s: float, memory_mb: int, as_main: bool) -> _Running:
    root = Path(tempfile.mkdtemp(prefix="psynth_sandbox_"))
    workdir, program, stderr_path = root / "work", root / "program.py", root / "stderr.txt"
    cpu_s = max(1, math.ceil(timeout_s)) + 1
    try:
        workdir.mkdir()
        program.write_text(code, encoding="utf-8", errors="replace")
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable, "-I", "-c", _BOOTSTRAP, str(program), "__main__" if as_main else "__sandbox__",
                    str(memory_mb * 1024 * 1024), str(cpu_s), str(_MAX_FILE_BYTES),
                ],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_child_env(workdir),
                start_new_session=True,
                close_fds=True,
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return _Running(proc, root, stderr_path, time.monotonic() + timeout_s)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it is the group leader); ignore if gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int, timed_out: bool, stderr: str) -> Status:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    return "failed" if returncode > 0 else "error"


def _tail(path: Path) -> str:
    """The last _STDERR_TAIL_CHARS characters of a file, without reading all of it."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * _STDERR_TAIL_CHARS))
        return f.read().decode("utf-8", errors="replace")[-_STDERR_TAIL_CHARS:]


def _stop(run: _Running) -> None:
    """Kill whatever is left of the program's process group and reap the child."""
    _kill_group(run.proc)
    run.proc.wait()


def _finish(run: _Running) -> SandboxResult:
    """Wait for the child (until its deadline), kill its group, read stderr, delete its files."""
    timed_out = False
    try:
        run.proc.wait(timeout=max(0.0, run.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _stop(run)  # also kills processes the program spawned and left behind
    stderr = _tail(run.stderr_path)
    shutil.rmtree(run.root, ignore_errors=True)
    status = _classify(run.proc.returncode, timed_out, stderr)
    return SandboxResult(passed=status == "passed", status=status, stderr_tail=stderr)


def _safe_launch(code: str, timeout_s: float, memory_mb: int, as_main: bool) -> _Running | SandboxResult:
    try:
        return _launch(code, timeout_s, memory_mb, as_main)
    except OSError as exc:  # could not create files or spawn the interpreter
        return SandboxResult(passed=False, status="error", stderr_tail=f"sandbox: {exc}")


def run_code(code: str, timeout_s: float = 10.0, memory_mb: int = 512, as_main: bool = True) -> SandboxResult:
    """Run `code` as a program in a limited child process and report how it ended.

    as_main=False runs it under the module name "__sandbox__", so `if __name__ == "__main__":`
    blocks are skipped (what the benchmark scorers use: demo code in a solution is not a test).
    """
    run = _safe_launch(code, timeout_s, memory_mb, as_main)
    return run if isinstance(run, SandboxResult) else _finish(run)


def run_many(
    codes: Sequence[str],
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    as_main: bool = True,
) -> list[SandboxResult]:
    """`run_code` over many programs, at most `workers` children at once; results in input order.

    Children are started and polled from this thread: no thread pool is needed to keep several
    alive.
    """
    results: list[SandboxResult | None] = [None] * len(codes)
    pending = list(range(len(codes)))[::-1]
    running: dict[int, _Running] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                i = pending.pop()
                run = _safe_launch(codes[i], timeout_s, memory_mb, as_main)
                if isinstance(run, SandboxResult):
                    results[i] = run
                else:
                    running[i] = run
            done = [i for i, r in running.items() if r.proc.poll() is not None or time.monotonic() >= r.deadline]
            for i in done:
                results[i] = _finish(running.pop(i))
            if not done:
                time.sleep(_POLL_S)
    finally:  # interrupted: leave no child behind
        for run in running.values():
            _stop(run)
            shutil.rmtree(run.root, ignore_errors=True)
    return [r for r in results if r is not None]  # all filled: the loop ends when none is pending
