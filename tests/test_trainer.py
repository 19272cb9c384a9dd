"""`psynth train` end to end on a tiny model: one run stopped by SIGTERM, SIGKILL, a damaged
checkpoint and a changed config reproduces the uninterrupted run's losses exactly and loses
nothing; a bad config fails before any compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/train.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_smol"))


def write_config(tmp: Path, model_dir: Path, steps: int, every: int) -> Path:
    cfg = f"""
base: {REPO / 'configs/base.yaml'}
model: {{source: {model_dir}, dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
data:
  train:
    - {{path: {GSM8K}, builder: aggregation, limit: 24}}
  buckets: [256, 512, 768]
  max_total_tokens: 768
  max_live_tokens: 256
  max_cache_tokens: 512
train: {{steps: {steps}, lr: 1.0e-2, compute_dtype: float32}}
checkpoint: {{dir: {os.path.relpath(tmp / 'run', REPO)}, every_steps: {every}, async_save: true}}
log_every: 1
tensorboard: false
"""
    path = tmp / "cfg.yaml"
    path.write_text(cfg)
    return path


def train_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "psynth_jax.cli.main", "train", "--config", str(config), "--quiet"]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"  # a resume drops what it redoes
            out[r["step"]] = r["loss"]
    return out


def run_until_step(cmd: list[str], run: Path, step: int, sig: int) -> tuple[int, str]:
    """Start training, wait until `step` is logged, send `sig`; return the exit code and stderr."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and max(losses(run), default=0) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def test_preemption_crash_damage_and_config_change_lose_nothing(tmp_path, tiny_model_dir):
    """One run taken through every way a run stops, against an uninterrupted run of the same config:
    1. SIGTERM once a step is logged: it saves the step it is at and exits 143;
    2. relaunched, SIGKILL two steps later (only the periodic checkpoints are on disk);
    3. relaunched: it resumes from the newest checkpoint and finishes; every step's loss equals
       the uninterrupted run's exactly;
    4. the newest checkpoint damaged, a longer run: it warns, moves it aside, resumes from the one before;
    5. relaunched with another learning rate: refused (exit 2, naming train.lr), nothing trained or lost."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    ref_cfg = write_config(ref_dir, tiny_model_dir, steps=8, every=3)
    subprocess.run(train_cmd(ref_cfg), cwd=REPO, check=True, capture_output=True, timeout=900)
    ref = losses(ref_dir / "run")
    assert sorted(ref) == list(range(1, 9))

    cfg, run = write_config(cut_dir, tiny_model_dir, steps=8, every=3), cut_dir / "run"
    code, err = run_until_step(train_cmd(cfg), run, 1, signal.SIGTERM)  # 1.
    assert code == 143, err[-3000:]
    stopped = checkpoints(run)[-1]
    assert f"preemption (SIGTERM): every process saves step {stopped}" in err and stopped < 6, err[-3000:]
    code, err = run_until_step(train_cmd(cfg), run, stopped + 2, signal.SIGKILL)  # 2.
    assert code == -signal.SIGKILL, err[-3000:]
    out = subprocess.run(train_cmd(cfg), cwd=REPO, capture_output=True, text=True, timeout=900)  # 3.
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step" in out.stderr
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in ref:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed[step], ref[step])
    assert json.loads((run / "summary.json").read_text())["final_step"] == 8

    steps = checkpoints(run)  # 4.
    assert steps[-1] == 8 and len(steps) >= 2
    for f in (run / "checkpoints" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    longer = write_config(cut_dir, tiny_model_dir, steps=9, every=3)
    out = subprocess.run(train_cmd(longer), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 8 is unreadable" in out.stderr and "moved to" in out.stderr
    assert f"resumed from step {steps[-2]}" in out.stderr

    out = subprocess.run(train_cmd(longer) + ["train.steps=10", "train.lr=0.5"], cwd=REPO, capture_output=True,  # 5.
                         text=True, timeout=900)
    assert out.returncode == 2
    assert "train.lr" in out.stderr and "train.steps" not in out.stderr.split("(")[1].split(")")[0]
    assert max(losses(run)) == 9 and checkpoints(run)[-1] == 9  # nothing trained, nothing lost


@pytest.mark.parametrize("override,field", [
    ("train.lrr=1", "train.lrr"),
    ("mesh.data=3", "mesh"),
    ("data.train[0].path=./no/such/file.jsonl", "data.train[0].path"),
])
def test_bad_config_fails_before_compute(tmp_path, tiny_model_dir, override, field):
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, every=1)
    t0 = time.time()
    out = subprocess.run(train_cmd(cfg) + [override], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert field in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing ran
    assert time.time() - t0 < 120
