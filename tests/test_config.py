"""Typed configs: YAML + base inheritance + key=value overrides, errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest

from psynth_jax.config import (
    ExperimentConfig,
    MeshConfig,
    dump_config,
    from_dict,
    load_config,
    resolve_mesh_shape,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CPU = CONFIGS / "smollm2_135m_cpu.yaml"



@pytest.fixture
def multi(tmp_path) -> Path:
    """The CPU config with three training sources (index-based overrides address them)."""
    path = tmp_path / "multi.yaml"
    src = "../shared/data/gsm8k/train.jsonl"
    path.write_text(f"""base: {CPU}
data:
  train:
    - {{path: {src}, builder: distillation, limit: 40}}
    - {{path: {src}, builder: aggregation, limit: 150}}
    - {{path: {src}, builder: exposure, limit: 150}}
""")
    return path


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml" and not p.name.startswith("eval_"))


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Relative data paths in configs are read from the working directory: the repository root."""
    monkeypatch.chdir(ROOT)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"base.yaml", "smollm2_135m_cpu.yaml", "qwen3_14b_tpu_v5p.yaml", "qwen3_14b_tpu_v5e.yaml",
            "qwen3_14b_8xh100.yaml"} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    if cfg.train.init_from:  # a stage-2 config: valid once its stage-1 run directory exists
        with pytest.raises(ValueError, match="train.init_from"):
            validate(cfg)
        write(tmp_path / "stage1" / "config.yaml", "")
        cfg = load_config(path, [f"train.init_from={tmp_path / 'stage1'}"])
    validate(cfg)
    again = load_config(write(tmp_path / "dumped.yaml", dump_config(cfg)))
    assert again == cfg
    hash(cfg)  # frozen and hashable all the way down


@pytest.mark.parametrize(
    ("path", "devices", "shape"),
    [
        ("qwen3_14b_tpu_v5p.yaml", 32, (1, 32, 1)),  # v5p-64: 32 chips
        ("qwen3_14b_tpu_v5e.yaml", 256, (4, 16, 4)),
        ("qwen3_14b_8xh100.yaml", 8, (1, 8, 1)),
        ("smollm2_135m_cpu.yaml", 1, (1, 1, 1)),
    ],
)
def test_shipped_meshes_fit_their_hardware(path, devices, shape):
    cfg = load_config(CONFIGS / path)
    assert resolve_mesh_shape(cfg.mesh, devices) == shape
    validate(cfg, num_devices=devices)
    assert cfg.data.batch_size % (shape[0] * shape[1]) == 0  # batch splits over data x fsdp


def test_paper_setting_in_large_configs():
    for name in ("qwen3_14b_tpu_v5p.yaml", "qwen3_14b_tpu_v5e.yaml", "qwen3_14b_8xh100.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.model.source == "Qwen/Qwen3-14B" and cfg.model.dtype == "bfloat16"
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (16, 32.0, ("q", "k", "v", "o"))
        assert cfg.train.lr == 1e-4 and cfg.train.remat and cfg.train.clip_norm is None


def test_defaults_are_the_release_recipe():
    cfg = load_config(CONFIGS / "base.yaml", ["data.train=[{path: x/y, builder: exposure}]", "train.steps=1",
                                              "checkpoint.dir=runs/x"])
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32.0 and cfg.mapper.kind == "affine_length"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.decay, cfg.train.clip_norm) == (1e-4, 0.0, "none", None)
    assert (cfg.data.max_total_tokens, cfg.data.max_live_tokens, cfg.data.max_cache_tokens) == (20000, 1800, 13000)
    assert (cfg.data.num_branches, cfg.data.batch_size, cfg.data.seed, cfg.train.seed) == (3, 1, 42, 42)
    assert cfg.train.loss.kl_weight == 0.0 and cfg.checkpoint.keep == 3 and cfg.checkpoint.async_save
    # base.yaml spells out exactly the dataclass defaults
    schema_defaults = ExperimentConfig(data=cfg.data, train=dataclasses.replace(cfg.train, steps=1),
                                       checkpoint=cfg.checkpoint)
    assert cfg == schema_defaults


def test_overrides_are_parsed_by_field_type(multi):
    cfg = load_config(
        multi,
        [
            "train.lr=3e-4",  # PyYAML would read this as a string
            "mesh.fsdp=4",
            "mesh.data=1",
            "train.remat=true",
            "train.clip_norm=1",
            "lora.alpha=16",
            "lora.targets=q,v",
            "data.buckets=[128, 256]",
            "data.train[0].limit=7",
            "data.train[1].subset=null",
            "model.source=123",  # a str field keeps the text
            "tensorboard=off",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.mesh == MeshConfig(data=1, fsdp=4, tensor=1)
    assert cfg.train.remat is True and cfg.tensorboard is False
    assert cfg.train.clip_norm == 1.0 and isinstance(cfg.train.clip_norm, float)
    assert cfg.lora.alpha == 16.0 and cfg.lora.targets == ("q", "v")
    assert cfg.data.buckets == (128, 256)
    assert cfg.data.train[0].limit == 7 and cfg.data.train[1].limit == 150  # only the indexed item changes
    assert cfg.data.train[1].subset is None
    assert cfg.model.source == "123"
    assert load_config(CPU, ["train.clip_norm=1.0", "train.clip_norm=null"]).train.clip_norm is None  # last wins


def test_whole_section_override():
    cfg = load_config(CPU, ["data.train=[{path: openai/gsm8k, builder: distillation, subset: main}]"])
    assert len(cfg.data.train) == 1 and cfg.data.train[0].builder == "distillation"
    assert cfg.data.train[0].subset == "main" and cfg.data.train[0].split == "train"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=3e-4", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=3e-4", "unknown config key 'trian' (did you mean 'train'?)"),
        ("train.loss.kl_wieght=1", "unknown config key 'train.loss.kl_wieght' (did you mean 'train.loss.kl_weight'?)"),
        ("data.train[0].pth=x", "unknown config key 'data.train[0].pth' (did you mean 'data.train[0].path'?)"),
        ("mesh.zzz=1", "unknown config key 'mesh.zzz' (valid keys under 'mesh': data, fsdp, tensor, rules)"),
    ],
)
def test_unknown_override_key_names_field_and_suggests(override, message):
    with pytest.raises(ValueError) as err:
        load_config(CPU, [override])
    assert message in str(err.value)


def test_unknown_yaml_key_names_field(tmp_path):
    path = write(tmp_path / "c.yaml", f"base: {CPU}\nlora:\n  rnak: 8\n")
    with pytest.raises(ValueError, match=r"unknown config key 'lora.rnak' \(did you mean 'lora.rank'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
        ("mesh.fsdp=1.5", "config key 'mesh.fsdp' expects int"),
        ("train.lr=fast", "config key 'train.lr' expects a finite number"),
        ("train.lr=nan", "config key 'train.lr' expects a finite number, got 'nan'"),
        ("lora.alpha=-inf", "config key 'lora.alpha' expects a finite number"),
        ("train.remat=maybe", "config key 'train.remat' expects bool"),
        ("model.dtype=fp16", "config key 'model.dtype' must be one of 'float32', 'bfloat16', got 'fp16'"),
        ("lora.targets=q,x", "config key 'lora.targets[1]' must be one of"),
        ("data.buckets=[128, big]", "config key 'data.buckets[1]' expects int"),
        ("data.train[0].builder=mix", "config key 'data.train[0].builder' must be one of"),
        ("train.loss=3", "config key 'train.loss' must be a mapping"),
    ],
)
def test_wrong_type_names_field(override, message):
    with pytest.raises(ValueError) as err:
        load_config(CPU, [override])
    assert message in str(err.value)


def test_wrong_yaml_types_name_fields(tmp_path):
    path = write(tmp_path / "c.yaml", f"base: {CPU}\ntrain:\n  steps: 1.5\n  remat: 1\ncheckpoint:\n  dir: 2024\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    text = str(err.value)
    assert "3 problems" in text
    for field in ("train.steps", "train.remat", "checkpoint.dir"):
        assert f"config key '{field}'" in text


def test_missing_required_values_are_named():
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS / "base.yaml")
    for field in ("data.train", "train.steps", "checkpoint.dir"):
        assert f"missing required config value '{field}'" in str(err.value)
    with pytest.raises(ValueError, match=r"missing required config value 'data.train\[0\].builder'"):
        load_config(CPU, ["data.train=[{path: x.jsonl}]"])


@pytest.mark.parametrize(
    "override",
    ["x", "train.lr", "=3", "train..lr=1", "train.lr[0=1"],
)
def test_malformed_override(override):
    with pytest.raises(ValueError, match="malformed override"):
        load_config(CPU, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train[5].limit=3", "'data.train' has 3 entries, no [5]"),
        ("data.train.limit=3", "'data.train' is a list; address an item as data.train[i]"),
        ("train.lr.x=3", "'train.lr' is a value, not a section"),
    ],
)
def test_override_into_wrong_shape(override, message, multi):
    with pytest.raises(ValueError) as err:
        load_config(multi, [override])
    assert message in str(err.value)


def test_impossible_mesh_names_fields():
    with pytest.raises(ValueError) as err:
        resolve_mesh_shape(MeshConfig(data=2, fsdp=4, tensor=2), 8)
    assert "impossible mesh: data*fsdp*tensor=16 but 8 devices (mesh.data=2, mesh.fsdp=4, mesh.tensor=2)" in str(
        err.value
    )
    with pytest.raises(ValueError, match=r"impossible mesh: fsdp\*tensor=6 does not divide 8 devices"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=2), 8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1, got mesh.data and mesh.fsdp"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match=r"mesh.tensor must be a positive size or -1"):
        resolve_mesh_shape(MeshConfig(tensor=0), 8)
    with pytest.raises(ValueError, match=r"impossible mesh: data\*fsdp\*tensor=4 but 8 devices"):
        validate(load_config(CPU, ["mesh.data=1", "mesh.fsdp=4"]), num_devices=8)


def test_mesh_resolution():
    assert resolve_mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 16) == (2, 4, 2)
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)


def test_missing_local_data_path_names_field():
    cfg = load_config(CPU, ["data.train[0].path=../shared/data/gsm8k/trian.jsonl"])
    with pytest.raises(ValueError, match=r"data.train\[0\].path: local path '../shared/data/gsm8k/trian.jsonl'"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"data.eval\[0\].path"):
        validate(load_config(CPU, ["data.eval[0].path=/nowhere/test.jsonl"]))
    with pytest.raises(ValueError, match=r"data.train\[0\].path: local path 'data/local.parquet'"):
        validate(load_config(CPU, ["data.train[0].path=data/local.parquet"]))  # a file suffix is local
    with pytest.raises(ValueError, match="model.source: local path './no_model' does not exist"):
        validate(load_config(CPU, ["model.source=./no_model"]))


def test_hub_ids_and_remote_paths_are_not_checked(multi):
    validate(load_config(multi, ["data.train[0].path=openai/gsm8k", "data.train[1].path=gs://b/x.jsonl",
                               "model.source=Qwen/Qwen3-0.6B"]))


def test_validate_reports_every_problem():
    cfg = load_config(CPU, ["train.warmup_steps=500", "data.max_live_tokens=5000", "data.buckets=[512, 256]",
                            "lora.rank=0", "train.loss.ce_weight=0", "data.train[0].limit=0"])
    with pytest.raises(ValueError) as err:
        validate(cfg)
    text = str(err.value)
    for field in ("train.warmup_steps", "data.max_live_tokens", "data.buckets", "lora.rank", "train.loss",
                  "data.train[0].limit"):
        assert field in text


def test_base_inheritance_relative_to_including_file(tmp_path):
    write(tmp_path / "root.yaml", "train:\n  steps: 10\n  lr: 5.0e-4\n  loss:\n    kl_weight: 0.5\nlog_every: 7\n")
    write(tmp_path / "mid" / "mid.yaml", "base: ../root.yaml\ntrain:\n  loss:\n    kl_temperature: 2.0\n")
    child = write(
        tmp_path / "mid" / "deep" / "child.yaml",
        "base: ../mid.yaml\ndata:\n  train: [{path: a/b, builder: exposure}]\ncheckpoint: {dir: runs/x}\n"
        "train:\n  lr: 2.0e-4\n",
    )
    cfg = load_config(child)
    assert cfg.train.steps == 10 and cfg.train.lr == 2e-4 and cfg.log_every == 7  # child wins, rest inherited
    assert cfg.train.loss.kl_weight == 0.5 and cfg.train.loss.kl_temperature == 2.0  # nested mappings merge
    assert load_config(child, ["train.steps=3"]).train.steps == 3  # overrides beat every file


def test_base_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match="config base cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError, match=r"missing.yaml \(base of"):
        load_config(write(tmp_path / "c.yaml", "base: missing.yaml\n"))
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(write(tmp_path / "d.yaml", "- 1\n- 2\n"))


def test_dump_load_round_trip_with_overrides(tmp_path):
    cfg = load_config(CPU, ["train.lr=1e-7", "train.clip_norm=0.5", "lora.targets=[q, k, gate]",
                            "data.train[0].subset=main", "model.source=a: b # c"])
    text = dump_config(cfg)
    assert "base:" not in text
    assert load_config(write(tmp_path / "run" / "config.yaml", text)) == cfg


@dataclasses.dataclass(frozen=True)
class _Pair:
    name: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Toy:
    sizes: list[int]
    pair: tuple[int, str] = (0, "")
    items: tuple[_Pair, ...] = ()
    note: Optional[str] = None


def test_from_dict_generic_types():
    toy = from_dict(_Toy, {"sizes": "1,2,3", "pair": [4, "x"], "items": [{"name": "a"}, {"name": "b", "weight": 2}],
                           "note": "~"})
    assert toy == _Toy(sizes=[1, 2, 3], pair=(4, "x"), items=(_Pair("a"), _Pair("b", 2.0)), note=None)
    with pytest.raises(ValueError, match="config key 'pair' expects 2 items, got 3"):
        from_dict(_Toy, {"sizes": [], "pair": [1, "a", "b"]})
    with pytest.raises(ValueError, match=r"missing required config value 'items\[0\].name'"):
        from_dict(_Toy, {"sizes": [], "items": [{"weight": 1}]})
