"""One writer per run directory: `run.lock`, taken by `psynth train` and `psynth eval`.

Two trainers (or two evals) writing one run directory corrupt it: Orbax saves collide, metrics
and records interleave. The lock makes the second one fail at once, naming the holder:

    psynth train: error: runs/x is in use by psynth train (pid 4242 on host tpu-vm-0, since
    2026-05-01T10:00:00Z); wait for it to finish, or choose another checkpoint.dir

How: `run.lock` in the directory holds the holder's pid, host, start time and command (JSON),
and the holder keeps an exclusive `flock` on it. The kernel drops a flock when its process dies
(even by SIGKILL), so a lock left by a killed process is free; its file still names the dead
holder, and the next run says it takes it over. The pid check backs the flock up on file systems
where flock does not work: a holder on this host whose pid is gone (or reused by another
program, told apart by its start time) is stale; a holder on another host cannot be checked
from here, so that lock is refused with the file to delete if its process is gone.

Multi-process runs take the lock once, on process 0 (the caller passes `primary`). Remote run
directories (gs://...) are NOT locked: object stores have no lock a process can hold and lose
when it dies, so keep one trainer per remote run directory (the launch scripts do).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

LOCK_NAME = "run.lock"


class RunDirLocked(ValueError):
    """The run directory is held by another live process (an input error: choose another dir or wait)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime (fields after "comm")


def _alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this host is running and is the same process (start time) as recorded."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # a zombie has exited; only its exit status is left
            return False
    except OSError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def describe_holder(info: dict) -> str:
    return (f"{info.get('command', 'another process')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


class RunLock:
    """The exclusive lock of one local run directory (see the module docstring)."""

    def __init__(self, directory: str | Path, command: str, field: str):
        """command: who takes it (shown to a second run); field: the flag or config field naming the
        directory, for the message that tells the user what to change."""
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command
        self.field = field
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (creating the directory), or raise RunDirLocked naming the holder.
        Returns a note when a stale lock of a dead process was taken over, else None."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirLocked(self._busy_message(self._read_info(wait_s=1.0))) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder removed the file as we opened it: take the new one
        try:
            note = self._check_previous(self._read_fd(fd))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                    "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "start": _process_start(os.getpid())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return note

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------ helpers
    def _check_previous(self, info: dict | None) -> str | None:
        """None for a fresh lock; a note for a stale one taken over; RunDirLocked for a live holder
        that holds no flock (a file system without flock) or one on another host."""
        if not info or info.get("pid") == os.getpid():
            return None  # free, or left by an earlier holder object of this very process
        pid, host = info.get("pid"), info.get("host")
        if host != socket.gethostname():
            raise RunDirLocked(
                f"{self.directory} is locked by {describe_holder(info)}; this host cannot check whether that "
                f"process still runs: if it does not, delete {self.path} and rerun"
            )
        if isinstance(pid, int) and _alive(pid, info.get("start")):
            raise RunDirLocked(self._busy_message(info))
        return f"took over the lock of {describe_holder(info)}: that process is gone"

    def _busy_message(self, info: dict | None) -> str:
        holder = describe_holder(info) if info else "another process (starting up: it has not written its details yet)"
        return f"{self.directory} is in use by {holder}; wait for it to finish, or choose another {self.field}"

    def _read_info(self, wait_s: float) -> dict | None:
        """The holder's details, waiting up to `wait_s` for a holder that is still writing them."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = json.loads(self.path.read_text() or "null")
            except (OSError, ValueError):
                info = None
            if info or time.monotonic() >= deadline:
                return info
            time.sleep(0.05)

    @staticmethod
    def _read_fd(fd: int) -> dict | None:
        data = os.pread(fd, 65536, 0)
        try:
            info = json.loads(data or b"null")
        except ValueError:
            return None
        return info if isinstance(info, dict) else None


@contextlib.contextmanager
def run_dir_session(directory: str, command: str, field: str, *, primary: bool = True,
                    disposable: Iterable[str] = (), log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `directory`'s lock for the block; if the block fails and the directory then holds
    nothing of value, remove what this session added, so a failed start leaves no empty run dir
    (nor a stored config that a corrected rerun would be refused against).

    Of value: any non-empty file other than `disposable` ones (stored configs, written first) and the
    lock. primary: False on processes other than 0 of a multi-process run (they take no lock).
    """
    say = log or (lambda message: print(f"[{command}] {message}", file=sys.stderr, flush=True))
    remote = "://" in directory
    if remote and primary:
        say(f"{directory} is remote: it is not locked (keep one {command} per run directory)")
    if remote or not primary:
        yield
        return
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{field} {directory} is a file, not a directory")
    created = not path.exists()
    disposable = tuple(disposable)
    had = {name for name in disposable if (path / name).exists()}
    lock = RunLock(path, command, field)
    note = lock.acquire()
    if note:
        say(note)
    try:
        yield
    except BaseException:
        lock.release()
        _remove_if_unused(path, created, [n for n in disposable if n not in had])
        raise
    lock.release()


def _remove_if_unused(path: Path, created: bool, new_disposable: list[str]) -> None:
    """Remove this session's disposable files, empty folders and (if it made it) the directory,
    when no file of value is left in it."""
    keep = set(new_disposable) | {LOCK_NAME}
    for f in path.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.relative_to(path).as_posix() not in keep:
            return  # something of value: leave everything
    for name in new_disposable:
        with contextlib.suppress(OSError):
            (path / name).unlink()
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty ones go
    if created:
        with contextlib.suppress(OSError):
            if not any(f.is_file() and f.stat().st_size > 0 for f in path.rglob("*")):
                shutil.rmtree(path)
