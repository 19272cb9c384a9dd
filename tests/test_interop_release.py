"""The reference release's checkpoint in, our weights out in its layout (issue #15).

Fixtures (release_fixtures.py) write release-layout folders with torch + PEFT exactly as the
release's training CLI does, on a tiny Qwen3 whose adapter carries embed_tokens / lm_head at the
tokenizer's 200 tokens against the config's 211. Checked against the real references:

- every way of pointing at the folder (root, latest/, step_checkpoints/latest/, judger_lora/)
  loads the same weights, through `with_adapter`, the eval config's `adapter:`, `psynth
  export --adapter-dir` and `psynth demo --adapter`, and selects the release's handoff;
- the imported backbone's logits equal what the release builds in PyTorch
  (`resize_token_embeddings` + `PeftModel.from_pretrained`), adapter on and off;
- release -> import -> `export --format release` -> import: identical weights and identical
  cache-path logits; the export loads with `torch.load` + a strict state-dict load and with
  `PeftModel.from_pretrained`;
- the mapper's metadata_features / hidden_dim variants, and every bad folder, with its message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_models
import release_fixtures as rf
from psynth_jax.cli import export as export_cli
from psynth_jax.inference import runtime
from psynth_jax.interop.adapter import AdapterError, load_mapper, load_peft_adapter
from psynth_jax.interop.export import export_adapter
from psynth_jax.interop.importer import with_adapter
from psynth_jax.interop.layout import LayoutError
from psynth_jax.interop.loader import load_model
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis import core
from psynth_jax.synthesis.mapper import mapper_features
from psynth_jax.synthesis.pipeline import ParallelSynthesis

REPO = Path(__file__).resolve().parents[1]
RELEASE = Handoff(convention="release", stop_tokens="eos_only")
TOKENS = np.random.default_rng(0).integers(6, rf.TOKENIZER_VOCAB, (2, 10))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(base model dir, release training run dir, its step checkpoint, the published layout)."""
    root = tmp_path_factory.mktemp("release")
    base = rf.make_base(root / "base")
    run = root / "run"
    ckpt = rf.write_release_run(base, run, seed=1)
    published = rf.published_layout(ckpt, root / "published")
    return base, run, ckpt, published


def synthesizer(base: Path) -> ParallelSynthesis:
    """What `psynth demo` builds: the default LoRA (r16/a32 with B = 0), an identity mapper."""
    return ParallelSynthesis(load_model(base, lora=LoRAConfig()))


def leaves(tree) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


def weights_of(synth: ParallelSynthesis) -> dict:
    """Everything an import sets: LoRA leaves, embedding, LM head, mapper."""
    pure = leaves(synth.model.state)
    lora = {t: {k: v for k, v in node.items() if k.startswith("lora")} for t, node in pure["layers"].items()
            if "lora_a" in node}
    return {"lora": lora, "embed": pure["embed"], "lm_head": pure.get("lm_head"),
            "mapper": leaves(nnx.state(synth.mapper))}


def prefill_logits(model: LoadedModel, lora: bool) -> np.ndarray:
    b, t = TOKENS.shape
    out, _ = runtime.prefill(model.graphdef, model.state, jnp.asarray(TOKENS, jnp.int32),
                             jnp.full((b,), t, jnp.int32), num_slots=t, output="all", lora=lora)
    return np.asarray(out)


def jax_logits(synth: ParallelSynthesis, lora: bool) -> np.ndarray:
    return prefill_logits(synth.model, lora)


def cache_logits(synth: ParallelSynthesis) -> np.ndarray:
    """First-step logits of the cache path for fixed branches and prompt (mapper + LoRA on)."""
    prefixes = [[[7, 8, 9], [10, 11, 12, 13]]]
    outputs = [[[20, 21, 22, 23, 24], [30, 31, 32]]]
    branches = synth.branches_from_tokens(prefixes, outputs)
    cache, _ = core.jit_prepare(branches, synth.mapper_def, synth.mapper_state, cfg=synth.cfg, extra_slots=64)
    prompt = jnp.asarray([[40, 41, 42, 43]], jnp.int32)
    logits, _ = runtime.extend(synth.model.graphdef, synth.model.state, prompt, jnp.asarray([4]), cache, lora=True)
    return np.asarray(logits)


def run_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="psynth export")
    export_cli.add_arguments(parser)
    return export_cli.run(parser.parse_args(argv))


# ---------------------------------------------------------------------------- import
@pytest.fixture(scope="module")
def imported(release):
    """The published layout loaded into a synthesizer (the reference every other pointing must equal)."""
    base, _, _, published = release
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, published)
    return synth, loaded


def test_release_folder_loads_with_the_release_handoff_and_vocabulary(release, imported):
    _, _, ckpt, published = release
    synth, loaded = imported
    assert loaded.description == (
        f"release checkpoint: {published}, mapper affine_length (cache_mapper.pt), LoRA r4/a8 on q,k,v,o "
        "(judger_lora/), vocabulary aligned to the adapter: 211 -> 200 tokens (embed_tokens+lm_head from the "
        "adapter, as the release's align_model_vocab_to_adapter), handoff release/eos_only (selected for a "
        "release checkpoint)")
    assert synth.handoff == RELEASE and loaded.mapper_trained and loaded.lora_trained
    assert synth.cfg.vocab_size == synth.model.cfg.vocab_size == 200 and synth.gen.model is synth.model
    # the mapper is torch's, the embedding rows are the adapter's (not the base's first 200)
    ref = torch.load(ckpt / "cache_mapper.pt")
    np.testing.assert_array_equal(weights_of(synth)["mapper"]["net"]["w0"], ref["net.0.weight"].numpy().T)
    from safetensors.numpy import load_file

    saved = load_file(str(ckpt / "judger_lora" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(weights_of(synth)["embed"], saved["base_model.model.model.embed_tokens.weight"])
    np.testing.assert_array_equal(weights_of(synth)["lm_head"], saved["base_model.model.lm_head.weight"].T)
    np.testing.assert_array_equal(weights_of(synth)["lora"]["q"]["lora_a"][1],
                                  saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].T)


@pytest.mark.parametrize("where", ["run", "latest", "step", "judger_lora"])
def test_every_pointing_at_the_folder_loads_the_same(release, imported, where, tmp_path):
    base, run, ckpt, _ = release
    if where == "latest":  # RUN/latest/ (a final save) instead of step_checkpoints/latest/
        shutil.copytree(ckpt, tmp_path / "latest")
    path, shown = {
        "run": (run, f"{ckpt} (step_checkpoints/latest/ of {run})"),
        "latest": (tmp_path, f"{tmp_path / 'latest'} (latest/ of {tmp_path})"),
        "step": (ckpt, f"{ckpt}"),
        "judger_lora": (ckpt / "judger_lora", f"{ckpt} (given its judger_lora/)"),
    }[where]
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, path)
    desc = loaded.description
    assert desc.startswith(f"release checkpoint: {shown} step 95, mapper affine_length (cache_mapper.pt), ")
    assert desc.endswith("(selected for a release checkpoint)")
    jax.tree.map(np.testing.assert_array_equal, weights_of(synth), weights_of(imported[0]))


def test_imported_backbone_equals_the_releases_pytorch_model(release, imported):
    """align_model_vocab_to_adapter + PeftModel.from_pretrained, adapter on (synthesizer) and off (workers)."""
    base, _, ckpt, _ = release
    synth = imported[0]
    ref = rf.torch_release_model(base, ckpt / "judger_lora")
    ids = torch.from_numpy(TOKENS.astype(np.int64))
    with torch.no_grad():
        on = ref(ids).logits.numpy()
        with ref.disable_adapter():
            off = ref(ids).logits.numpy()
    assert on.shape[-1] == 200
    assert np.abs(jax_logits(synth, True) - on).max() <= 1e-4
    assert np.abs(jax_logits(synth, False) - off).max() <= 1e-4
    assert np.abs(on - off).max() > 1e-2  # the LoRA acts


@pytest.mark.parametrize("family, tie", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_vocabulary_alignment_matches_the_release_for_every_family(family, tie, tmp_path):
    """A resized-vocabulary judger_lora of each family (tied heads: one shared matrix), imported and
    re-exported: logits equal the release's PyTorch model both ways, arrays survive the round trip."""
    base = tmp_path / "base"
    hf_models.make_tiny_sharp(family, tie, base, seed=5)
    hf_models.save_tiny_tokenizer(base, vocab_size=rf.TOKENIZER_VOCAB)
    rf.save_judger_lora(base, tmp_path / "judger_lora", seed=1)
    model = load_peft_adapter(load_model(base), tmp_path / "judger_lora")
    assert model.cfg.vocab_size == rf.TOKENIZER_VOCAB and model.cfg.tie_word_embeddings == tie
    ref = rf.torch_release_model(base, tmp_path / "judger_lora")
    for lora in (True, False):
        with torch.no_grad(), (contextlib.nullcontext() if lora else ref.disable_adapter()):
            want = ref(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
        assert np.abs(prefill_logits(model, lora) - want).max() <= 1e-4
    out = export_adapter(model, None, tmp_path / "exported", embeddings=True)
    again = load_peft_adapter(load_model(base), out)
    jax.tree.map(np.testing.assert_array_equal, leaves(again.state), leaves(model.state))
    with torch.no_grad():
        want = rf.torch_release_model(base, out)(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    assert np.abs(prefill_logits(again, True) - want).max() <= 1e-4


def test_eval_config_adapter_loads_a_release_folder(release, tmp_path):
    from psynth_jax.config.eval_schema import load_eval_config
    from psynth_jax.eval.runner import EvalRunner

    base, run, _, _ = release
    model = load_model(base, lora=LoRAConfig())
    for section, want in [("", RELEASE), ("handoff: {convention: output_tokens}\n",
                                          Handoff(convention="output_tokens", stop_tokens="chat"))]:
        out = tmp_path / f"run{len(section)}"
        path = tmp_path / f"eval{len(section)}.yaml"
        path.write_text(f"tasks: [{{name: gsm8k, limit: 1}}]\nworker_tokens: 32\nmax_new_tokens: 32\nadapter: {run}\n"
                        f"{section}out_dir: {out}\n")  # within the tiny model's 512 positions
        cfg = load_eval_config(path)
        runner = EvalRunner(cfg, model=model, quiet=True)
        runner._ensure_synth()
        assert runner.synth.handoff == want  # a `handoff:` section is an explicit choice and wins
        weights = json.loads((out / "weights.json").read_text())
        assert weights["handoff"] == want.as_dict() and weights["mapper_trained"] and weights["lora_trained"]
        assert "vocabulary aligned to the adapter: 211 -> 200" in weights["description"]
        model = load_model(base, lora=LoRAConfig())  # the runner aligned this one's vocabulary in place


def test_explicit_handoff_wins_and_says_what_was_recorded(release):
    base, _, _, published = release
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, published, convention="output_tokens")
    desc = loaded.description
    assert synth.handoff == Handoff(convention="output_tokens", stop_tokens="eos_only")
    assert desc.endswith("handoff output_tokens/eos_only (your choice; the weights were trained under "
                         "release/eos_only)")


# --------------------------------------------------------------------- round trips
def test_release_round_trip_through_the_release_format(release, imported, tmp_path):
    """release layout -> import -> export --format release -> import: identical weights and logits."""
    base, _, _, published = release
    out = tmp_path / "exported"
    assert run_export(["--adapter-dir", str(published), "--model", str(base), "--format", "release",
                       "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"cache_mapper.pt", "cache_mapper_config.json", "judger_lora",
                                               "psynth_export.json"}  # no run_args.json, no warning note
    assert json.loads((out / "cache_mapper_config.json").read_text()) == {"hidden_dim": 32, "metadata_features": "both"}
    record = json.loads((out / "psynth_export.json").read_text())
    assert record["format"] == "release" and record["handoff"] == RELEASE.as_dict()
    assert record["embeddings_vocab"] == 200
    # PyTorch loads it the release's way
    state = torch.load(out / "cache_mapper.pt")
    assert list(state) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    rf.CacheMapper().load_state_dict(state, strict=True)
    torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4)).load_state_dict(
        {k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    ref = rf.torch_release_model(base, out / "judger_lora")
    with torch.no_grad():
        on = ref(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    assert np.abs(jax_logits(imported[0], True) - on).max() <= 1e-4
    # and back in: the same weights, the same cache-path logits (under the same handoff)
    again = synthesizer(base)
    again, loaded = with_adapter(again, out)
    desc = loaded.description
    assert desc.endswith("handoff release/eos_only (recorded in psynth_export.json)")
    jax.tree.map(np.testing.assert_array_equal, weights_of(again), weights_of(imported[0]))
    assert again.handoff == imported[0].handoff
    np.testing.assert_array_equal(cache_logits(again), cache_logits(imported[0]))


def test_release_round_trip_through_the_psynth_format(release, imported, tmp_path):
    base, _, _, published = release
    out = tmp_path / "adapter"
    run_export(["--adapter-dir", str(published), "--model", str(base), "--adapter", "--out", str(out)])
    assert json.loads((out / "psynth_export.json").read_text())["handoff"] == RELEASE.as_dict()
    again = synthesizer(base)
    again, loaded = with_adapter(again, out)
    assert loaded.description.endswith("handoff release/eos_only (recorded in psynth_export.json)")
    jax.tree.map(np.testing.assert_array_equal, weights_of(again), weights_of(imported[0]))
    np.testing.assert_array_equal(cache_logits(again), cache_logits(imported[0]))


def test_export_model_defaults_to_the_release_run_args_model_name(release, tmp_path, capsys):
    base, run, _, _ = release
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "run_args.json").write_text(json.dumps(rf.run_args(base, model_name=str(base))))
    meta = copy / "step_checkpoints" / "latest" / "checkpoint_meta.json"  # run_args.json is found through it
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "source_run_dir": str(copy)}))
    assert run_export(["--adapter-dir", str(copy), "--format", "release", "--out", str(tmp_path / "o")]) == 0
    assert f"loading {base} (float32)" in capsys.readouterr().err
    assert (tmp_path / "o" / "cache_mapper.pt").is_file()


# ---------------------------------------------------------------- mapper variants
@pytest.mark.parametrize("features, inputs, hidden, config", [
    ("length", 2, 32, True), ("num_agents", 2, 16, True), ("none", 1, 32, False), ("both", 3, 64, False)])
def test_mapper_variants_match_torch(features, inputs, hidden, config, tmp_path):
    """The release's LengthAwareAffineKVMapper ablations: inputs [length?, num_agents?, layer]."""
    ref = rf.trained_mapper(3, inputs=inputs, hidden=hidden)
    torch.save(ref.state_dict(), tmp_path / "cache_mapper.pt")
    if config:
        (tmp_path / "cache_mapper_config.json").write_text(json.dumps({"hidden_dim": hidden,
                                                                       "metadata_features": features}))
    mapper = load_mapper(tmp_path, num_kv_heads=2)
    assert (mapper.kind, mapper.metadata_features) == ("affine_length", features)
    feats = np.asarray(mapper_features(jnp.asarray([[1, 7, 40]]), 3, 4))  # [layers, 1, K, 3]
    cols = {"both": [0, 1, 2], "length": [0, 2], "num_agents": [1, 2], "none": [2]}[features]
    with torch.no_grad():
        raw = ref.net(torch.from_numpy(feats[..., cols])).numpy()
    scales = [np.asarray(x)[..., 0] for x in mapper.scales(jnp.asarray(feats))]  # alpha_k, beta_k, alpha_v, beta_v
    want = [1 + 0.1 * np.tanh(raw[..., 0]), 0.1 * np.tanh(raw[..., 1]), 1 + 0.1 * np.tanh(raw[..., 2]),
            0.1 * np.tanh(raw[..., 3])]
    for got, ref_scale in zip(scales, want, strict=True):
        np.testing.assert_allclose(got, ref_scale, rtol=1e-5, atol=1e-6)


def test_mapper_variant_settings_come_from_run_args_without_the_config_file(release, tmp_path):
    base, _, _, _ = release
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(rf.trained_mapper(4, inputs=2).state_dict(), ckpt / "cache_mapper.pt")
    shutil.copytree(release[2] / "judger_lora", ckpt / "judger_lora")
    synth = synthesizer(base)
    with pytest.raises(AdapterError, match="takes 2 inputs: metadata_features 'length' or 'num_agents'; which one"):
        synth, _ = with_adapter(synth, ckpt)
    (ckpt / "run_args.json").write_text(json.dumps(rf.run_args(base, parallel_kv_mapper_metadata_features="num_agents")))
    synth, loaded = with_adapter(synth, ckpt)
    assert "mapper affine_length (metadata_features num_agents) (cache_mapper.pt)" in loaded.description


# ------------------------------------------------------------------------ bad input
def copy_ckpt(release, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release[2], tmp_path / "ckpt"))


@pytest.fixture
def fresh(release):
    synth = synthesizer(release[0])
    return synth, weights_of(synth)


def test_bad_folders_name_the_file_and_load_nothing(release, fresh, tmp_path):
    synth, before = fresh
    base = release[0]
    cases = []

    def case(name, error, match):
        d = Path(shutil.copytree(release[2], tmp_path / name))
        cases.append((d, error, match))
        return d

    d = case("no_lora", LayoutError, r"has no judger_lora/, but its records \(cache_mapper_config.json, .*run_args.json\) "
                                     "say a LoRA was trained")
    shutil.rmtree(d / "judger_lora")
    d = case("no_mapper", LayoutError, r"has no cache_mapper.pt, but its records \(cache_mapper_config.json")
    (d / "cache_mapper.pt").unlink()
    d = case("wide", AdapterError, r"cache_mapper.pt: net.2.weight has 8 outputs; the release's mapper has 4")
    torch.save(rf.trained_mapper(0, outputs=8).state_dict(), d / "cache_mapper.pt")
    d = case("hidden", AdapterError, r"cache_mapper.pt is 32 wide .* but its config says hidden 64")
    (d / "cache_mapper_config.json").write_text(json.dumps({"hidden_dim": 64, "metadata_features": "both"}))
    d = case("not_tensors", AdapterError, r"cache_mapper.pt: entry 'step' is a int, not a tensor")
    torch.save({**rf.trained_mapper(0).state_dict(), "step": 3}, d / "cache_mapper.pt")
    d = case("module", AdapterError, r"cache_mapper.pt: release_fixtures.CacheMapper: only state dicts of plain tensors")
    torch.save(rf.trained_mapper(0), d / "cache_mapper.pt")
    d = case("truncated_pt", AdapterError, r"cache_mapper.pt is not a torch.save zip archive \(truncated")
    (d / "cache_mapper.pt").write_bytes((d / "cache_mapper.pt").read_bytes()[:700])
    d = case("truncated_lora", AdapterError, r"cannot read .*judger_lora/adapter_model.safetensors \(truncated or "
                                             "corrupt safetensors file")
    w = d / "judger_lora" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    d = case("big_vocab", AdapterError, r"carries embeddings for a vocabulary of 230 tokens, larger than the model's 211")
    rf.save_judger_lora(base, d / "judger_lora", seed=2, vocab=230)
    d = case("small_vocab", AdapterError, r"carries embeddings for 150 tokens, fewer than the tokenizer's 200")
    rf.save_judger_lora(base, d / "judger_lora", seed=2, vocab=150)
    lone = tmp_path / "lone"
    shutil.copytree(release[2] / "judger_lora", lone / "judger_lora")
    cases.append((lone / "judger_lora", LayoutError,
                  r"is the LoRA of a release checkpoint, but .*lone has no cache_mapper.pt: the mapper would be dropped"))
    cases.append((tmp_path / "nowhere", FileNotFoundError, "does not exist"))
    (tmp_path / "file").write_text("x")
    cases.append((tmp_path / "file", LayoutError, "is a file; point at a directory"))
    for path, error, match in cases:
        handoff, cfg = synth.handoff, synth.model.cfg
        with pytest.raises(error, match=match):
            synth, _ = with_adapter(synth, path)
        jax.tree.map(np.testing.assert_array_equal, weights_of(synth), before)
        assert synth.handoff == handoff and synth.model.cfg == cfg == synth.cfg


def test_parts_a_folder_does_not_promise_load_and_are_named(release, tmp_path):
    """Without records saying otherwise, a LoRA-only or mapper-only checkpoint loads (as the
    release's --load_components auto does), and the description says what is missing."""
    base, _, ckpt, _ = release
    lora_only = tmp_path / "lora_only"
    shutil.copytree(ckpt / "judger_lora", lora_only / "judger_lora")
    synth = synthesizer(base)
    synth, loaded = with_adapter(synth, lora_only)
    assert "mapper: no cache_mapper.pt, identity" in loaded.description and not loaded.mapper_trained
    assert not np.asarray(weights_of(synth)["mapper"]["net"]["w1"]).any()  # the identity mapper
    mapper_only = tmp_path / "mapper_only"
    mapper_only.mkdir()
    shutil.copy2(ckpt / "cache_mapper.pt", mapper_only / "cache_mapper.pt")
    synth, loaded = with_adapter(synth, mapper_only)
    assert "LoRA: no judger_lora/, B = 0" in loaded.description and not loaded.lora_trained
    assert all(not v["lora_b"].any() for v in weights_of(synth)["lora"].values())
    assert synth.cfg.vocab_size == 200  # kept from the previous load: this folder carries no vocabulary


def test_demo_cli_loads_a_release_folder(release, tmp_path):
    base, run, _, _ = release
    out = subprocess.run(
        [sys.executable, "-m", "psynth_jax.cli.main", "demo", "--model", str(base), "--adapter", str(run),
         "--k", "1", "--worker-tokens", "2", "--max-new-tokens", "2"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("synthesizer weights:"))
    assert "release checkpoint:" in line and "step_checkpoints/latest/" in line
    assert line.endswith("handoff release/eos_only (selected for a release checkpoint)")
