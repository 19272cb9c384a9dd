"""`psynth plan`: the TPU compiler's verdict for a TPU slice (libtpu, no TPU needed), the labelled CPU
estimate otherwise; --fit; and docs/PERFORMANCE.md's plan commands, run at small scale."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from psynth_jax.cli import plan as plan_cli
from psynth_jax.cli.main import main as psynth
from psynth_jax.config.accelerators import GIB, parse_accelerator
from psynth_jax.train.aot import libtpu_version
from psynth_jax.train.plan import PlanRequest, config_kind, format_plan, mesh_fits, verdict
from psynth_jax.train.plan_child import model_config_for
from tiny_smol import TINY_QWEN3_TPU, tiny_qwen3_tpu_config

REPO = Path(__file__).resolve().parents[1]


def test_accelerator_names():
    assert (parse_accelerator("v5litepod-16").chip.name, parse_accelerator("v5litepod-16").chips) == ("v5e", 16)
    assert parse_accelerator("v5p-64").chips == 32  # v5p type names count TensorCores, 2 per chip
    assert parse_accelerator("8xh100").chips == parse_accelerator("h100x8").chips == 8
    assert parse_accelerator("h200").chip.hbm_bytes == 141 * 10**9
    with pytest.raises(ValueError, match="unknown accelerator 'tpu9'"):
        parse_accelerator("tpu9")


def test_presets_stand_in_for_hub_configs_offline():
    cfg = model_config_for("Qwen/Qwen3-14B")
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (40, 8, 128)
    with pytest.raises(ValueError, match="no preset has that hub id"):
        model_config_for("someone/unknown-model")


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(f"""base: {REPO}/configs/smollm2_135m_cpu.yaml
data:
  train:
    - {{path: {tmp_path}/unused.jsonl, builder: exposure}}
  eval: []
mesh: {{data: -1, fsdp: 2, tensor: 2}}
checkpoint: {{dir: {tmp_path}/run}}
""")
    (tmp_path / "unused.jsonl").write_text("")
    return path


def test_the_cpu_estimate_of_a_train_config_on_a_sharded_mesh(tiny_config, tmp_path, capsys):
    """--compiler cpu: the parameters' share is what 4-way sharding of SmolLM2-135M leaves per
    device, the compiled step's arguments hold it, and the report says it is an estimate."""
    out = tmp_path / "plan.json"
    assert psynth(["plan", "--config", str(tiny_config), "--accelerator", "v5litepod-8", "--compiler", "cpu",
                   "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and not plan["tpu"]
    whole = 134_515_008 * 4  # SmolLM2-135M in float32
    params = plan["items"]["parameters"]
    assert whole / 4 * 0.95 < params < whole / 2  # split 4 ways (a few small leaves stay whole)
    step = plan["programs"]["train"]["memory"]
    assert step["arguments"] >= params + plan["items"]["lora_mapper_optimizer"]
    assert step["temporaries"] > 0 and plan["fits"]
    printed = capsys.readouterr().out
    for item in ("parameters", "lora_mapper_optimizer", "kv_caches", "CPU compiler on fake CPU devices (an estimate",
                 "-> fits"):
        assert item in printed


def test_a_mesh_the_slice_cannot_hold_is_refused_before_compiling(tiny_config, capsys):
    assert psynth(["plan", "--config", str(tiny_config), "--accelerator", "v5litepod-2"]) == 2
    assert "does not fit 2 x TPU v5e" in capsys.readouterr().err


def _cpu_plan(total_temps: int) -> dict:
    memory = {"arguments": 31 * GIB, "temporaries": total_temps, "outputs": GIB // 10, "aliased": GIB // 10,
              "generated_code": 0, "total": 31 * GIB + total_temps}
    return {"tpu": False, "compiler": "CPU compiler on fake CPU devices (an estimate)", "compiled_on": "1 device",
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "items": {"parameters": 30 * GIB, "lora_mapper_optimizer": GIB // 10, "kv_caches": 2 * GIB},
            "programs": {"train": {"fits": True, "memory": memory, "shape": "1 row"}}}


def test_a_cpu_estimate_over_the_chip_names_its_largest_item():
    req = PlanRequest(config="c.yaml", overrides=(), accelerator=parse_accelerator("v5litepod-1"), kind="train")
    v = verdict(_cpu_plan(4 * GIB), req)
    assert not v["fits"] and v["largest_item"] == "parameters" and v["total"] == 35 * GIB
    assert "DOES NOT FIT: the largest item is parameters" in format_plan(v)
    assert verdict(_cpu_plan(4 * GIB), PlanRequest("c.yaml", (), parse_accelerator("h100"), "train"))["fits"]


def test_gpu_targets_get_the_cpu_estimate_and_a_tpu_compile_of_one_is_refused():
    """JAX has no deviceless CUDA compile: a GPU node is always planned by the CPU estimate."""
    gpu = PlanRequest(config="c.yaml", overrides=(), accelerator=parse_accelerator("8xh100"), kind="train")
    assert not gpu.uses_tpu_compiler()
    with pytest.raises(ValueError, match="--compiler tpu: 8 x .* is not a TPU"):
        PlanRequest("c.yaml", (), parse_accelerator("8xh100"), "train", compiler="tpu").uses_tpu_compiler()


# ------------------------------------------------------------------------------ the TPU compiler
needs_libtpu = pytest.mark.skipif(libtpu_version() is None, reason="libtpu (the TPU compiler) is not installed")


@pytest.fixture
def tiny_tpu_config(tmp_path):
    """A training config of a tiny Qwen3 (head_dim 128, splash) for a v5e:2x2 slice, fsdp=2 x tensor=2."""
    path = tmp_path / "train.yaml"
    path.write_text(f"""base: {REPO}/configs/base.yaml
model: {{source: {tiny_qwen3_tpu_config(tmp_path / 'model')}, dtype: bfloat16, attn_impl: splash}}
data:
  train: [{{path: {tmp_path}/unused.jsonl, builder: exposure}}]
  batch_size: 4
  max_branches: 3
  buckets: [128, 256]
train: {{steps: 10, compute_dtype: bfloat16, remat: true}}
mesh: {{data: 1, fsdp: 2, tensor: 2}}
checkpoint: {{dir: {tmp_path}/run}}
""")
    (tmp_path / "unused.jsonl").write_text("")
    return path


@needs_libtpu
def test_a_plan_the_tpu_compiler_refuses_exits_2_naming_the_largest_buffer(tiny_tpu_config, capsys):
    """32,768 rows of 3 x 256-token branches per v5e chip: the compiler's RESOURCE_EXHAUSTED answer
    is the verdict, and the largest buffer of its memory report is named."""
    code = psynth(["plan", "--config", str(tiny_tpu_config), "--accelerator", "v5litepod-4", "--programs", "train",
                   "data.batch_size=131072"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "TPU compiler (XLA:TPU, libtpu" in out and "DOES NOT FIT: needs" in out
    assert "does not fit 4 x TPU v5e" in err and "the largest item is" in err and "GiB buffer" in err


@needs_libtpu
def test_fit_finds_the_largest_batch_the_tpu_compiler_accepts(tiny_tpu_config, tmp_path, capsys):
    """--fit bisects the candidates with one TPU compile each: 4 rows fit, 131,072 do not."""
    out = tmp_path / "fit.json"
    assert psynth(["plan", "--config", str(tiny_tpu_config), "--accelerator", "v5litepod-4", "--fit", "data.batch_size",
                   "--fit-values", "4,131072", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "largest data.batch_size that fits: 4  (TPU compiler" in printed
    result = json.loads(out.read_text())
    assert result["probes"]["4"]["fits"] and not result["probes"]["131072"]["fits"]
    assert result["probes"]["131072"]["needed"] > result["probes"]["131072"]["available"]


# -------------------------------------------------------------- docs/PERFORMANCE.md's plan commands
PERFORMANCE = REPO / "docs" / "PERFORMANCE.md"


def documented_plans() -> list[list[str]]:
    """The `psynth plan` commands of docs/PERFORMANCE.md's memory section, as argument lists."""
    text = PERFORMANCE.read_text()
    section = text[text.index("## Memory plans"):]
    section = section[:section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("psynth plan "):
                args = shlex.split(line)[1:]
                at = args.index("--config") + 1
                args[at] = str(REPO / args[at])  # as run from the repository's root
                commands.append(args)
    return commands


def _request(args: list[str]) -> tuple[PlanRequest, set[str]]:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    ns = parser.parse_args(args[1:])
    req = PlanRequest(config=ns.config, overrides=tuple(ns.overrides), accelerator=parse_accelerator(ns.accelerator),
                      kind=config_kind(ns.config), compiler=ns.compiler)
    flags = {a for a in args if a.startswith("--")} - {"--config", "--accelerator", "--json"}
    return req, flags


def test_the_documented_plans_name_real_configs_whose_mesh_fits():
    """Every documented plan: a shipped config, an accelerator type, a mesh that fits its chips;
    the TPU compiler for every TPU one (the GPU ones are the labelled CPU estimate)."""
    commands = documented_plans()
    assert len(commands) >= 10, commands
    for args in commands:
        req, _ = _request(args)
        mesh_fits(req)
        if req.accelerator.is_tpu and req.compiler == "auto" and libtpu_version() is not None:
            assert req.uses_tpu_compiler(), args


# each documented command at small scale: the tiny Qwen3 (8 KV heads: a mesh's tensor=4 or 8 divides
# them), 128 / 256-token buckets, short generations; the config, its mesh, batch and flags as written
SMALL = {"train": ["data.buckets=[128, 256]", "data.distill_worker_tokens=64", "data.distill_max_new_tokens=32"],
         "eval": ["worker_tokens=128", "max_new_tokens=32"]}


@needs_libtpu
@pytest.mark.slow
def test_the_documented_plans_run_at_small_scale(tmp_path, capsys):
    """Opt-in (-m slow: a child process and a compile per command, on 32- to 256-chip meshes; 5.5
    minutes on the loaded 2-core VM). One documented command per compiler and flag set
    (--programs, --fit, --compiler) runs as written on a tiny model: the TPU compiler's report says
    so and fits; the CPU estimate is labelled one. The fast tests above run the same flags on a
    4-chip slice."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(TINY_QWEN3_TPU, num_attention_heads=8, num_key_value_heads=8)))
    seen = set()
    for args in documented_plans():
        req, flags = _request(args)
        key = (req.uses_tpu_compiler(), tuple(sorted(flags)))
        if key in seen:
            continue
        seen.add(key)
        small = [f"model.source={model}", *SMALL[req.kind]]
        assert psynth(args + small) == 0, args
        printed = capsys.readouterr().out
        if "--fit" in flags:
            assert "largest data.batch_size that fits: " in printed and "TPU compiler" in printed, printed
        elif req.uses_tpu_compiler():
            assert "compiler: TPU compiler (XLA:TPU" in printed and "fits (the TPU compiler compiled" in printed, printed
        else:
            assert "CPU compiler on fake CPU devices (an estimate" in printed and "-> fits" in printed, printed
    assert len(seen) >= 5, seen


@pytest.mark.slow
@pytest.mark.parametrize("args", documented_plans(), ids=lambda a: " ".join(a[1:]).replace(str(REPO) + "/", ""))
def test_the_documented_plans_as_written(args, capsys):
    """Opt-in (-m slow; minutes each on a CPU host): the full-size Qwen3-14B plans of the docs fit."""
    req, flags = _request(args)
    assert psynth(args) == 0
    printed = capsys.readouterr().out
    if "--fit" not in flags:
        assert ("TPU compiler" if req.uses_tpu_compiler() else "an estimate") in printed and "fits" in printed
