"""Nothing lost, nothing silent in a training run directory.

One tiny training run (4 steps, a checkpoint every 2) is made once; each test works on a copy:
- a corrupt newest checkpoint is moved aside to checkpoints/corrupt/ (bytes intact, REASON.txt),
  the resume redoes its steps from the older one and saves the final step readable again, with
  the same losses as the uninterrupted run and no "Event loop is closed" tracebacks;
- with no readable checkpoint, `psynth train` refuses and changes nothing; `--restart` moves them
  aside and trains from step 0 to a readable final step, even with checkpoint.keep=1;
- a rerun of a finished run keeps summary.json and metrics.jsonl byte for byte;
- a moved run directory, given by another spelling, resumes (not "another config");
- a run's config.yaml with a YAML syntax error is reported by file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from psynth_jax.cli.main import EXIT_USAGE, main
from tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/train.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")
STEPS = 4


def write_config(path: Path, model: Path, run: Path) -> Path:
    path.write_text(f"""base: {REPO / 'configs/base.yaml'}
model: {{source: {model}, dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
data:
  train:
    - {{path: {GSM8K}, builder: aggregation, limit: 24}}
  buckets: [256, 512, 768]
  max_total_tokens: 768
  max_live_tokens: 256
  max_cache_tokens: 512
train: {{steps: {STEPS}, lr: 1.0e-2, compute_dtype: float32}}
checkpoint: {{dir: {run}, every_steps: 2, keep: 3}}
tensorboard: false
""")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def corrupt(run: Path, step: int) -> None:
    """Overwrite the array chunks of a step (the damage whose failed restore left ~36 tracebacks)."""
    for f in (run / "checkpoints" / str(step) / "train").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage")


def readable_steps(run: Path) -> list[int]:
    """Steps whose trainable state Orbax restores (without a target: plain arrays)."""
    good = []
    for d in sorted((run / "checkpoints").iterdir()):
        if d.name.isdigit():
            try:
                ocp.StandardCheckpointer().restore(d / "train")
                good.append(int(d.name))
            except Exception:  # noqa: BLE001
                pass
    return good


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict[int, float]]:
    """(tiny model dir, a finished 4-step run dir, its losses), made once; copy before changing."""
    root = tmp_path_factory.mktemp("ckpt")
    model = make_tiny_smol(root / "model")
    run = root / "run"
    assert main(["train", "--config", str(write_config(root / "cfg.yaml", model, run)), "--quiet"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4] and readable_steps(run) == [2, 4]
    return model, run, losses(run)


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path, dict[int, float]]:
    """(config, a copy of the finished run, the reference losses)."""
    model, run, ref = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return write_config(tmp_path / "cfg.yaml", model, copy), copy, ref


def test_corrupt_newest_checkpoint_is_moved_aside_and_its_steps_redone(run_copy):
    cfg, run, ref = run_copy
    corrupt(run, 4)
    damaged = snapshot(run / "checkpoints" / "4")
    out = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "train", "--config", str(cfg), "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    moved = list((run / "checkpoints" / "corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("4-")
    assert "checkpoint step 4 is unreadable (ValueError: " in out.stderr and f"moved to {moved[0]}" in out.stderr
    assert "resumed from step 2" in out.stderr
    assert "metrics.jsonl: dropped 2 lines logged after step 2" in out.stderr
    assert {k: v for k, v in snapshot(moved[0]).items() if k != "REASON.txt"} == damaged  # kept as it was
    assert "step 4 could not be restored" in (moved[0] / "REASON.txt").read_text()
    assert readable_steps(run) == [2, 4]  # the redone step 4 was saved again, readable
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # each step once
    assert losses(run) == pytest.approx(ref, abs=1e-6)  # the redone steps are the same steps
    assert json.loads((run / "summary.json").read_text())["last_losses"] == pytest.approx(list(ref.values()), abs=1e-6)


def test_no_readable_checkpoint_is_refused_then_restart_moves_them_aside(run_copy, capsys):
    cfg, run, ref = run_copy
    corrupt(run, 2)
    corrupt(run, 4)
    before = snapshot(run)
    assert main(["train", "--config", str(cfg), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("psynth train: error:"))
    assert line.startswith(f"psynth train: error: no checkpoint in {run / 'checkpoints'} can be read (step 4: ")
    assert "; step 2: " in line and line.endswith(
        f"nothing was changed. Rerun with --restart to move them aside to {run / 'checkpoints'}/corrupt/ and train "
        "from step 0")
    assert snapshot(run) == before

    assert main(["train", "--config", str(cfg), "--quiet", "--restart", "checkpoint.keep=1"]) == 0
    err = capsys.readouterr().err
    assert "--restart: none of the 2 checkpoints could be read; they are moved aside, training starts again " \
           "from step 0" in err
    moved = sorted(p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir())
    assert moved == ["2", "4"]
    for step in (2, 4):  # moved with their bytes intact
        (where,) = (run / "checkpoints" / "corrupt").glob(f"{step}-*")
        assert {k: v for k, v in snapshot(where).items() if k != "REASON.txt"} == {
            k.split("/", 2)[2]: v for k, v in before.items() if k.startswith(f"checkpoints/{step}/")}
    assert readable_steps(run) == [4]  # keep=1 kept the newest readable one, nothing else was deleted
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert losses(run) == pytest.approx(ref, abs=1e-6)  # from scratch, the same run again


def test_rerun_of_a_finished_run_keeps_its_figures(run_copy, capsys):
    cfg, run, ref = run_copy
    before = snapshot(run)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"the run finished at step {STEPS} (train.steps={STEPS}): nothing to train, {run}/summary.json kept" in err
    assert snapshot(run) == before
    # stopped after its last save but before summary.json: the summary is rebuilt from metrics.jsonl
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    rebuilt = json.loads((run / "summary.json").read_text())
    assert rebuilt["last_losses"] == summary["last_losses"] == pytest.approx(list(ref.values()), abs=1e-6)
    assert rebuilt["final_step"] == STEPS and "train_tokens_per_s" not in rebuilt  # nothing trained: no figure
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_moved_run_dir_given_by_another_spelling_resumes(run_copy, tmp_path, capsys):
    cfg, run, _ = run_copy
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    respelled = f"{moved.parent}/./{moved.name}"
    assert main(["train", "--config", str(cfg), "--quiet", f"checkpoint.dir={respelled}"]) == 0
    err = capsys.readouterr().err
    assert "another config" not in err and f"resumed from step {STEPS}" in err


def test_yaml_syntax_error_in_a_runs_config_yaml(run_copy, capsys):
    cfg, run, _ = run_copy
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lora:", "lora: [", 1))
    line = next(i for i, x in enumerate((run / "config.yaml").read_text().splitlines(), 1) if x.startswith("lora: ["))
    before = snapshot(run)
    assert main(["train", "--config", str(cfg), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    msg = next(x for x in err.splitlines() if x.startswith("psynth train: error:"))
    assert f"{run}/config.yaml:" in msg and "YAML syntax error" in msg, msg
    assert int(msg.split(f"{run}/config.yaml:")[1].split(":")[0]) >= line
    assert snapshot(run) == before


def test_a_remote_run_directory_reaches_orbax_unchanged(tmp_path, monkeypatch):
    """checkpoint.dir=gs://bucket/run (what launch/train_tpu.sh passes): the trainer's checkpoints go
    to gs://bucket/run/checkpoints, not to a local ./gs:/bucket/run (pathlib collapses the `//`);
    the host's own run files go to a local folder named after it."""
    from psynth_jax import checkpoints

    seen = []

    class Manager:  # Orbax's CheckpointManager would reach for the network
        def __init__(self, directory, options=None):
            seen.append(directory)

    monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", Manager)
    monkeypatch.chdir(tmp_path)
    assert checkpoints.Checkpointer("gs://bucket/run").directory == "gs://bucket/run/checkpoints"
    assert seen == ["gs://bucket/run/checkpoints"]
    assert checkpoints.host_run_dir("gs://bucket/run/") == Path("runs/remote/gs/bucket/run")
    assert checkpoints.host_run_dir("runs/local") == Path("runs/local")
