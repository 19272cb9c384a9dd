"""`psynth plan`: per-device memory from the real shardings and a real compile on fake devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psynth_jax.train.plan import PlanRequest, format_plan, verdict
from psynth_jax.train.plan_child import model_config_for
from psynth_jax.cli.main import main as psynth
from psynth_jax.config.accelerators import GIB, parse_accelerator

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


def test_plan_of_a_train_config_on_a_sharded_mesh(tiny_config, tmp_path, capsys):
    """The parameters' share is what 4-way sharding of SmolLM2-135M leaves per device, the compiled
    step's arguments hold it, and the printed table names every item."""
    out = tmp_path / "plan.json"
    assert psynth(["plan", "--config", str(tiny_config), "--accelerator", "v5litepod-8", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    whole = 134_515_008 * 4  # SmolLM2-135M in float32
    params = plan["items"]["parameters"]
    assert whole / 4 * 0.95 < params < whole / 2  # split 4 ways (a few small leaves stay whole)
    assert plan["compiled"]["arguments"] >= params + plan["items"]["lora_mapper_optimizer"]
    assert plan["compiled"]["temporaries"] > 0 and plan["fits"]
    printed = capsys.readouterr().out
    for item in ("parameters", "lora_mapper_optimizer", "kv_caches", "compiled temporaries", "fits"):
        assert item in printed


def test_a_mesh_the_slice_cannot_hold_is_refused_before_compiling(tiny_config, capsys):
    assert psynth(["plan", "--config", str(tiny_config), "--accelerator", "v5litepod-2"]) == 2
    assert "does not fit 2 x TPU v5e" in capsys.readouterr().err


def test_a_plan_over_the_chip_names_its_largest_item():
    plan = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "shapes": {}, "items": {
        "parameters": 30 * GIB, "lora_mapper_optimizer": GIB // 10, "kv_caches": 2 * GIB},
        "compiled": {"arguments": 31 * GIB, "temporaries": 4 * GIB, "outputs": GIB // 10, "aliased": GIB // 10}}
    req = PlanRequest(config="c.yaml", overrides=(), accelerator=parse_accelerator("v5litepod-1"), kind="train")
    v = verdict(plan, req)
    assert not v["fits"] and v["largest_item"] == "parameters" and v["total"] == 35 * GIB
    assert "DOES NOT FIT: the largest item is parameters" in format_plan(v)
    assert verdict(plan, PlanRequest("c.yaml", (), parse_accelerator("h100"), "train"))["fits"]
