"""Import of adapters and mappers: exact round trips, the release's cache_mapper.pt, clear errors.

- import(export(x)) == x bit for bit, for every LoRA leaf (into a model without a LoRA and into
  one with a different LoRA) and for both mapper kinds; the release kind is saved under exactly
  net.0.weight [32, 3], net.0.bias [32], net.2.weight [4, 32], net.2.bias [4];
- a cache_mapper.pt written by torch (the release's format) gives the same MLP outputs as torch,
  and is readable in a process where torch cannot be imported;
- adapters or mappers that do not fit the model fail with errors naming what does not fit.
Models here are random psynth_jax decoders (no torch involved on the model side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from psynth_jax.inference import runtime
from psynth_jax.interop.adapter import AdapterError, load_mapper, load_peft_adapter
from psynth_jax.interop.export import export_adapter, export_mapper
from psynth_jax.interop.torch_pickle import TorchFileError, read_torch_state_dict
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import LORA_TARGETS, LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper, mapper_features
from test_interop_export import fake_model

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=12, qk_norm=True)
LORA = LoRAConfig(rank=4, alpha=8.0)


def lora_leaves(model) -> dict:
    return {t: {k: np.asarray(v) for k, v in node.items() if k.startswith("lora")}
            for t, node in nnx.to_pure_dict(model.state)["layers"].items() if "lora_a" in node}


def randomized_mapper(kind: str, heads: int = 2, seed: int = 0):
    mapper = make_mapper(kind, heads, seed=seed)
    state = nnx.state(mapper)
    rng = np.random.default_rng(seed)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32),
                                                 nnx.to_pure_dict(state)))
    nnx.update(mapper, state)
    return mapper


def mapper_arrays(mapper) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mapper)))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An exported adapter (all seven targets, random A and B) and the model it came from."""
    model = fake_model(CFG, lora=dataclasses.replace(LORA, targets=LORA_TARGETS), seed=1)
    return export_adapter(model, None, tmp_path_factory.mktemp("adapter")), model


# ------------------------------------------------------------------------- round trips
def test_adapter_round_trip_is_exact(adapter):
    out, model = adapter
    for base_lora in (None, LoRAConfig()):  # no LoRA yet / a different one (r16 on q,k,v,o): rebuilt
        base = fake_model(CFG, lora=base_lora, seed=2)
        loaded = load_peft_adapter(base, out)
        assert loaded.lora == model.lora
        got, want = lora_leaves(loaded), lora_leaves(model)
        assert got.keys() == want.keys() == set(LORA_TARGETS)
        for t in want:
            for leaf in ("lora_a", "lora_b"):
                np.testing.assert_array_equal(got[t][leaf], want[t][leaf])
                assert got[t][leaf].dtype == np.float32
        base_kernel = nnx.to_pure_dict(base.state)["layers"]["q"]["kernel"]
        assert nnx.to_pure_dict(loaded.state)["layers"]["q"]["kernel"] is base_kernel  # backbone shared
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 8)), jnp.int32)

        def logits(m, lora):
            out, _ = runtime.prefill(m.graphdef, m.state, tokens, jnp.asarray([8]), num_slots=8, lora=lora)
            return np.asarray(out)

        np.testing.assert_array_equal(logits(loaded, False), logits(base, False))  # same backbone
        assert np.abs(logits(loaded, True) - logits(loaded, False)).max() > 1e-2  # the adapter acts


@pytest.mark.parametrize("kind", ["affine_length", "per_head_affine"])
def test_mapper_round_trip_is_exact(kind, tmp_path):
    mapper = randomized_mapper(kind, heads=2, seed=3)
    path = export_mapper(mapper, tmp_path)
    config = json.loads((tmp_path / "mapper_config.json").read_text())
    assert config == {"kind": kind, "hidden": 32, "metadata_features": "both",
                      "num_kv_heads": None if kind == "affine_length" else 2}
    shapes = {k: v.shape for k, v in load_file(str(path)).items()}
    n_out = 4 if kind == "affine_length" else 8
    assert shapes == {"net.0.weight": (32, 3), "net.0.bias": (32,), "net.2.weight": (n_out, 32), "net.2.bias": (n_out,)}
    for where in (tmp_path, path):  # the directory or the file itself
        loaded = load_mapper(where, num_kv_heads=2)
        assert loaded.kind == kind
        jax.tree.map(np.testing.assert_array_equal, mapper_arrays(loaded), mapper_arrays(mapper))


# ---------------------------------------------------------------- the release's mapper
def torch_release_mapper(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write the release's cache_mapper.pt (state dict of a module with `net` = the MLP) with torch."""
    torch.manual_seed(seed)

    class CacheMapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

    m = CacheMapper()
    with torch.no_grad():
        m.net[2].weight.normal_(0, 0.5)  # the release zero-initialises it; a trained one is not zero
        m.net[2].bias.normal_(0, 0.5)
    torch.save(m.state_dict(), path)
    return m


def test_release_cache_mapper_pt_matches_torch(tmp_path):
    path = tmp_path / "cache_mapper.pt"
    ref = torch_release_mapper(path)
    assert set(read_torch_state_dict(path)) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for where in (path, tmp_path):
        mapper = load_mapper(where, num_kv_heads=2)
        assert mapper.kind == "affine_length"
        feats = mapper_features(jnp.asarray([[1, 7, 40], [300, 2, 9]]), 3, 5)  # [layers, B, K, 3]
        with torch.no_grad():
            want = ref.net(torch.from_numpy(np.array(feats))).numpy()
        got = np.asarray(mapper.net(feats))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        ak, bk, av, bv = mapper.scales(feats)
        np.testing.assert_allclose(np.asarray(ak)[..., 0], 1 + 0.1 * np.tanh(want[..., 0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(bv)[..., 0], 0.1 * np.tanh(want[..., 3]), rtol=1e-5, atol=1e-6)


def test_release_mapper_reads_without_torch(tmp_path):
    path = tmp_path / "cache_mapper.pt"
    ref = torch_release_mapper(path, seed=4)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        import numpy as np
        from psynth_jax.interop.adapter import load_mapper
        from flax import nnx
        w = nnx.to_pure_dict(nnx.state(load_mapper({str(path)!r}, 2)))["net"]["w1"]
        np.save({str(tmp_path / "w1.npy")!r}, np.asarray(w))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "w1.npy"), ref.net[2].weight.detach().numpy().T)


def test_torch_reader_refuses_anything_but_a_state_dict(tmp_path):
    torch.save(torch.nn.Linear(3, 4), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(TorchFileError, match="only state dicts of plain tensors"):
        read_torch_state_dict(tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(TorchFileError, match="not a torch.save zip"):
        read_torch_state_dict(tmp_path / "junk.pt")


# ------------------------------------------------------------------------------ errors
def rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_adapter_with_other_rank_or_targets_than_expected(adapter, tmp_path):
    r8 = fake_model(CFG, lora=LoRAConfig(rank=8, alpha=16.0))
    out = export_adapter(r8, None, tmp_path / "r8")
    with pytest.raises(AdapterError, match=r"LoRA r8/a16 on q,k,v,o; expected LoRA r4/a8 on q,k,v,o"):
        load_peft_adapter(fake_model(CFG, seed=2), out, expect=LORA)
    with pytest.raises(AdapterError, match=r"on q,k,v,o,gate,up,down; expected LoRA r4/a8 on q,k,v,o"):
        load_peft_adapter(fake_model(CFG, seed=2), adapter[0], expect=LORA)
    assert load_peft_adapter(fake_model(CFG, seed=2), out, expect=LoRAConfig(rank=8, alpha=16.0)).lora.rank == 8


def test_tensor_with_wrong_shape_is_named(adapter, tmp_path):
    d = copy_adapter(adapter[0], tmp_path / "bad")
    name = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    rewrite(d / "adapter_model.safetensors", lambda t: t.__setitem__(name, np.zeros((20, 4), np.float32)))
    with pytest.raises(AdapterError, match=rf"{name}.*shape \(20, 4\), the model expects \(24, 4\)"):
        load_peft_adapter(fake_model(CFG), d)


def test_adapter_for_more_or_fewer_layers(tmp_path):
    three = fake_model(dataclasses.replace(CFG, num_layers=3), lora=LORA)
    out = export_adapter(three, None, tmp_path / "three")
    with pytest.raises(AdapterError, match="LoRA weights for 3 layers; the model .* has 2"):
        load_peft_adapter(fake_model(CFG), out)
    with pytest.raises(AdapterError, match="LoRA weights for 3 layers; the model .* has 4"):
        load_peft_adapter(fake_model(dataclasses.replace(CFG, num_layers=4)), out)


def test_adapter_from_another_family(tmp_path):
    llama = dataclasses.replace(CFG, family="llama", qk_norm=False)
    out = export_adapter(fake_model(llama, lora=LORA), None, tmp_path / "llama")
    with pytest.raises(AdapterError, match="exported from a llama model; this model is qwen3"):
        load_peft_adapter(fake_model(CFG), out)


def test_unknown_missing_and_unsupported_entries(adapter, tmp_path):
    d = copy_adapter(adapter[0], tmp_path / "extra")
    rewrite(d / "adapter_model.safetensors",
            lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", np.zeros((4, 32), np.float32)))
    with pytest.raises(AdapterError, match="unexpected tensors .*lm_head.lora_A"):
        load_peft_adapter(fake_model(CFG), d)

    d = copy_adapter(adapter[0], tmp_path / "missing")
    rewrite(d / "adapter_model.safetensors",
            lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"))
    with pytest.raises(AdapterError, match="lacks tensors .*layers.0.mlp.up_proj.lora_B"):
        load_peft_adapter(fake_model(CFG), d)

    d = copy_adapter(adapter[0], tmp_path / "dora")
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(AdapterError, match="unsupported LoRA options {'use_dora': True}"):
        load_peft_adapter(fake_model(CFG), d)
    (d / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj", "embed_tokens"])))
    with pytest.raises(AdapterError, match=r"target_modules \['embed_tokens'\] are not supported"):
        load_peft_adapter(fake_model(CFG), d)


def test_missing_files(adapter, tmp_path):
    d = copy_adapter(adapter[0], tmp_path / "no_config")
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*no_config"):
        load_peft_adapter(fake_model(CFG), d)
    d = copy_adapter(adapter[0], tmp_path / "no_weights")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_peft_adapter(fake_model(CFG), d)
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        load_peft_adapter(fake_model(CFG), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no mapper.safetensors or cache_mapper.pt"):
        load_mapper(adapter[0], 2)


def test_mapper_that_does_not_fit(tmp_path):
    export_mapper(randomized_mapper("per_head_affine", heads=2), tmp_path)
    with pytest.raises(AdapterError, match="per-head mapper for 2 KV heads; the model has 4"):
        load_mapper(tmp_path, num_kv_heads=4)
    (tmp_path / "mapper_config.json").unlink()  # no config: the output width decides, and does not fit
    with pytest.raises(AdapterError, match=r"outputs 8 values: neither the release's 4 nor 4 x 4"):
        load_mapper(tmp_path, num_kv_heads=4)
    assert load_mapper(tmp_path, num_kv_heads=2).kind == "per_head_affine"  # inferred from the width
    rewrite(tmp_path / "mapper.safetensors", lambda t: t.__setitem__("net.0.weight", np.zeros((32, 4), np.float32)))
    with pytest.raises(AdapterError, match=r"'net.0.weight' has shape \(32, 4\), expected \(32, 3\)"):
        load_mapper(tmp_path, num_kv_heads=2)
    rewrite(tmp_path / "mapper.safetensors", lambda t: t.__setitem__("mapper.scale", np.zeros(1, np.float32)))
    with pytest.raises(AdapterError, match="expected tensors .* found .*mapper.scale"):
        load_mapper(tmp_path, num_kv_heads=2)
