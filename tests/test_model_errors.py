"""Clear errors for unsupported models, bad checkpoints, bad arguments and mismatched caches."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors import safe_open

import hf_models
from psynth_jax.inference.generator import Generator
from psynth_jax.interop.embedded import default_gguf_path
from psynth_jax.interop.loader import load_model
from psynth_jax.model.loaded import random_model
from psynth_jax.interop.sources import CheckpointError
from psynth_jax.model.config import ModelConfig, UnsupportedModelError
from psynth_jax.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny untied llama checkpoint with a tokenizer; tests copy it before damaging it."""
    d = tmp_path_factory.mktemp("tiny_llama")
    hf_models.make_tiny("llama", False, d)
    hf_models.save_tiny_tokenizer(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


# ----- unsupported architectures and options -----

def test_unknown_family_names_supported(ckpt, tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf(transformers.GPT2Config())
    msg = str(e.value)
    assert "gpt2" in msg and all(f in msg for f in ("llama", "qwen2", "qwen3"))

    d = _copy(ckpt, tmp_path / "gpt2")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize("key,params", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
])
def test_unsupported_rope_type(ckpt, tmp_path, key, params):
    d = _copy(ckpt, tmp_path / "rope")
    _edit_config(d, **{"rope_parameters": None, "rope_scaling": None, key: params})
    bad = params.get("rope_type", params.get("type"))
    with pytest.raises(UnsupportedModelError, match=rf"'{bad}'.*default, linear, llama3"):
        load_model(d, with_tokenizer=False)


def test_unsupported_options(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "mlp_bias")
    _edit_config(d, mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        load_model(d, with_tokenizer=False)


# ----- prompt checks -----

@pytest.fixture(scope="module")
def generator(ckpt):
    return Generator(load_model(ckpt))


def test_prompt_longer_than_max_length(generator):
    limit = generator.model.cfg.max_position_embeddings
    assert limit == 512
    with pytest.raises(ValueError, match=r"600 tokens.*maximum length of 512"):
        generator.generate_tokens([[7] * 600], max_new_tokens=4)
    # the prompt fits, prompt + new tokens does not; the message gives the sum
    with pytest.raises(ValueError, match=r"prompt 1 of 500 tokens \+ 20 new tokens = 520 exceeds .* 512"):
        generator.generate_tokens([[7] * 10, [7] * 500], max_new_tokens=20)


def test_empty_prompts(generator):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate_tokens([[7, 8], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        generator.generate_tokens([], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generator.generate_tokens([[7]], max_new_tokens=0)


def test_generator_needs_tokenizer(ckpt):
    with pytest.raises(ValueError, match="tokenizer"):
        Generator(load_model(ckpt, with_tokenizer=False))


# ----- damaged or mismatched checkpoints -----

def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere", with_tokenizer=False)


def test_missing_weight_file(ckpt, tmp_path):
    d = tmp_path / "no_weights"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as e:
        load_model(d, with_tokenizer=False)
    assert str(d) in str(e.value)


def test_missing_shard_listed_in_index(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "sharded")
    with safe_open(str(d / "model.safetensors"), "numpy") as f:
        names = list(f.keys())
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(d, with_tokenizer=False)


def test_truncated_weight_file(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "truncated")
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        load_model(d, with_tokenizer=False)


def _rewrite_tensors(d: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_tensor_with_wrong_shape(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "wrong_shape")
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(t):
        t[name] = np.zeros((t[name].shape[0] - 1, t[name].shape[1]), t[name].dtype)

    _rewrite_tensors(d, edit)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' has shape \(111, 64\), the config expects \(112, 64\)"):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj.weight", "lm_head.weight"])
def test_missing_tensor(ckpt, tmp_path, name):
    d = _copy(ckpt, tmp_path / "missing_tensor")
    _rewrite_tensors(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(repr(name))):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize("dtype", ["float64", "fp32", "bf16"])
def test_unknown_dtype(ckpt, dtype):
    with pytest.raises(ValueError, match=rf"unknown dtype '{dtype}'.*bfloat16.*float32"):
        load_model(ckpt, dtype=dtype, with_tokenizer=False)


def test_missing_gguf(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_model(path)


def test_truncated_gguf(tmp_path):
    """First 1 MB of the real GGUF: a CheckpointError naming the file, in a subprocess so a crash
    or a hang is reported as a failure rather than taking pytest down."""
    src = default_gguf_path()
    path = tmp_path / "truncated.gguf"
    with src.open("rb") as f:
        path.write_bytes(f.read(1 << 20))
    script = textwrap.dedent(f"""
        from psynth_jax.interop.loader import load_model
        from psynth_jax.interop.sources import CheckpointError
        try:
            load_model({str(path)!r})
        except CheckpointError as e:
            print("CheckpointError:", e)
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CheckpointError:"), proc.stdout + proc.stderr[-2000:]
    assert str(path) in proc.stdout


# ----- KV caches -----

def test_kv_cache_from_other_model_rejected():
    a = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
    cache = KVCache.zeros(a, batch=1, slots=8, dtype=jnp.float32)
    cache.check_compatible(a)  # its own model: fine
    for other in (dataclasses.replace(a, num_layers=3), dataclasses.replace(a, num_kv_heads=1),
                  dataclasses.replace(a, head_dim=16)):
        with pytest.raises(ValueError, match="does not match the model"):
            cache.check_compatible(other)
    # a model with the same cache shape but another width is compatible by construction
    cache.check_compatible(dataclasses.replace(a, hidden_size=64, intermediate_size=96))


def test_random_model_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=4, num_kv_heads=3, head_dim=8)
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="unknown dtype"):
        random_model(cfg, dtype="float16")
