"""The run-directory lock (psynth_jax.cli.run_lock) and `psynth train` / `psynth eval` behind it.

A second process on a held directory fails at once, naming the holder (pid, host, since when);
the lock of a SIGKILLed process is taken over, saying so; a holder this host cannot check is
refused with the file to delete; a failed start removes the directory it created, and only when
nothing of value was written. The holders are real processes (flock is per process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from psynth_jax.cli.main import EXIT_USAGE, main
from psynth_jax.cli.run_lock import LOCK_NAME, RunDirLocked, RunLock, run_dir_session

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys
    from psynth_jax.cli.run_lock import RunLock
    RunLock(sys.argv[1], "psynth train", "checkpoint.dir").acquire()
    print("ready", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run; yields (process, run dir)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    yield proc, run
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_second_holder_fails_at_once_naming_the_first(holder):
    proc, run = holder
    with pytest.raises(RunDirLocked) as e:
        RunLock(run, "psynth eval", "out_dir").acquire()
    msg = str(e.value)
    assert f"{run} is in use by psynth train (pid {proc.pid} on host {socket.gethostname()}, since 20" in msg
    assert msg.endswith("wait for it to finish, or choose another out_dir")
    info = json.loads((run / LOCK_NAME).read_text())
    assert info["pid"] == proc.pid  # the holder's record is untouched


def test_lock_of_a_killed_process_is_taken_over(holder, capsys):
    proc, run = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    notes = []
    with run_dir_session(str(run), "psynth train", "checkpoint.dir", log=notes.append):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert notes == [f"took over the lock of psynth train (pid {proc.pid} on host {socket.gethostname()}, since "
                     f"{notes[0].split('since ')[1].split(')')[0]}): that process is gone"]
    assert not (run / LOCK_NAME).exists()  # released at the end of the session


def test_stale_record_without_flock(tmp_path):
    """On a file system without flock, the record alone decides: a dead pid is stale, a live one holds
    it, another host's cannot be checked from here."""
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "psynth eval", "since": "then"}
    (run / LOCK_NAME).write_text(json.dumps(record))
    lock = RunLock(run, "psynth train", "checkpoint.dir")
    assert "that process is gone" in lock.acquire()
    lock.release()
    (run / LOCK_NAME).write_text(json.dumps({**record, "pid": os.getppid(), "start": None}))  # alive, no flock
    with pytest.raises(RunDirLocked, match=f"in use by psynth eval \\(pid {os.getppid()} "):
        RunLock(run, "psynth train", "checkpoint.dir").acquire()
    (run / LOCK_NAME).write_text(json.dumps({**record, "host": "elsewhere"}))
    with pytest.raises(RunDirLocked, match=f"this host cannot check whether that process still runs: if it does "
                                           f"not, delete {run / LOCK_NAME} and rerun"):
        RunLock(run, "psynth train", "checkpoint.dir").acquire()


def test_train_and_eval_on_a_held_directory_fail_before_writing(holder, tmp_path, capsys):
    proc, run = holder
    (run / "config.yaml").write_text("# the holder's config\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(f"""base: {REPO / 'configs/base.yaml'}
data: {{train: [{{path: {REPO / 'configs/base.yaml'}, builder: aggregation}}]}}
train: {{steps: 2}}
checkpoint: {{dir: {run}}}
""")
    assert main(["train", "--config", str(train_cfg), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"psynth train: error: {run} is in use by psynth train (pid {proc.pid} on host" in err
    assert "choose another checkpoint.dir" in err
    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text(f"tasks: [{{name: gsm8k, limit: 1}}]\nout_dir: {run}\n")
    assert main(["eval", "--config", str(eval_cfg), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"psynth eval: error: {run} is in use by psynth train (pid {proc.pid}" in err and "another out_dir" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_failed_session_removes_only_what_is_worthless(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), run_dir_session(str(fresh), "psynth eval", "out_dir",
                                                      disposable=("run.json",), log=print):
        (fresh / "run.json").write_text("{}")
        (fresh / "checkpoints").mkdir()
        raise RuntimeError("model failed to load")
    assert not fresh.exists()
    worked = tmp_path / "worked"
    with pytest.raises(RuntimeError), run_dir_session(str(worked), "psynth eval", "out_dir",
                                                      disposable=("run.json",), log=print):
        (worked / "run.json").write_text("{}")
        (worked / "records.jsonl").write_text('{"answer": 1}\n')
        raise RuntimeError("crashed after some answers")
    assert sorted(p.name for p in worked.iterdir()) == ["records.jsonl", "run.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "run.json").write_text('{"kept": true}')
    with pytest.raises(RuntimeError), run_dir_session(str(existing), "psynth eval", "out_dir",
                                                      disposable=("run.json",), log=print):
        raise RuntimeError("failed")
    assert (existing / "run.json").read_text() == '{"kept": true}'  # not this session's: never removed
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir .* is a file, not a directory"):
        with run_dir_session(str(a_file), "psynth eval", "out_dir"):
            pass
