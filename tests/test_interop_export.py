"""Export for PyTorch: merged checkpoints load in transformers, adapters load in PEFT, same logits.

Each case is a tiny random transformers checkpoint (tests/hf_models.py, attention sharpened) of
one family, loaded with a rank-4 LoRA whose A and B are set to random non-zero values, so the
adapter moves the logits by far more than the tolerance. Compared in float32:
  - the merged export (LoRA folded into W) through `AutoModelForCausalLM.from_pretrained`
    against psynth_jax with the LoRA on, and reloaded by psynth_jax's own loader (LoRA off);
  - the PEFT export through `peft.PeftModel.from_pretrained(base, dir)` with the adapter on
    (vs LoRA on) and disabled (vs LoRA off).
Measured max abs diffs are printed (pytest -s) and summarised at the end of the module.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import hf_models
from psynth_jax.inference import runtime
from psynth_jax.interop.export import export_adapter, export_merged, hf_config
from psynth_jax.interop.loader import load_model
from psynth_jax.model.loaded import LoadedModel, abstract_decoder
from psynth_jax.model.config import ModelConfig, RopeScaling
from psynth_jax.model.transformer import LORA_TARGETS, LoRAConfig

TOL = 1e-4
SEQ = 16
LORA = LoRAConfig(rank=4, alpha=8.0)
ALL_TARGETS = LoRAConfig(rank=4, alpha=8.0, targets=LORA_TARGETS)
# (family, tied, LoRA): every family, tied and untied for llama, gate/up/down targets once
CASES = [("llama", False, LORA), ("llama", True, LORA), ("llama3_rope", False, LORA), ("qwen2", False, LORA),
         ("qwen3", True, ALL_TARGETS)]
DIFFS: dict[str, dict[str, float]] = {}


def randomize_lora(model: LoadedModel, seed: int, std: float = 0.1) -> LoadedModel:
    """Set every LoRA A and B leaf of `model` to N(0, std) values (in place); return it."""
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(model.state)
    for node in pure["layers"].values():
        for leaf in ("lora_a", "lora_b"):
            if leaf in node:
                node[leaf] = jnp.asarray(rng.normal(0.0, std, node[leaf].shape), jnp.float32)
    nnx.replace_by_pure_dict(model.state, pure)
    return model


def fake_model(cfg: ModelConfig, lora: LoRAConfig | None = None, seed: int = 0) -> LoadedModel:
    """A decoder with N(0, 0.1) weights everywhere (LoRA B included), filled without a jitted init."""
    graphdef, state = abstract_decoder(cfg, jnp.float32, lora)
    rng = np.random.default_rng(seed)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32),
                                                 nnx.to_pure_dict(state)))
    return LoadedModel(cfg, graphdef, state, "float32", "fake", lora)


def jax_logits(model: LoadedModel, tokens: np.ndarray, lora: bool) -> np.ndarray:
    b, t = tokens.shape
    logits, _ = runtime.prefill(model.graphdef, model.state, jnp.asarray(tokens, jnp.int32),
                                jnp.full((b,), t, jnp.int32), num_slots=t, output="all", lora=lora)
    return np.asarray(logits)


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _name(case) -> str:
    fam, tie, lora = case
    return f"{fam}-{'tied' if tie else 'untied'}" + ("-mlp" if "gate" in lora.targets else "")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if DIFFS:
        lines = ["", f"export parity (max abs logit diff, float32; tolerance {TOL:.0e}):",
                 f"  {'case':<22} {'merged':>9} {'reload':>9} {'peft on':>9} {'peft off':>9} {'LoRA effect':>12}"]
        for name, r in DIFFS.items():
            lines.append(f"  {name:<22} " + " ".join(f"{r.get(k, float('nan')):>9.2e}" for k in
                                                     ("merged", "reload", "peft_on", "peft_off"))
                         + f" {r.get('effect', float('nan')):>12.3f}")
        print("\n".join(lines))


@pytest.fixture(scope="module", params=CASES, ids=[_name(c) for c in CASES])
def case(request, tmp_path_factory):
    fam, tie, lora = request.param
    d = tmp_path_factory.mktemp(_name(request.param))
    hf_models.make_tiny_sharp(fam, tie, d / "base", seed=2)
    model = randomize_lora(load_model(d / "base", lora=lora, with_tokenizer=False), CASES.index(request.param))
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, SEQ))
    on, off = jax_logits(model, tokens, True), jax_logits(model, tokens, False)
    effect = float(np.abs(on - off).max())
    assert effect > 100 * TOL, "the random LoRA must move the logits measurably"
    DIFFS.setdefault(_name(request.param), {})["effect"] = effect
    return _name(request.param), d, model, tokens, on, off


def test_merged_export_loads_in_transformers(case):
    name, d, model, tokens, on, _ = case
    out = export_merged(model, d / "merged")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == hf_config(model.cfg, "float32")["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.tie_word_embeddings == model.cfg.tie_word_embeddings
    diff = float(np.abs(torch_logits(hf, tokens) - on).max())
    DIFFS[name]["merged"] = diff
    print(f"\n[export] {name} merged vs transformers: max abs diff {diff:.2e}")
    assert diff <= TOL

    reloaded = load_model(out, with_tokenizer=False)  # psynth_jax's own loader, no LoRA
    assert reloaded.cfg == model.cfg
    diff = float(np.abs(jax_logits(reloaded, tokens, False) - on).max())
    DIFFS[name]["reload"] = diff
    assert diff <= TOL


def test_peft_adapter_loads_in_peft(case):
    name, d, model, tokens, on, off = case
    out = export_adapter(model, None, d / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "base")
    wrapped = peft.PeftModel.from_pretrained(base, out)
    diff_on = float(np.abs(torch_logits(wrapped, tokens) - on).max())
    with wrapped.disable_adapter():
        diff_off = float(np.abs(torch_logits(wrapped, tokens) - off).max())
    DIFFS[name].update(peft_on=diff_on, peft_off=diff_off)
    print(f"\n[export] {name} PEFT adapter on: {diff_on:.2e}, disabled: {diff_off:.2e}")
    assert diff_on <= TOL and diff_off <= TOL
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.0
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["target_modules"] == [f"{t}_proj" for t in model.lora.targets]
    with safe_open(str(out / "adapter_model.safetensors"), "numpy") as f:
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    assert a.shape == (4, model.cfg.hidden_size) and a.dtype == np.float32
    assert b.shape == (model.cfg.num_heads * model.cfg.head_dim, 4)


@pytest.mark.parametrize("cfg", [
    ModelConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_scaling=RopeScaling(rope_type="linear", factor=2.0),
                attention_bias=True, o_bias=True, bos_token_id=1, eos_token_ids=(2, 3)),
    ModelConfig(family="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=1, head_dim=12, qk_norm=True, tie_word_embeddings=True, eos_token_ids=(7,),
                rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=64)),
    ModelConfig(family="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=4, head_dim=8, attention_bias=True),
], ids=["llama-linear-rope-bias", "qwen3-llama3-rope", "qwen2"])
def test_hf_config_round_trips(cfg):
    c = hf_config(cfg, "bfloat16")
    assert ModelConfig.from_hf(c) == cfg
    # and transformers reads the same shapes back
    tc = transformers.AutoConfig.for_model(**c)
    assert (tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim) == (cfg.num_layers, cfg.num_kv_heads,
                                                                           cfg.head_dim)
    assert ModelConfig.from_hf(tc.to_dict()) == cfg


def test_llama_attention_bias_export_includes_o_bias(tmp_path):
    """transformers' Llama puts a bias on o_proj too when attention_bias is set; so do we."""
    cfg = ModelConfig(family="llama", vocab_size=60, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, o_bias=True)
    model = fake_model(cfg, lora=LORA, seed=3)  # q/k/v/o biases random too
    rng = np.random.default_rng(1)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(export_merged(model, tmp_path),
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = np.asarray(nnx.to_pure_dict(model.state)["layers"]["o"]["bias"][0])
    np.testing.assert_array_equal(hf.model.layers[0].self_attn.o_proj.bias.detach().numpy(), ours)
    assert np.abs(ours).max() > 0
    tokens = rng.integers(0, 60, (2, SEQ))
    assert np.abs(torch_logits(hf, tokens) - jax_logits(model, tokens, True)).max() <= TOL


def test_sharded_merged_export(tmp_path):
    hf_models.make_tiny("qwen3", False, tmp_path / "base")
    model = randomize_lora(load_model(tmp_path / "base", lora=LORA, with_tokenizer=False), seed=5)
    out = export_merged(model, tmp_path / "merged", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    tokens = np.random.default_rng(1).integers(0, 211, (1, SEQ))
    on = jax_logits(model, tokens, True)
    assert np.abs(torch_logits(transformers.AutoModelForCausalLM.from_pretrained(out), tokens) - on).max() <= TOL
    assert np.abs(jax_logits(load_model(out, with_tokenizer=False), tokens, False) - on).max() <= TOL
    # exporting again unsharded replaces the shards instead of leaving a mixed directory
    export_merged(model, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bfloat16_merged_export(tmp_path):
    hf_models.make_tiny("llama", True, tmp_path / "base")
    model = randomize_lora(load_model(tmp_path / "base", dtype="bfloat16", lora=LORA, with_tokenizer=False), 6)
    out = export_merged(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert str(f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype) == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    reloaded = load_model(out, dtype="bfloat16", with_tokenizer=False)
    assert reloaded.cfg == model.cfg


def test_merged_export_writes_tokenizer_and_generation_config(tmp_path):
    hf_models.make_tiny("qwen2", False, tmp_path / "base")
    hf_models.save_tiny_tokenizer(tmp_path / "base")
    model = load_model(tmp_path / "base", lora=LORA)
    out = export_merged(model, tmp_path / "merged")
    source_tok = model.tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "w7 w8 w9"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.encode(text) == source_tok.encode(text)
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (tmp_path / "base" / "generation_config.json").read_text())
    # an explicitly passed tokenizer wins; none at all writes no tokenizer files
    bare = load_model(tmp_path / "base", lora=LORA, with_tokenizer=False)
    out2 = export_merged(bare, tmp_path / "bare")
    assert not list(out2.glob("tokenizer*"))
    assert (export_merged(bare, tmp_path / "given", tokenizer=source_tok) / "tokenizer.json").is_file()
