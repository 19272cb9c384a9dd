"""docs/PODS.md's rehearsal, run as written: every command in it, at a small scale, against one process.

Each fenced command of the page's "Rehearsing a launch on one machine" section runs through bash
from the repository root exactly as a user pastes it, with overrides appended that only shrink it
(a tiny random model with SmolLM2's tokenizer, few rows, few tokens, few steps, output under
tmp_path); every other flag is the page's. The same psynth command then runs as one process on
8 devices, and the results must agree: training losses and held-out metrics within float
tolerance and the same distillation data; evaluation records equal. Also here: host-level waits
that outlast a device collective's patience (a process 35 s late), and an eval process whose
share of the chunks is empty.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from psynth_jax.cli.local_pod import free_port
from test_multihost import checkpoint_steps, env_one_process, finish, losses, pod, records, wait_for
from tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
PODS = REPO / "docs/PODS.md"
DATA = REPO.parent / "shared/data"
pytestmark = pytest.mark.skipif(not (DATA / "gsm8k/train.jsonl").is_file(),
                                reason="../shared/data is not beside the checkout")

# appended to the documented commands: smaller, never different in kind
STEPS = 6
SMALL_TRAIN = ["data.train[0].limit=8", "data.eval[0].limit=4", "data.distill_worker_tokens=8",
               "data.distill_max_new_tokens=8", f"train.steps={STEPS}", "checkpoint.every_steps=2", "eval_every=2",
               "log_every=1", "tensorboard=false"]
SMALL_EVAL = ["worker_tokens=6", "max_new_tokens=6", "timing_repeats=0"]
TWO_TASKS = "tasks=[{name: gsm8k, limit: 2}, {name: arc_challenge, limit: 2}]"  # of the documented six


def documented_commands() -> list[str]:
    """The shell commands of docs/PODS.md's rehearsal section (continuation lines joined)."""
    text = PODS.read_text()
    section = text[text.index("## Rehearsing a launch on one machine"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "docs/PODS.md's rehearsal section has no ```bash block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def psynth_part(command: str) -> list[str]:
    """The psynth arguments of a `launch/local_pod.sh N -- ...` command line."""
    words = shlex.split(command)
    return words[words.index("--") + 1 :]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_smol(tmp_path_factory.mktemp("tiny"))


def start_documented(command: str, extra: list[str], tmp: Path) -> subprocess.Popen:
    """`command` through bash from the repository root, `extra` appended (logs under tmp/pod_logs)."""
    env = dict(env_one_process(), LOG_DIR=str(tmp / "pod_logs"), PYTHON=sys.executable)
    line = f"{command} {' '.join(shlex.quote(x) for x in extra)}"
    return subprocess.Popen(["bash", "-c", line], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_documented(command: str, extra: list[str], tmp: Path) -> tuple[int, str]:
    """Run `start_documented` to its end: (exit code, output)."""
    return finish(start_documented(command, extra, tmp), timeout=900)


def run_one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", *args, "--quiet"], env=env_one_process(8),
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def test_the_rehearsal_section_holds_the_commands_tested_here():
    commands = documented_commands()
    assert [psynth_part(c)[0] for c in commands] == ["train", "eval"], commands
    assert all(c.split()[:1] in (["launch/local_pod.sh"], ["DEVICES=4"]) for c in commands), commands


def metrics_by_step(run: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r.pop("step"), {}).update({k: v for k, v in r.items() if k != "tokens_per_s"})
    return out


def trained(run: Path, model_dir: Path) -> list[np.ndarray]:
    """A run's final LoRA + mapper arrays (restored on this process's one device, LoRA as the run's config)."""
    import jax
    from flax import nnx

    from psynth_jax.interop.loader import load_model
    from psynth_jax.interop.runs import restore_run, run_config
    from psynth_jax.model.transformer import LoRAConfig, LoRAParam

    lora = run_config(run).lora
    got = restore_run(run, load_model(model_dir, lora=LoRAConfig(rank=lora.rank, alpha=lora.alpha,
                                                                  targets=tuple(lora.targets)), with_tokenizer=False))
    assert got.step == STEPS
    _, params, _ = nnx.split(nnx.merge(got.model.graphdef, got.model.state), LoRAParam, ...)
    return [np.asarray(x) for x in jax.tree.leaves(params) + jax.tree.leaves(nnx.state(got.mapper))]


def test_documented_train_rehearsal_survives_a_preemption_and_a_crash_and_trains_as_one_process(tmp_path,
                                                                                                 model_dir):
    """The documented train (distillation on a data axis over both processes, the held-out
    evaluation, training steps), preempted and crashed on the way, then a second stage from it:
    1. SIGTERM to process 1 once a step is logged: every process saves the same step, exit 143;
    2. the command again; `kill -9` of process 0 once a later checkpoint exists (nothing saved);
    3. the command again: it resumes from the newest checkpoint and finishes.
    Against one process on 8 devices, uninterrupted: the same losses and held-out metrics at every
    step, the same distillation data, the same trained arrays; and a second stage (`train.init_from`)
    from each run gives the same losses."""
    (command,) = [c for c in documented_commands() if psynth_part(c)[0] == "train"]
    pod, one = tmp_path / "pod", tmp_path / "one"
    small = [f"model.source={model_dir}", *SMALL_TRAIN]
    args = [*small, f"checkpoint.dir={pod}"]
    pids = tmp_path / "pod_logs/pids.json"
    proc = start_documented(command, args, tmp_path)  # 1.
    wait_for(lambda: (pod / "metrics.jsonl").is_file() and losses(pod), proc, timeout=600)
    os.kill(json.loads(pids.read_text())["pids"][1], signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    stopped = max(checkpoint_steps(pod))
    assert f"preemption (SIGTERM): every process saves step {stopped}" in out  # process 0, told by process 1's signal
    assert stopped < STEPS
    proc = start_documented(command, args, tmp_path)  # 2.
    wait_for(lambda: max(checkpoint_steps(pod)) > stopped, proc)
    os.kill(json.loads(pids.read_text())["pids"][0], signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0
    code, out = run_documented(command, args, tmp_path)  # 3.
    assert code == 0, out[-4000:]
    assert "resumed from step" in out
    done = run_one_process([*psynth_part(command), *small, f"checkpoint.dir={one}"])
    assert done.returncode == 0, done.stderr[-4000:]
    ours, ref = metrics_by_step(pod), metrics_by_step(one)
    assert sorted(ours) == sorted(ref) == list(range(STEPS + 1))
    assert "eval_agreement" in ours[0] and "eval_ce" in ours[2], ours
    for step in ref:
        assert ours[step].keys() == ref[step].keys(), step
        for key, value in ref[step].items():
            assert ours[step][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key)
    for a, b in zip(trained(pod, model_dir), trained(one, model_dir)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # the distillation examples (train and held-out): generated once, the same as one process's
    pod_files = sorted((pod / "distill").glob("*.jsonl"))
    assert [p.name for p in pod_files] == [p.name for p in sorted((one / "distill").glob("*.jsonl"))]
    assert len(pod_files) == 2
    for p in pod_files:
        assert p.read_text() == (one / "distill" / p.name).read_text(), p.name
    # 4. a second stage from each run's mapper + LoRA, as a pod's stage 2 starts (the distillation
    # data copied over: a new checkpoint.dir would otherwise generate it again)
    then = [*small, "train.steps=2", "eval_every=0", "data.eval=[]"]
    for src, dst in ((pod, tmp_path / "then"), (one, tmp_path / "then_one")):
        shutil.copytree(src / "distill", dst / "distill")
    code, out = run_documented(command, [*then, f"train.init_from={pod}", f"checkpoint.dir={tmp_path / 'then'}"],
                               tmp_path)
    assert code == 0, out[-3000:]
    assert f"initialised mapper + LoRA from {pod} (its step {STEPS})" in out
    done = run_one_process([*psynth_part(command), *then, f"train.init_from={one}",
                            f"checkpoint.dir={tmp_path / 'then_one'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    ours, ref = losses(tmp_path / "then"), losses(tmp_path / "then_one")
    assert sorted(ours) == sorted(ref) == [1, 2] and all(abs(ours[s] - ref[s]) <= 1e-5 for s in ref), (ours, ref)


def test_documented_eval_rehearsal_writes_the_one_process_records_after_a_kill(tmp_path, model_dir):
    """The documented eval; process 1 killed (-9) mid-run and the command run again: it resumes, every
    process reaches the merge whatever its share, and the records are one process's."""
    (command,) = [c for c in documented_commands() if psynth_part(c)[0] == "eval"]
    small = [f"model.source={model_dir}", TWO_TASKS, *SMALL_EVAL, f"out_dir={tmp_path / 'pod'}"]
    proc = start_documented(command, small, tmp_path)
    part = tmp_path / "pod/records.p1.jsonl"
    wait_for(lambda: part.is_file() and part.read_text().count("\n") >= 2, proc)
    os.kill(json.loads((tmp_path / "pod_logs/pids.json").read_text())["pids"][1], signal.SIGKILL)
    code, _ = finish(proc)
    assert code != 0 and not (tmp_path / "pod/results.json").exists()
    code, out = run_documented(command, small, tmp_path)
    assert code == 0, out[-4000:]
    assert (tmp_path / "pod/results.md").is_file() and not list((tmp_path / "pod").glob("*.p*.jsonl"))
    done = run_one_process([*psynth_part(command), *small[:-1], f"out_dir={tmp_path / 'one'}"])
    assert done.returncode == 0, done.stderr[-4000:]
    ours = records(tmp_path / "pod")
    assert ours == records(tmp_path / "one") and len(ours) == 2 * 2 * 6  # tasks x examples x modes


def test_an_eval_process_with_no_chunk_waits_and_exits_cleanly(tmp_path, model_dir):
    """One chunk, two processes: process 1 has nothing to answer and waits for process 0 to merge."""

    args = ["eval", "--config", str(REPO / "configs/eval_smoke.yaml"), f"model.source={model_dir}",
            "tasks=[{name: gsm8k, limit: 2}]", "batch_size=4", *SMALL_EVAL, f"out_dir={tmp_path / 'pod'}"]
    code, out = finish(pod([*args, "--quiet"], tmp_path / "logs"))
    assert code == 0, out[-4000:]
    rows = records(tmp_path / "pod")
    assert len(rows) == 2 * 6 and {r[0] for r in rows} == {"gsm8k"}


LATE = textwrap.dedent("""
    import sys, time
    import jax
    from psynth_jax import distributed

    distributed.initialize()
    jax.devices()
    me = jax.process_index()
    if me == 1:
        time.sleep(float(sys.argv[1]))  # a process that finishes its share late
    distributed.barrier("late")
    got = distributed.allgather_objects({"me": me, "text": "x" * (3 << 20) if me else ""})
    told = distributed.broadcast_object(["from", me])
    print("OK", me, [g["me"] for g in got], len(got[1]["text"]), told, flush=True)
""")


def test_processes_wait_for_a_peer_later_than_a_device_collective_would(tmp_path):
    """A device collective (gloo) gives up on a peer 30 s late; host-level waits must not."""
    script = tmp_path / "late.py"
    script.write_text(LATE)
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        env = dict(env_one_process(2), JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=str(REPO))  # this checkout's package, whatever is installed
        procs.append(subprocess.Popen([sys.executable, str(script), "35"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [finish(p, timeout=150) for p in procs]
    finally:  # a hung peer must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (code, out) in enumerate(outs):
        assert code == 0, out[-3000:]
        assert f"OK {i} [0, 1] {3 << 20} ['from', 0]" in out, out[-3000:]


FAILING = textwrap.dedent("""
    import sys
    import jax
    from psynth_jax.cli.main import main
    from psynth_jax import distributed

    distributed.initialize()
    jax.devices()
    if jax.process_index() == 0:
        distributed.barrier("never")  # process 0 waits for a peer that fails
    sys.exit(main(["eval", "--config", sys.argv[1], "out_dir=" + sys.argv[2]]))
""")


def test_a_failing_process_exits_at_once_and_the_launcher_stops_the_rest(tmp_path):
    """A process of a pod that fails must not wait for its peers at the runtime's shutdown barrier
    (they may be blocked where it will never come): it exits with its code now."""
    import time

    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        env = dict(env_one_process(2), JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(script), str(REPO / "configs/eval_smoke.yaml"),
                                       str(blocker / "out")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        t0 = time.monotonic()
        code, out = finish(procs[1], timeout=120)
        assert code == 2, out[-3000:]
        assert "psynth eval: error:" in out and "Not a directory" in out, out[-3000:]
        assert time.monotonic() - t0 < 90
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
