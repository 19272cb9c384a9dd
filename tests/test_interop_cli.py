"""`psynth export` and `psynth demo --adapter`: from a training run directory or an adapter directory.

The run directory is built the way the trainer leaves one (config.yaml from `dump_config`, an
Orbax checkpoint of {trainable: {lora, mapper}, opt_state} written by the trainer's Checkpointer
at step 7), with random LoRA and mapper values, without running a training loop.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from fast_compile import xla_flags
import hf_models
from psynth_jax.cli import export as export_cli
from psynth_jax.config import ExperimentConfig, dump_config, from_dict
from psynth_jax.interop.adapter import AdapterError, load_peft_adapter
from psynth_jax.interop.importer import with_adapter
from psynth_jax.interop.runs import restore_run
from psynth_jax.interop.loader import load_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from psynth_jax.checkpoints import Checkpointer
from psynth_jax.train.objective import split_trainable
from psynth_jax.train.step import make_optimizer
from test_interop_export import jax_logits, randomize_lora, torch_logits
from test_interop_import import torch_release_mapper

REPO = Path(__file__).resolve().parents[1]
LORA = LoRAConfig(rank=4, alpha=8.0)
STEP = 7


def leaves(tree) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


def write_run(base: Path, run: Path, mapper_kind: str) -> tuple[dict, dict]:
    """A run directory as the trainer leaves one (random LoRA and mapper at step 7); returns the
    saved LoRA leaves and mapper leaves."""
    cfg = from_dict(ExperimentConfig, {
        "model": {"source": str(base), "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8.0, "targets": ["q", "k", "v", "o"]},
        "mapper": {"kind": mapper_kind},
        "data": {"train": [{"path": "unused.jsonl", "builder": "exposure"}]},
        "train": {"steps": 10, "grad_accum": 2, "clip_norm": 1.0},
        "checkpoint": {"dir": str(run)},
    })
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    model = randomize_lora(load_model(base, lora=LORA, with_tokenizer=False), seed=7)
    mapper = make_mapper(mapper_kind, model.cfg.num_kv_heads, seed=1)
    state = nnx.state(mapper)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x + 0.3, nnx.to_pure_dict(state)))
    nnx.update(mapper, state)
    _, trainable, _ = split_trainable(nnx.merge(model.graphdef, model.state), mapper)
    t = cfg.train
    tx = make_optimizer(t.lr, t.steps, clip_norm=t.clip_norm, grad_accum=t.grad_accum)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(STEP, {"trainable": trainable, "opt_state": tx.init(trainable)}, {}, force=True)
    ckpt.close()
    return leaves(trainable["lora"]), leaves(trainable["mapper"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """(tiny llama dir with tokenizer, run dir, the saved LoRA leaves, the saved mapper leaves)."""
    root = tmp_path_factory.mktemp("cli")
    base = root / "base"
    hf_models.make_tiny_sharp("llama", False, base, seed=3)
    hf_models.save_tiny_tokenizer(base)
    run = root / "run"
    saved_lora, saved_mapper = write_run(base, run, "per_head_affine")
    return base, run, saved_lora, saved_mapper


def synthesizer(base: Path) -> ParallelSynthesis:
    """What `psynth demo` builds: the default LoRA (r16/a32 on q,k,v,o), an identity mapper."""
    return ParallelSynthesis(load_model(base, lora=LoRAConfig()))


def lora_of(model) -> dict:
    layers = leaves(model.state)["layers"]
    return {"layers": {t: {k: v for k, v in node.items() if k.startswith("lora")}
                       for t, node in layers.items() if "lora_a" in node}}


def assert_same(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_with_adapter_from_run_dir(run_dir):
    base, run, saved_lora, saved_mapper = run_dir
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, run)
    desc = loaded.description
    assert desc == (f"trained: run {run} step {STEP}, mapper per_head_affine, LoRA r4/a8 on q,k,v,o, "
                    "handoff output_tokens/chat (recorded in the run)")
    assert synth.model.lora == LORA and synth.gen.model is synth.model
    assert_same(lora_of(synth.model), saved_lora)
    assert_same(leaves(nnx.state(synth.mapper)), saved_mapper)
    assert_same(leaves(synth.mapper_state), saved_mapper)


def test_run_saved_on_a_multi_device_mesh_restores_on_one_device(run_dir, tmp_path):
    """The trainer saves replicated arrays on its mesh; the demo/export box may have one device."""
    base, run, _, _ = run_dir
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from flax import nnx
        from psynth_jax.interop.loader import load_model
        from psynth_jax.model.transformer import LoRAConfig
        from psynth_jax.synthesis.mapper import make_mapper
        from psynth_jax.checkpoints import Checkpointer
        from psynth_jax.train.objective import split_trainable
        from psynth_jax.model.sharding import Rules, make_mesh, state_shardings
        from psynth_jax.train.step import make_optimizer
        assert jax.device_count() == 4
        m = load_model({str(base)!r}, lora=LoRAConfig(rank=4, alpha=8.0), with_tokenizer=False, seed=11)
        _, tr, _ = split_trainable(nnx.merge(m.graphdef, m.state), make_mapper("per_head_affine", 2))
        tr = jax.device_put(tr, state_shardings(tr, make_mesh((2, 2, 1)), Rules()))
        tx = make_optimizer(1e-4, 10, clip_norm=1.0, grad_accum=2)
        ckpt = Checkpointer({str(tmp_path)!r}, async_save=False)
        ckpt.save(3, {{"trainable": tr, "opt_state": tx.init(tr)}}, {{}}, force=True)
        ckpt.close()
        np.save({str(tmp_path / "qa.npy")!r}, np.asarray(nnx.to_pure_dict(tr["lora"])["layers"]["q"]["lora_a"]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    trained = restore_run(tmp_path, load_model(base, with_tokenizer=False))
    assert trained.step == 3
    np.testing.assert_array_equal(np.asarray(nnx.to_pure_dict(trained.model.state)["layers"]["q"]["lora_a"]),
                                  np.load(tmp_path / "qa.npy"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="psynth export")
    export_cli.add_arguments(parser)
    return export_cli.run(parser.parse_args(argv))


def test_export_cli_from_run_then_demo_loads_the_adapter(run_dir, tmp_path):
    base, run, saved_lora, saved_mapper = run_dir
    assert run_cli(["--run", str(run), "--out", str(tmp_path)]) == 0
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                   "mapper.safetensors", "mapper_config.json", "psynth_export.json"}
    # the merged checkpoint = the backbone with the run's LoRA on, in transformers
    trained = restore_run(run, load_model(base, with_tokenizer=False))
    tokens = np.random.default_rng(0).integers(0, 211, (2, 12))
    diff = np.abs(torch_logits(transformers.AutoModelForCausalLM.from_pretrained(merged), tokens)
                  - jax_logits(trained.model, tokens, True)).max()
    assert diff <= 1e-4
    assert (merged / "tokenizer.json").is_file()
    # the adapter dir is what `psynth demo --adapter` reads
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, adapter)
    desc = loaded.description
    assert desc == (f"adapter: {adapter}, mapper per_head_affine (mapper.safetensors), LoRA r4/a8 on q,k,v,o, "
                    "handoff output_tokens/chat (recorded in psynth_export.json)")
    assert_same(lora_of(synth.model), saved_lora)
    assert_same(leaves(nnx.state(synth.mapper)), saved_mapper)


def test_export_cli_merges_an_adapter_dir(run_dir, tmp_path):
    base, run, _, _ = run_dir
    run_cli(["--run", str(run), "--out", str(tmp_path / "adapter"), "--adapter"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()  # one kind: straight into OUT
    run_cli(["--adapter-dir", str(tmp_path / "adapter"), "--model", str(base), "--out", str(tmp_path / "m"),
             "--merged"])
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    adapted = load_peft_adapter(load_model(base, with_tokenizer=False), tmp_path / "adapter")
    tokens = np.random.default_rng(1).integers(0, 211, (1, 12))
    merged = load_model(tmp_path / "m", with_tokenizer=False)
    assert np.abs(jax_logits(merged, tokens, False) - jax_logits(adapted, tokens, True)).max() <= 1e-4


def test_plain_peft_dir_without_mapper_gets_the_identity_mapper(run_dir, tmp_path):
    """A PEFT adapter with nothing else (no mapper, no record): identity mapper and kept handoff, said so."""
    base, run, _, _ = run_dir
    run_cli(["--run", str(run), "--out", str(tmp_path), "--adapter"])
    for name in ("mapper.safetensors", "mapper_config.json", "psynth_export.json"):
        (tmp_path / name).unlink()
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, tmp_path)
    assert "mapper: none in the adapter dir, identity" in loaded.description
    assert loaded.description.endswith("handoff output_tokens/chat (recorded in the adapter)")  # safetensors metadata
    assert not loaded.mapper_trained and loaded.lora_trained
    assert synth.mapper.kind == "affine_length"
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(synth.mapper))["net"]["w1"]))


def test_release_layout_adapter_with_cache_mapper_pt(run_dir, tmp_path):
    """PEFT files + the release's cache_mapper.pt (torch.save'd state dict) in one directory."""
    base, run, saved_lora, _ = run_dir
    run_cli(["--run", str(run), "--out", str(tmp_path), "--adapter"])
    for name in ("mapper.safetensors", "mapper_config.json", "psynth_export.json"):
        (tmp_path / name).unlink()
    ref = torch_release_mapper(tmp_path / "cache_mapper.pt")
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, tmp_path)
    desc = loaded.description
    assert desc.startswith(f"release checkpoint: {tmp_path}, mapper affine_length (cache_mapper.pt), "
                           "LoRA r4/a8 on q,k,v,o, handoff ")
    assert_same(lora_of(synth.model), saved_lora)
    np.testing.assert_array_equal(np.asarray(leaves(nnx.state(synth.mapper))["net"]["w0"]),
                                  ref.net[0].weight.detach().numpy().T)


def test_errors(run_dir, tmp_path):
    base, run, _, _ = run_dir
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--adapter-dir needs --model"):
        run_cli(["--adapter-dir", str(tmp_path / "peft"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # --run or --adapter-dir is required
        run_cli(["--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="neither a `psynth train` run directory"):
        with_adapter(synthesizer(base), tmp_path)
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoints/"):
        restore_run(tmp_path, load_model(base, with_tokenizer=False))
    # a run trained on another backbone: the error names both models and the tensors that differ
    other = tmp_path / "qwen3"
    hf_models.make_tiny("qwen3", False, other)
    with pytest.raises(AdapterError, match=r"trained on .*base\) does not fit .*qwen3 \(qwen3, 2 layers\): "
                                           r"lora/layers/k/lora_b/value: saved \(2, 4, 32\), needed \(2, 4, 48\)"):
        restore_run(run, load_model(other, with_tokenizer=False))


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--help"])
    assert e.value.code == 0
    assert "--adapter-dir" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "export", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--merged" in out
