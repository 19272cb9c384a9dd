"""Rehearse a pod on one machine: N `psynth` processes on localhost, joined as one JAX runtime.

    python -m psynth_jax.cli.local_pod --processes 2 --devices 4 -- train --config configs/x.yaml
    launch/local_pod.sh 2 -- eval --config configs/eval_smoke.yaml

Each process gets what a pod host gets (psynth_jax/distributed.py): JAX_COORDINATOR_ADDRESS (a free localhost
port), JAX_NUM_PROCESSES, JAX_PROCESS_ID, and, on CPU, JAX_PLATFORMS=cpu and
JAX_NUM_CPU_DEVICES. They run the same command through the same code path as on a TPU slice:
config, data sharding across processes, checkpoint directory, resume. Like a pod, one failing
process fails the job: the others are stopped (SIGTERM, then SIGKILL after a grace period).
SIGTERM / SIGINT to the launcher goes to every process (a preemption of the whole slice); a
single process can be signalled through its pid in `--log-dir`/pids.json.

Each process's output goes to `--log-dir`/process-<i>.log; process 0's is also echoed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: local_pod [--processes N] [--devices D] [--log-dir DIR] -- PSYNTH_ARGS...")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="local_pod", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="processes (hosts) to start")
    p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    p.add_argument("--log-dir", default="runs/local_pod", help="per-process logs and pids.json")
    p.add_argument("--grace-s", type=float, default=30.0, help="after a failure or a signal, seconds before SIGKILL")
    p.add_argument("--timeout-s", type=float, default=None, help="stop everything after this long (default: never)")
    args = p.parse_args(argv[:cut])
    if args.processes < 1 or args.devices < 1:
        raise SystemExit("--processes and --devices must be at least 1")
    command = argv[cut + 1 :]
    if not command:
        raise SystemExit("give the psynth command after --, e.g. -- train --config CONFIG")
    return args, command


def launch(args: argparse.Namespace, command: list[str]) -> int:
    """Start the processes, wait for them, return the job's exit code (the first failure's, else 0)."""
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    echoes = []
    for i in range(args.processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.processes),
                   JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.devices))
        env.pop("XLA_FLAGS", None)
        log = open(log_dir / f"process-{i}.log", "wb")
        cmd = [sys.executable, "-m", "psynth_jax.cli.main", *command]
        if i == 0:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tee = threading.Thread(target=_tee, args=(proc.stdout, log, "[p0] "), daemon=True)
            tee.start()
            echoes.append(tee)
        else:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
    (log_dir / "pids.json").write_text(json.dumps({"coordinator": address, "pids": [p.pid for p in procs]}) + "\n")
    print(f"[local_pod] {args.processes} processes x {args.devices} CPU devices, coordinator {address}, "
          f"logs in {log_dir}/", file=sys.stderr, flush=True)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait(procs, args.grace_s, args.timeout_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in echoes:
            t.join(timeout=5)
    print(f"[local_pod] exit codes: {[p.returncode for p in procs]}", file=sys.stderr, flush=True)
    return code


def _tee(stream, log, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        sys.stderr.write(prefix + line.decode(errors="replace"))
        sys.stderr.flush()


def _wait(procs: list[subprocess.Popen], grace_s: float, timeout_s: float | None) -> int:
    start = time.monotonic()
    failure = None
    while any(p.poll() is None for p in procs):
        codes = [p.poll() for p in procs]
        bad = next((c for c in codes if c not in (None, 0)), None)
        over = timeout_s is not None and time.monotonic() - start > timeout_s
        if (bad is not None or over) and failure is None:
            failure = bad if bad is not None else 124
            _stop(procs, grace_s)
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    return failure if failure is not None else next((c for c in codes if c != 0), 0)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the survivors (they save and exit, as on a preempted slice), SIGKILL after grace_s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()


def main(argv: list[str] | None = None) -> int:
    args, command = parse(list(sys.argv[1:] if argv is None else argv))
    return launch(args, command)


if __name__ == "__main__":
    sys.exit(main())
