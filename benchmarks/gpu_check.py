"""The GPU check: one prepared command that answers the important questions first and fits in 8 minutes.

`launch/gpu_check.sh` runs this driver (`python -m benchmarks.gpu_check`, also
`psynth bench gpu-check`). It runs the steps of `STEPS` in order of importance, each in a child
process of its own (a `psynth bench ...` command) with its own time cap: a step that runs past
its cap is killed with every process it started and recorded as "timeout", and the next step
runs. After every step the results folder is rewritten, so a run cut short still leaves what it
measured:

- results.json: the environment (device, driver, jax/CUDA/cuDNN versions), every step's status,
  wall time, cap, command and the JSON its benchmark wrote, and the figures with their targets;
- summary.md: correctness failures first, then the steps and every figure next to its target
  from docs/PERFORMANCE.md (benchmarks/gpu_figures.py);
- gpu_check.log: the output of every step.

Each step's benchmark writes into its own folder under `--work` (not returned by the device
machine); its JSON is copied into results.json. The driver itself never imports jax, so no
device memory is held while a step runs.

Modes: the full run (real shapes, bfloat16, cuDNN attention, caps sized for one H200; see
`BUDGET_S` and the table in docs/PERFORMANCE.md); `--smoke` (the same steps at tiny shapes,
float32, XLA attention, xla_split standing in for cuDNN in the correctness step: a CPU test of
the whole chain); `--dry-run` (print every command, run nothing).

Adding a step is one `Step(...)` entry in gpu_steps.py's `STEPS` (its figures: a reader in
gpu_figures.READERS).
`--update-docs RESULTS_DIR` fills docs/PERFORMANCE.md's open GPU cells from a results folder
(benchmarks/gpu_docs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import gpu_figures
from benchmarks.gpu_docs import update_docs
from benchmarks.gpu_steps import BUDGET_S, SMOKE_ENV, STEPS, Step, step_names

SCHEMA = "psynth.gpu_check/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = ("results.json", "summary.md", "gpu_check.log")


# ------------------------------------------------------------------ commands
def step_command(step: Step, *, smoke: bool, work: Path, python: str, dry_run: bool = False) -> list[str]:
    """The argv of one step. The roofline flag depends on whether the roofline step left its JSON
    (a dry run assumes it did)."""
    if step.benchmark == "pip":
        return [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e",
                str(REPO_ROOT)]
    argv = [python, "-m", "psynth_jax.cli.main", "bench", step.benchmark, *step.args(smoke),
            "--out", str(work / step.name)]
    if step.roofline:
        roofline_json = work / "roofline" / "roofline.json"
        if dry_run or roofline_json.exists():
            argv += ["--roofline-json", str(roofline_json)]
        else:
            argv += list(step.no_roofline)
    return argv


def step_env(step: Step, smoke: bool) -> tuple[tuple[str, str], ...]:
    """The environment a step adds to the driver's (a smoke run adds SMOKE_ENV to every JAX step)."""
    extra = SMOKE_ENV if smoke and step.benchmark not in ("pip", "peer") else ()
    return step.env + extra


def shell_line(argv: Sequence[str], env: Sequence[tuple[str, str]] = ()) -> str:
    """The command as one copy-pastable shell line (`env VAR=... ` first when it sets any)."""
    prefix = ["env", *(f"{k}={v}" for k, v in env)] if env else []
    return shlex.join([*prefix, *argv])


# ------------------------------------------------------------------ running one step
@dataclasses.dataclass
class Outcome:
    status: str  # ok | failed | timeout | interrupted
    returncode: int | None
    wall_s: float
    tail: list[str]
    cpu_s: float | None = None  # host CPU time of the step's processes (user + system)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Interrupted(Exception):
    """SIGTERM/SIGINT reached the driver: the running step is stopped, the results are written."""


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the child's process group (it and everything it started), SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader (a grandchild): make sure nothing of it is left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def run_capped(argv: Sequence[str], *, cap_s: float, log, env: dict[str, str] | None = None,
               prefix: str = "") -> Outcome:
    """Run argv in its own process group, its output (stdout + stderr) into `log` and this
    process's stderr line by line; kill the group when it runs past cap_s."""
    t0, cpu0 = time.monotonic(), _children_cpu_s()
    tail: list[str] = []
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
    except OSError as err:
        log.write(f"could not start: {err}\n")
        return Outcome("failed", None, time.monotonic() - t0, [str(err)])

    def pump() -> None:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stderr.write(prefix + line)
            tail.append(line.rstrip("\n"))
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        try:
            proc.wait(timeout=cap_s)
            _kill_group(proc)  # whatever the step started and left running must not hold the device
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(proc)
        reader.join(timeout=5.0)
    except Interrupted:  # the driver is stopping: so is the step, with everything it started
        status = "interrupted"
        _kill_group(proc)
        reader.join(timeout=5.0)
    wall = time.monotonic() - t0
    if status is None:
        status = "ok" if proc.returncode == 0 else "failed"
    return Outcome(status, proc.returncode, wall, list(tail), round(_children_cpu_s() - cpu0, 2))


# ------------------------------------------------------------------ environment (no jax import)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers", "tokenizers",
            "safetensors", "huggingface-hub", "jinja2", "pyyaml", "tqdm", "gguf", "grain", "datasets",
            "matplotlib", "setuptools", "pip")
# what the steps import: a missing one fails its step (psynth_jax declares gguf too, used only to
# read GGUF checkpoints, and grain/datasets only for training data)
NEEDED = {"jax": "every JAX step", "flax": "every JAX step", "numpy": "every step", "optax": "train",
          "pyyaml": "every JAX step (config schema)", "torch": "peer7b, peer14b", "transformers": "peer7b, peer14b",
          "safetensors": "peer7b, peer14b"}


def _run_quietly(argv: Sequence[str], timeout: float = 10.0) -> str:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    """Device (nvidia-smi), installed versions of what the steps use, host, repository commit."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda_packages = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "nvidia-cudnn", "nvidia-cuda-runtime", "nvidia-cublas")):
            cuda_packages[name] = dist.version
    gpus = []
    for line in _run_quietly(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"]).splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    match = re.search(r"CUDA Version:\s*([\d.]+)", _run_quietly(["nvidia-smi"]))
    commit = _run_quietly(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]).strip() or None
    return {
        "gpus": gpus, "driver_cuda_version": match.group(1) if match else None,
        "packages": versions, "cuda_packages": dict(sorted(cuda_packages.items())),
        "missing": {name: why for name, why in NEEDED.items() if versions.get(name) is None},
        "python": platform.python_version(), "executable": sys.executable, "host": platform.node(),
        "host_cpu_count": os.cpu_count(), "platform": platform.platform(), "commit": commit,
    }


# ------------------------------------------------------------------ the run
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """The state of one run, written to the results folder after every step."""

    def __init__(self, steps: Sequence[Step], *, out: Path, work: Path, smoke: bool, caps: dict[str, float],
                 command: str):
        self.steps, self.out, self.work, self.smoke, self.caps = list(steps), out, work, smoke, caps
        self.results: dict[str, Any] = {
            "schema": SCHEMA, "mode": "smoke" if smoke else "full",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None, "command": command, "budget_s": BUDGET_S, "total_cap_s": sum(caps.values()),
            "environment": environment(),
            "steps": {s.name: {"name": s.name, "title": s.title, "benchmark": s.benchmark, "cap_s": caps[s.name],
                               "estimate": s.estimate, "status": "pending"} for s in steps},
            "figures": [], "failures": [],
        }

    def write(self) -> None:
        self.results["figures"] = [dataclasses.asdict(f) for f in gpu_figures.figures(self.results, self.steps)]
        self.results["failures"] = gpu_figures.failures(self.results)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "results.json", json.dumps(self.results, indent=1, allow_nan=False) + "\n")
        write_atomic(self.out / "summary.md", gpu_figures.summary_markdown(self.results, self.steps))

    def run_step(self, step: Step, log) -> Outcome:
        entry = self.results["steps"][step.name]
        if step.benchmark == "pip" and self.smoke:
            entry.update(status="skipped", note="smoke run: nothing is installed")
            return Outcome("skipped", None, 0.0, [])
        folder = self.work / step.name
        shutil.rmtree(folder, ignore_errors=True)  # a stale JSON must never pass for this run's
        argv = step_command(step, smoke=self.smoke, work=self.work, python=sys.executable)
        extra = step_env(step, self.smoke)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **dict(extra))  # lines reach the log before a kill
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str((self.work / "jax_cache").resolve()))
        cap = self.caps[step.name]
        entry.update(status="running", command=shell_line(argv, extra))
        self.write()
        header = f"\n===== {step.name} (cap {cap:g} s): {shell_line(argv, extra)}\n"
        log.write(header)
        log.flush()
        say(header.strip())
        outcome = run_capped(argv, cap_s=cap, log=log, env=env, prefix=f"[{step.name}] ")
        entry.update(status=outcome.status, returncode=outcome.returncode, wall_s=round(outcome.wall_s, 2),
                     cpu_s=outcome.cpu_s)
        result = folder / step.result if step.result else None
        if result is not None and result.exists():
            try:
                entry["result"] = json.loads(result.read_text())
            except (OSError, ValueError) as err:
                entry["result_error"] = f"{result}: {err}"
        if outcome.status != "ok":
            entry["log_tail"] = outcome.tail[-25:]
        if outcome.status == "timeout":
            log.write(f"===== {step.name}: killed after its cap of {cap:g} s\n")
        return outcome


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def budget_table(steps: Sequence[Step], caps: dict[str, float]) -> str:
    lines = [f"{'step':<10} {'cap s':>6}  estimate on one H200"]
    lines += [f"{s.name:<10} {caps[s.name]:>6g}  {s.estimate}" for s in steps]
    lines.append(f"{'total':<10} {sum(caps[s.name] for s in steps):>6g}  (budget {BUDGET_S:g} s)")
    return "\n".join(lines)


def select_steps(only: Sequence[str] | None, skip: Sequence[str]) -> list[Step]:
    names = step_names()
    unknown = [n for n in [*(only or ()), *skip] if n not in names]
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r} (steps: {', '.join(names)})")
    return [s for s in STEPS if (only is None or s.name in only) and s.name not in skip]


def parse_caps(items: Sequence[str]) -> dict[str, float]:
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in step_names() or not seconds > 0:
            raise ValueError(f"--cap takes STEP=SECONDS with a known step and a positive number, got {item!r} "
                             f"(steps: {', '.join(step_names())})")
        caps[name] = seconds
    return caps


def run_all(steps: Sequence[Step], *, out: Path, work: Path, smoke: bool, cap_overrides: dict[str, float],
            command: str) -> int:
    """Run `steps` in order, each capped; write the results folder after each one. 0 when every
    step finished and every check passed, 1 otherwise."""
    caps = {s.name: cap_overrides.get(s.name, s.smoke_cap_s if smoke else s.cap_s) for s in steps}
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(steps, out=out, work=work, smoke=smoke, caps=caps, command=command)
    say(f"{'smoke' if smoke else 'full'} run of {len(steps)} steps -> {out} (step outputs in {work})\n"
        + budget_table(steps, caps))
    if not smoke and sum(caps.values()) > BUDGET_S:
        say(f"warning: the caps add up to {sum(caps.values()):g} s, over the {BUDGET_S:g} s budget")
    run.write()

    def interrupt(signum, frame):  # noqa: ARG001
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        with open(out / "gpu_check.log", "w") as log:
            for step in steps:
                outcome = run.run_step(step, log)
                if outcome.status == "interrupted":
                    raise Interrupted(step.name)
                code = code or int(outcome.status not in ("ok", "skipped"))
                say(f"{step.name}: {outcome.status} in {outcome.wall_s:.1f} s (cap {caps[step.name]:g} s)")
                run.write()
                if step.benchmark == "kernels":
                    broken = gpu_figures.kernel_failures(run.results["steps"][step.name])
                    if broken:
                        say("CORRECTNESS FAILURES (the rest still runs):\n  " + "\n  ".join(broken))
    except Interrupted:
        code = 130
        for entry in run.results["steps"].values():
            if entry["status"] == "running":
                entry["status"] = "interrupted"
            elif entry["status"] == "pending":
                entry["status"] = "not run (interrupted)"
        say(f"interrupted; the results so far are in {out}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        run.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        run.write()
    print((out / "summary.md").read_text())
    failures = run.results["failures"]
    return code or int(bool(failures))


def dry_run(steps: Sequence[Step], *, work: Path, smoke: bool, cap_overrides: dict[str, float]) -> int:
    """Print every step's command ("+ ..." on stderr, as the launch scripts do) and run nothing."""
    caps = {s.name: cap_overrides.get(s.name, s.smoke_cap_s if smoke else s.cap_s) for s in steps}
    say(f"dry run ({'smoke' if smoke else 'full'}):\n" + budget_table(steps, caps))
    for i, step in enumerate(steps):
        say(f"step {i}/{len(steps) - 1} {step.name} (cap {caps[step.name]:g} s): {step.title}")
        if step.benchmark == "pip" and smoke:
            say("  skipped in a smoke run")
            continue
        argv = step_command(step, smoke=smoke, work=work, python=sys.executable, dry_run=True)
        print("+ " + shell_line(argv, step_env(step, smoke)), file=sys.stderr, flush=True)
    return 0


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks/results/gpu_check",
                   help=f"results folder ({', '.join(RESULT_FILES)})")
    p.add_argument("--work", default="runs/gpu_check", help="scratch folder of the steps' own outputs")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: the same steps at tiny shapes, float32, XLA attention")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument("--only", action="append", default=None,
                   help=f"comma-separated steps to run, in their fixed order ({', '.join(step_names())})")
    p.add_argument("--skip", action="append", default=[], help="comma-separated steps to leave out (repeatable)")
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                   help="override a step's time cap (repeatable)")
    p.add_argument("--update-docs", default=None, metavar="RESULTS_DIR",
                   help="instead of running: fill docs/PERFORMANCE.md's GPU cells from a results folder")
    p.add_argument("--docs", default=str(REPO_ROOT / "docs" / "PERFORMANCE.md"), help="the file --update-docs edits")
    p.add_argument("--force", action="store_true",
                   help="--update-docs: accept results of a smoke or non-GPU run (tests only)")


def _names(items: Sequence[str] | None) -> list[str] | None:
    """Repeated comma-separated options -> one list of names (None when the option was not given)."""
    return None if items is None else [x.strip() for item in items for x in item.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    if args.update_docs:
        changed = update_docs(Path(args.update_docs), Path(args.docs), force=args.force)
        for line in changed:
            print(line)
        say(f"{len(changed)} cells of {args.docs} updated")
        return 0
    steps = select_steps(_names(args.only), _names(args.skip) or [])
    caps = parse_caps(args.cap)
    if args.dry_run:
        return dry_run(steps, work=Path(args.work), smoke=args.smoke, cap_overrides=caps)
    as_module = Path(sys.argv[0]).name == "gpu_check.py"  # run as `python -m benchmarks.gpu_check`
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]] if as_module else sys.argv)
    return run_all(steps, out=Path(args.out), work=Path(args.work), smoke=args.smoke, cap_overrides=caps,
                   command=command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
