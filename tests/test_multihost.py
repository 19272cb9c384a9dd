"""A pod rehearsed on one machine: 2 processes x 4 CPU devices against 1 process x 8 devices.

Every run goes through `psynth_jax.cli.local_pod` (what launch/local_pod.sh runs), the code path
of a TPU slice: each process joins the JAX runtime (psynth_jax/distributed.py), reads its share of every
global batch, and process 0 writes logs and reports. Checked here:
- distillation (`build-data`): every example built exactly once;
- an unreachable coordinator and a process count the mesh cannot use fail with a clear error, fast;
- opt-in (`-m slow`): the paper's recipe end to end on a pod, as on one process.
Training across a SIGTERM to one process and a `kill -9` of another, then a second stage from the
pod's run, and eval with a `kill -9`: tests/test_pods_documented.py, on docs/PODS.md's commands.
This module's helpers (pod, finish, wait_for, losses, records) serve both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fast_compile import xla_flags
from tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/train.jsonl"
GSM8K_TEST = GSM8K.with_name("test.jsonl")
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")
STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_smol(tmp_path_factory.mktemp("tiny"))


def env_one_process(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env["XLA_FLAGS"] = xla_flags()  # the suite's, no forced device count
    return env


def train_config(tmp: Path, model_dir: Path) -> Path:
    path = tmp / "train.yaml"
    path.write_text(f"""
base: {REPO / 'configs/base.yaml'}
model: {{source: {model_dir}, dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
data:
  train:
    - {{path: {GSM8K}, builder: aggregation, limit: 24}}
  eval:  # held-out loss and greedy agreement: the tokens of both paths span both processes
    - {{path: {GSM8K_TEST}, builder: exposure, limit: 4}}
  buckets: [256, 512, 768]
  max_total_tokens: 768
  max_live_tokens: 256
  max_cache_tokens: 512
  batch_size: 4
train: {{steps: {STEPS}, lr: 1.0e-2, compute_dtype: float32}}
mesh: {{data: 2, fsdp: 2, tensor: 2}}
checkpoint: {{dir: {tmp / 'run'}, every_steps: 2, async_save: true}}
log_every: 1
eval_every: 2
tensorboard: false
""")
    return path


def pod(args: list[str], logs: Path, processes: int = 2, devices: int = 4) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "psynth_jax.cli.local_pod", "--processes", str(processes), "--devices",
           str(devices), "--log-dir", str(logs), "--grace-s", "20", "--", *args]
    return subprocess.Popen(cmd, env=env_one_process(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """(exit code, output) of a run; past `timeout` it is stopped (SIGTERM: the launcher stops its
    processes; then SIGKILL) and the test fails with its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s, stopped; its output:\n{(out or '')[-4000:]}")
    return proc.returncode, out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the condition: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.3)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    """{step: metric `key`} of a run's metrics.jsonl (each step's line once)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r[key]
    return out


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def records(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    keys = [(r["task"], r["id"], r["mode"]) for r in rows]
    assert len(keys) == len(set(keys)), "a record written twice"
    return sorted([r["task"], r["id"], r["mode"], r["text"], r["correct"]] for r in rows)


def test_distillation_over_two_processes_builds_each_example_once(tmp_path, model_dir):
    out = tmp_path / "distill.jsonl"
    code, text = finish(pod(["build-data", "--source", str(GSM8K), "--limit", "6", "--builder", "distillation",
                             "--out", str(out), "--model", str(model_dir), "--k", "2", "--batch-size", "1",
                             "--worker-tokens", "4", "--max-new-tokens", "4"], tmp_path / "logs"))
    assert code == 0, text[-3000:]
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    assert not list(tmp_path.glob("distill.p*.jsonl"))
    assert "wrote 6 new distillation examples" in text


def test_an_unreachable_coordinator_is_a_clear_error_within_its_timeout(tmp_path):
    env = dict(env_one_process(4), JAX_COORDINATOR_ADDRESS="127.0.0.1:9", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
               PSYNTH_DISTRIBUTED_TIMEOUT="3")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "eval", "--config",
                           str(REPO / "configs/eval_smoke.yaml"), f"out_dir={tmp_path / 'x'}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - t0 < 60
    assert "cannot reach the coordinator (process 0) at 127.0.0.1:9 after 3 s" in done.stderr


def test_a_mesh_the_processes_cannot_fill_is_refused(tmp_path, model_dir):
    cfg = train_config(tmp_path, model_dir)
    code, out = finish(pod(["train", "--config", str(cfg), "mesh.fsdp=3", "mesh.data=-1"], tmp_path / "logs",
                           devices=4), timeout=300)
    assert code == 2
    assert "impossible mesh" in out and "8 devices" in out


def recipe_configs(tmp: Path, model_dir: Path, tag: str) -> tuple[Path, Path, Path]:
    """The paper's recipe (configs/paper_recipe_smollm2_cpu_stage{1,2}.yaml, eval_recipe_smollm2_cpu.yaml),
    shrunk: a tiny model, a few rows of two sources per stage, 6 steps on a 2 x 2 x 2 mesh."""
    data = REPO.parent / "shared/data"
    small = f"""model: {{source: {model_dir}, dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
mesh: {{data: 2, fsdp: 2, tensor: 2}}
log_every: 1
tensorboard: false
"""
    stage1, stage2, ev = tmp / f"{tag}_stage1.yaml", tmp / f"{tag}_stage2.yaml", tmp / f"{tag}_eval.yaml"
    stage1.write_text(f"""base: {REPO / 'configs/paper_recipe_smollm2_cpu_stage1.yaml'}
{small}data:
  train:
    - {{name: chat, path: {data / 'multi_turn_chat/oasst1_en_validation.jsonl'}, builder: exposure, limit: 12}}
    - {{name: evidence, path: "{data / 'multihop_evidence/*_train*.jsonl'}", builder: aggregation, variant: short,
       k: [2, 3], limit: 12}}
  batch_size: 4
train: {{steps: {STEPS}}}
checkpoint: {{dir: {tmp / tag / 'stage1'}, every_steps: 2}}
""")
    stage2.write_text(f"""base: {REPO / 'configs/paper_recipe_smollm2_cpu_stage2.yaml'}
{small}data:
  train:
    - {{name: distill_math, path: {GSM8K}, builder: distillation, limit: 8}}
    - {{name: distill_mc, path: {data / 'science_qa/arc_challenge/ARC-Challenge-Dev.filtered.jsonl'},
       builder: distillation, task: arc_challenge, limit: 8}}
  eval:
    - {{name: eval_math, path: {GSM8K_TEST}, builder: distillation, limit: 4}}
  batch_size: 4
  distill_worker_tokens: 8
  distill_max_new_tokens: 8
  distill_batch_size: 4
train: {{steps: {STEPS}, init_from: {tmp / tag / 'stage1'}}}
checkpoint: {{dir: {tmp / tag / 'stage2'}, every_steps: 2}}
eval_every: 2
""")
    ev.write_text(f"""base: {REPO / 'configs/eval_recipe_smollm2_cpu.yaml'}
model: {{source: {model_dir}, dtype: float32}}
adapter: {tmp / tag / 'stage2'}
tasks:
  - {{name: arc_challenge, limit: 3}}
  - {{name: multihop_qa, limit: 3}}
worker_tokens: 6
max_new_tokens: 6
batch_size: 2
timing_repeats: 0
out_dir: {tmp / tag / 'eval'}
""")
    return stage1, stage2, ev


@pytest.mark.slow
def test_the_recipe_on_a_pod_ends_where_one_process_does(tmp_path, model_dir):
    """Stage 1 -> stage 2 with its distillation -> eval on 2 processes x 4 devices, with a kill -9 of
    one process in stage 2 and a relaunch: the losses, held-out metrics and eval records of one
    process on 8 devices."""
    one = recipe_configs(tmp_path, model_dir, "one")
    for cfg in one:
        done = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "train" if "stage" in cfg.name else "eval",
                               "--config", str(cfg), "--quiet"], env=env_one_process(), cwd=REPO, capture_output=True,
                              text=True, timeout=1800)
        assert done.returncode == 0, (cfg.name, done.stderr[-3000:])
    stage1, stage2, ev = recipe_configs(tmp_path, model_dir, "pod")
    logs = tmp_path / "logs"
    code, out = finish(pod(["train", "--config", str(stage1), "--quiet"], logs), timeout=1800)
    assert code == 0, out[-3000:]
    run2 = tmp_path / "pod/stage2"
    proc = pod(["train", "--config", str(stage2), "--quiet"], logs)
    wait_for(lambda: (run2 / "checkpoints").is_dir() and any(checkpoint_steps(run2)), proc, timeout=1500)
    os.kill(json.loads((logs / "pids.json").read_text())["pids"][1], signal.SIGKILL)
    code, _ = finish(proc)
    assert code != 0
    code, out = finish(pod(["train", "--config", str(stage2), "--quiet"], logs), timeout=1800)
    assert code == 0, out[-3000:]
    assert "resumed from step" in out
    code, out = finish(pod(["eval", "--config", str(ev), "--quiet"], logs), timeout=1800)
    assert code == 0, out[-3000:]
    for stage in ("stage1", "stage2"):
        for key in ("loss", "eval_ce", "eval_agreement"):
            ours, ref = losses(tmp_path / "pod" / stage, key), losses(tmp_path / "one" / stage, key)
            assert sorted(ours) == sorted(ref), (stage, key)
            assert all(abs(ours[s] - ref[s]) <= 1e-5 for s in ref), (stage, key, ours, ref)
    assert records(tmp_path / "pod/eval") == records(tmp_path / "one/eval")
