"""The launch scripts under DRY_RUN=1: the gcloud/ssh commands they would run, parsed as argv.

Every command a script runs is echoed as "+ <shell-quoted argv>" on stderr; in a dry run it is
only echoed, and the TPU is simulated as becoming ACTIVE once created, so whole flows print.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

TPU_ENV = {
    "TPU_NAME": "psy-test",
    "ZONE": "us-east5-a",
    "PROJECT": "my-proj",
    "QUEUED": "1",
    "ACCELERATOR_TYPE": "v5p-64",
    "CONFIG": "configs/qwen3_14b_tpu_v5p.yaml",
    "RUN_DIR": "gs://bucket/runs/v5p",
}
OVERRIDES = ["train.lr=3e-4", "data.train[0].limit=10"]


def run_script(name: str, env: dict[str, str], *args: str, timeout: int = 30
               ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run launch/<name> in a dry run; return the process and the argv of every echoed command."""
    # the preflight's `psynth plan` runs here with this interpreter; PLAN=0: its mesh check only
    full_env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "POLL_SECONDS": "0", "LOCAL_PYTHON": sys.executable,
                "PLAN": "0", **env}
    proc = subprocess.run(
        ["bash", str(LAUNCH / name), *args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd="/"
    )
    commands = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ ")]
    return proc, commands


def find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
    """Commands whose argv starts with `prefix`."""
    return [c for c in commands if c[: len(prefix)] == list(prefix)]


def ssh_commands(commands: list[list[str]]) -> list[str]:
    """The remote shell command of every `gcloud compute tpus tpu-vm ssh` call."""
    ssh = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    return [arg.removeprefix("--command=") for c in ssh for arg in c if arg.startswith("--command=")]


def shell_words(command: str) -> list[str]:
    """Words of a shell command line, with operators such as `(`, `;`, `|` as separate words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def assert_contains_run(argv: list[str], run: list[str]) -> None:
    """`run` occurs as consecutive items of `argv`."""
    n = len(run)
    assert any(argv[i : i + n] == run for i in range(len(argv) - n + 1)), (run, argv)


def test_train_tpu_all_provisions_installs_runs_and_deletes():
    proc, commands = run_script("train_tpu.sh", {**TPU_ENV, "DELETE": "1"}, "all", "--", *OVERRIDES)
    assert proc.returncode == 0, proc.stderr

    (create,) = find(commands, "gcloud", "alpha", "compute", "tpus", "queued-resources", "create")
    assert create[6] == "psy-test-qr"
    for flag in ("--node-id=psy-test", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
                 "--zone=us-east5-a", "--project=my-proj"):
        assert flag in create

    (scp,) = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    assert "--worker=all" in scp
    install, train = ssh_commands(commands)
    assert all("--worker=all" in c for c in find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh"))
    assert "pip install" in install and "'.[train]'" in install and "'jax[tpu]'" in install
    assert_contains_run(
        shell_words(train),
        ["train", "--config", "configs/qwen3_14b_tpu_v5p.yaml", "checkpoint.dir=gs://bucket/runs/v5p", *OVERRIDES],
    )
    words = shell_words(train)
    assert words[words.index("train") - 1] == "~/psynth_venv/bin/psynth"

    (delete,) = find(commands, "gcloud", "alpha", "compute", "tpus", "queued-resources", "delete")
    assert delete[6] == "psy-test-qr" and "--force" in delete and "--zone=us-east5-a" in delete
    assert commands[-1] == delete  # deleted after the run


def test_remote_commands_are_valid_bash():
    proc, commands = run_script("train_tpu.sh", TPU_ENV, "all", "--", *OVERRIDES, "model.source=it's here")
    assert proc.returncode == 0, proc.stderr
    for remote in ssh_commands(commands):
        check = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
        assert check.returncode == 0, (remote, check.stderr)
    assert "model.source=it's here" in shell_words(ssh_commands(commands)[-1])  # quoted for the remote shell


def test_preemption_reprovisions_and_relaunches():
    env = {**TPU_ENV, "DRY_RUN_FAILURES": "2", "MAX_RESTARTS": "3"}
    proc, commands = run_script("train_tpu.sh", env, "all")
    assert proc.returncode == 0, proc.stderr
    qr = ("gcloud", "alpha", "compute", "tpus", "queued-resources")
    assert len(find(commands, *qr, "create")) == 3
    assert len(find(commands, *qr, "delete")) == 2  # the suspended resource is replaced
    assert len([c for c in ssh_commands(commands) if "psynth train" in c]) == 3
    assert "re-provisioning (2/3)" in proc.stderr


def test_gives_up_after_max_restarts():
    env = {**TPU_ENV, "DRY_RUN_FAILURES": "5", "MAX_RESTARTS": "1"}
    proc, commands = run_script("train_tpu.sh", env, "run")
    assert proc.returncode != 0
    assert "MAX_RESTARTS=1" in proc.stderr
    assert len([c for c in ssh_commands(commands) if "psynth train" in c]) == 2


def test_existing_tpu_vm_is_used_without_provisioning():
    env = {k: v for k, v in TPU_ENV.items() if k not in ("QUEUED", "ACCELERATOR_TYPE")}
    proc, commands = run_script("train_tpu.sh", env, "all")
    assert proc.returncode == 0, proc.stderr
    assert not find(commands, "gcloud", "alpha", "compute", "tpus", "queued-resources", "create")
    assert find(commands, "gcloud", "compute", "tpus", "tpu-vm", "describe", "psy-test")
    assert "psynth train --config configs/qwen3_14b_tpu_v5p.yaml" in ssh_commands(commands)[-1]


def test_v5e_is_spelled_v5litepod_with_its_runtime():
    env = {**TPU_ENV, "ACCELERATOR_TYPE": "v5e-256", "CONFIG": "configs/qwen3_14b_tpu_v5e.yaml"}
    proc, commands = run_script("train_tpu.sh", env, "up")
    assert proc.returncode == 0, proc.stderr
    (create,) = find(commands, "gcloud", "alpha", "compute", "tpus", "queued-resources", "create")
    assert "--accelerator-type=v5litepod-256" in create
    assert "--runtime-version=v2-alpha-tpuv5-lite" in create


def test_delete_subcommand():
    proc, commands = run_script("train_tpu.sh", TPU_ENV, "delete")
    assert proc.returncode == 0, proc.stderr
    assert commands == [
        ["gcloud", "alpha", "compute", "tpus", "queued-resources", "delete", "psy-test-qr", "--force", "--quiet",
         "--zone=us-east5-a", "--project=my-proj"]
    ]
    env = {k: v for k, v in TPU_ENV.items() if k != "QUEUED"}
    _, commands = run_script("train_tpu.sh", env, "delete")
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "psy-test", "--quiet", "--zone=us-east5-a",
         "--project=my-proj"]
    ]


def test_logs_subcommand_follows_worker_log():
    proc, commands = run_script("train_tpu.sh", {**TPU_ENV, "LOG_WORKER": "3"}, "logs")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=3" in ssh and "tail -n 200 -F ~/psynth_train.log" in ssh_commands(commands)[0]


def test_eval_tpu_runs_psynth_eval():
    env = {k: v for k, v in TPU_ENV.items() if k != "RUN_DIR"}  # optional for eval
    env["CONFIG"] = "configs/eval_smollm2_cpu.yaml"
    proc, commands = run_script("eval_tpu.sh", env, "all", "--", "num_workers=2")
    assert proc.returncode == 0, proc.stderr
    run = shell_words(ssh_commands(commands)[-1])
    assert_contains_run(run, ["eval", "--config", "configs/eval_smollm2_cpu.yaml", "num_workers=2"])


def test_eval_tpu_passes_the_trained_run_as_adapter():
    env = {**TPU_ENV, "CONFIG": "configs/eval_smollm2_cpu.yaml"}
    proc, commands = run_script("eval_tpu.sh", env, "run")
    assert proc.returncode == 0, proc.stderr
    run = shell_words(ssh_commands(commands)[-1])
    assert_contains_run(run, ["eval", "--config", "configs/eval_smollm2_cpu.yaml", f"adapter={TPU_ENV['RUN_DIR']}"])
    assert not any(w.startswith("checkpoint.dir=") for w in run)


@pytest.mark.parametrize(
    ("script", "subcommand", "missing"),
    [
        ("train_tpu.sh", "all", "ZONE"),
        ("train_tpu.sh", "all", "TPU_NAME"),
        ("train_tpu.sh", "up", "ACCELERATOR_TYPE"),
        ("train_tpu.sh", "run", "CONFIG"),
        ("train_tpu.sh", "run", "RUN_DIR"),
        ("eval_tpu.sh", "delete", "PROJECT"),
    ],
)
def test_missing_required_variable_is_named(script, subcommand, missing):
    env = {k: v for k, v in TPU_ENV.items() if k != missing}
    proc, commands = run_script(script, env, subcommand)
    assert proc.returncode != 0
    assert f"{missing} is required" in proc.stderr
    assert not [c for c in commands if "create" in c or "ssh" in c]  # failed before doing anything


def test_bad_arguments_fail_clearly():
    proc, _ = run_script("train_tpu.sh", TPU_ENV, "launch")
    assert proc.returncode != 0 and "unknown subcommand 'launch'" in proc.stderr
    proc, _ = run_script("train_tpu.sh", TPU_ENV, "run", "train.lr=1")
    assert proc.returncode != 0 and "overrides go after --" in proc.stderr
    proc, _ = run_script("train_tpu.sh", {**TPU_ENV, "CONFIG": "configs/nope.yaml"}, "run")
    assert proc.returncode != 0 and "CONFIG=configs/nope.yaml not found" in proc.stderr


def test_train_gpu_multi_host_sets_jax_coordinator_env():
    env = {"HOSTS": "me@gpu-a,gpu-b", "CONFIG": "configs/qwen3_14b_8xh100.yaml", "RUN_DIR": "/nfs/runs/q",
           "REMOTE_DIR": "/srv/psynth"}
    proc, commands = run_script("train_gpu.sh", env, "--", *OVERRIDES)
    assert proc.returncode == 0, proc.stderr
    ssh = find(commands, "ssh")
    assert [c[-2] for c in ssh] == ["me@gpu-a", "gpu-b"]
    for process_id, command in enumerate(ssh):
        remote = shlex.split(command[-1])
        assert remote[:3] == ["cd", "/srv/psynth", "&&"]
        assert remote[3:6] == ["JAX_COORDINATOR_ADDRESS=gpu-a:8476", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={process_id}"]
        assert remote[6] == "/srv/psynth/.venv/bin/psynth"
        assert remote[7:] == ["train", "--config", "configs/qwen3_14b_8xh100.yaml", "checkpoint.dir=/nfs/runs/q",
                              *OVERRIDES]


def test_train_gpu_single_node_runs_locally():
    proc, commands = run_script("train_gpu.sh", {"CONFIG": "configs/qwen3_14b_8xh100.yaml"})
    assert proc.returncode == 0, proc.stderr
    assert commands == [[str(ROOT / ".venv/bin/psynth"), "train", "--config", "configs/qwen3_14b_8xh100.yaml"]]
    proc, _ = run_script("train_gpu.sh", {})
    assert proc.returncode != 0 and "CONFIG is required" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_bench_gpu_runs_every_issue7_step_with_flags_psynth_accepts():
    from psynth_jax.cli import main as psynth_main

    proc, commands = run_script("bench_gpu.sh", {"OUT": "/tmp/out", "PSYNTH_BIN": "psynth"})
    assert proc.returncode == 0, proc.stderr
    assert [c[2] for c in commands] == ["roofline", "ttft", "ttft", "batch", "decode", "train", "sampling"]
    parser = psynth_main.build_parser()
    for argv in commands:
        assert argv[:2] == ["psynth", "bench"]
        args = parser.parse_args(argv[1:])  # argparse exits (SystemExit) on any flag the CLI does not know
        assert args.out.startswith("/tmp/out/")
        if argv[2] not in ("roofline", "batch", "sampling"):
            assert args.roofline_json == "/tmp/out/roofline/roofline.json"
        if argv[2] == "ttft":  # on a GPU the peer runs first: JAX preallocates most of its memory
            assert args.torch_peer and args.peer_order == "first"
    proc, commands = run_script("bench_gpu.sh", {"OUT": "/tmp/out"}, "decode", "train")
    assert proc.returncode == 0 and [c[2] for c in commands] == ["decode", "train"]
    proc, commands = run_script("bench_gpu.sh", {}, "ttft")
    assert proc.returncode != 0 and "unknown step 'ttft'" in proc.stderr and not commands


def test_a_config_the_slice_cannot_hold_stops_before_anything_is_provisioned():
    """A 64-chip mesh (fsdp=16 x tensor=4) on a 16-chip slice fails the preflight: no gcloud command."""
    env = {**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-16", "CONFIG": "configs/qwen3_14b_tpu_v5e.yaml"}
    proc, commands = run_script("train_tpu.sh", env)
    assert proc.returncode != 0
    assert "does not divide 16 devices" in proc.stderr and "nothing was provisioned" in proc.stderr
    assert find(commands, "gcloud") == []
    assert find(commands, sys.executable, "-m", "psynth_jax.cli.main", "plan")  # the check that stopped it
    ok, commands = run_script("train_tpu.sh", {**env, "ACCELERATOR_TYPE": "v5litepod-64"})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits 64 x TPU v5e" in ok.stdout + ok.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the TPU compiler) is not installed")
def test_a_config_the_tpu_compiler_says_does_not_fit_stops_before_anything_is_provisioned():
    """PLAN=1: the preflight compiles the config with the TPU compiler for the slice's own devices;
    1,024 rows per chip of SmolLM2's train step do not fit a v5e chip: the compiler's answer names
    the largest buffer, and no gcloud command runs."""
    env = {**TPU_ENV, "PLAN": "1", "ACCELERATOR_TYPE": "v5litepod-4", "CONFIG": "configs/smollm2_135m_cpu.yaml"}
    overrides = ["data.batch_size=4096", "data.train[0].builder=exposure", "data.eval[0].builder=exposure"]
    proc, commands = run_script("train_tpu.sh", env, "all", "--", *overrides, timeout=600)
    assert proc.returncode != 0
    assert "TPU compiler" in proc.stdout and "DOES NOT FIT: the largest item is" in proc.stdout
    assert "GiB buffer f32[" in proc.stdout  # named by the compiler's memory report
    assert "does not fit ACCELERATOR_TYPE=v5litepod-4" in proc.stderr and "nothing was provisioned" in proc.stderr
    (plan,) = [c for c in find(commands, sys.executable, "-m", "psynth_jax.cli.main", "plan") if "--mesh-only" not in c]
    assert plan[-2:] == ["--compiler", "tpu"]
    assert find(commands, "gcloud") == []
