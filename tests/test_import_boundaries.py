"""Inference must run on a box with only jax + flax + transformers (no torch, no training stack, no
HTTP stack: the serving engine, store and scheduler import without FastAPI / uvicorn).

The checks run once, in one fresh interpreter whose import system hides torch, optax, orbax,
grain, datasets and psynth_jax.{train,data,eval}: every meta-path finder is wrapped so that those names
are "not found", exactly as if they were not installed (`import torch` raises
ModuleNotFoundError and `importlib.util.find_spec("torch")` is None, which is what transformers
probes). The checkpoints are written beforehand by this (torch-enabled) process.

optax is special: flax itself declares optax (and orbax-checkpoint) as install requirements and
`flax.nnx` imports optax at import time, so any box with flax has it. The blocker therefore
imports `flax.nnx` first, then drops optax from `sys.modules` and hides it: psynth_jax (or
anything after flax) importing optax is still caught.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_models
import release_fixtures as rf
from psynth_jax.interop.embedded import default_gguf_path

BLOCKED = ("torch", "orbax", "grain", "datasets", "psynth_jax.train", "psynth_jax.data", "psynth_jax.eval",
           "fastapi", "uvicorn", "starlette")  # the HTTP stack is the `serve` extra: the engine runs without it
# + "optax" once flax.nnx is imported (see the module docstring)

BLOCKER = textwrap.dedent(f"""
    import sys
    BLOCKED = {BLOCKED!r}
    PROBED = []

    def _blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class _Hide:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if _blocked(name):
                PROBED.append(name)
                return None
            find = getattr(self._inner, "find_spec", None)
            return None if find is None else find(name, path, target)

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    # flax.nnx needs optax (a declared flax requirement); load it for flax, then hide it from the rest
    import flax.nnx  # noqa: F401
    for _m in [m for m in sys.modules if m == "optax" or m.startswith("optax.")]:
        del sys.modules[_m]
    BLOCKED = BLOCKED + ("optax",)
    PROBED.clear()

    def _report(**extra):
        import json
        leaked = sorted(m for m in sys.modules if _blocked(m) and sys.modules[m] is not None)
        print("RESULT " + json.dumps(dict(leaked=leaked, probed=sorted(set(PROBED)), **extra)))
""")


SECTIONS = textwrap.dedent("""
    import traceback
    RESULTS = {{}}

    def section(name):
        def wrap(fn):
            try:
                RESULTS[name] = dict(ok=True, **(fn() or {{}}))
            except BaseException:
                RESULTS[name] = dict(ok=False, error=traceback.format_exc())
            return fn
        return wrap

    @section("inference")
    def _():
        import jax, jax.numpy as jnp
        import psynth_jax.model.transformer
        import psynth_jax.inference.generator
        import psynth_jax.interop.loader
        import psynth_jax.serve.engine, psynth_jax.serve.scheduler, psynth_jax.serve.service, psynth_jax.serve.store
        from psynth_jax.inference import runtime
        from psynth_jax.interop.loader import load_model
        from psynth_jax.model.loaded import random_model
        from psynth_jax.model.config import ModelConfig

        cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
        m = random_model(cfg)
        tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
        lengths = jnp.asarray([4, 2], jnp.int32)
        logits, cache = runtime.prefill(m.graphdef, m.state, tokens, lengths, num_slots=16)
        gen = runtime.generate(m.graphdef, m.state, tokens, lengths, jax.random.key(0), max_new_tokens=5,
                               num_slots=16)
        tiny = load_model({ckpt!r}, with_tokenizer=False)
        gen2 = runtime.generate(tiny.graphdef, tiny.state, tokens, lengths, jax.random.key(0),
                                max_new_tokens=5, num_slots=16)
        return dict(logits_shape=list(logits.shape), random=gen.tokens.tolist(), tiny=gen2.tokens.tolist(),
                    tiny_family=tiny.cfg.family, tiny_tokenizer=tiny.tokenizer is not None,
                    probed=sorted(set(PROBED)))

    @section("tokenizer_dir")
    def _():
        from psynth_jax.inference.generator import Generator
        from psynth_jax.interop.loader import load_model
        from psynth_jax.cli.main import main

        gen = Generator(load_model({ckpt!r}))
        ids = gen.chat_tokens([{{"role": "user", "content": "w7 w8"}}])
        (out,) = gen.complete([[{{"role": "user", "content": "w7 w8"}}]], max_new_tokens=4)
        rc = main(["generate", "w7 w8", "--model", {ckpt!r}, "--max-new-tokens", "4"])
        return dict(ids=ids, text=out.text, rc=rc)

    @section("release_interop")
    def _():
        from psynth_jax.interop.importer import import_weights, with_adapter
        from psynth_jax.interop.loader import load_model
        from psynth_jax.interop.release import export_release
        from psynth_jax.model.transformer import LoRAConfig
        from psynth_jax.synthesis.pipeline import ParallelSynthesis

        synth = ParallelSynthesis(load_model({release_base!r}, lora=LoRAConfig()))
        synth, loaded = with_adapter(synth, {release!r})
        imp = import_weights({release!r}, load_model({release_base!r}))
        warning = export_release(imp.model, imp.mapper, {release_out!r}, handoff=imp.handoff,
                                 embeddings=imp.embeddings)
        return dict(description=loaded.description, vocab=synth.cfg.vocab_size, warning=warning)

    @section("gguf_weights")
    def _():
        from psynth_jax.interop.sources import open_source
        from psynth_jax.model.config import ModelConfig

        src = open_source({gguf!r})
        cfg = ModelConfig.from_hf(src.config_dict())
        w = src.read("model.layers.0.self_attn.q_proj.weight")
        return dict(layers=cfg.num_layers, shape=list(w.shape))

    @section("gguf_tokenizer")
    def _():
        from psynth_jax.interop.tokenizer import load_tokenizer

        return dict(ids=load_tokenizer({gguf!r}).encode("hello"))

    _report(**RESULTS)
""")


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """Run every check once in one torch-free interpreter (one start-up instead of four)."""
    d = tmp_path_factory.mktemp("tiny_qwen3")
    hf_models.make_tiny("qwen3", False, d)
    hf_models.save_tiny_tokenizer(d)
    rel = tmp_path_factory.mktemp("release")  # a release checkpoint, written here with torch + PEFT
    rf.published_layout(rf.write_release_run(rf.make_base(rel / "base"), rel / "run"), rel / "published")
    script = BLOCKER + SECTIONS.format(ckpt=str(d), gguf=str(default_gguf_path()), release_base=str(rel / "base"),
                                       release=str(rel / "published"), release_out=str(rel / "exported"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return dict(json.loads(line[len("RESULT "):]), release_dir=rel)


def _section(result: dict, name: str) -> dict:
    r = result[name]
    assert r["ok"], f"{name} failed without torch:\n{r['error']}"
    return r


def test_no_blocked_module_was_imported(no_torch):
    assert no_torch["leaked"] == []


def test_inference_without_torch_or_training_stack(no_torch):
    r = _section(no_torch, "inference")
    assert r["logits_shape"] == [2, 97]
    assert len(r["random"]) == 2 and len(r["random"][0]) == 5
    assert r["tiny_family"] == "qwen3" and not r["tiny_tokenizer"]
    assert len(r["tiny"]) == 2 and len(r["tiny"][0]) == 5
    print(f"\n[imports] hidden modules probed (find_spec) during inference: {r['probed']}")


def test_tokenizer_and_cli_from_checkpoint_dir_without_torch(no_torch):
    """transformers' tokenizer stack itself does not need torch (tokenizer.json checkpoints)."""
    r = _section(no_torch, "tokenizer_dir")
    assert r["ids"] == [1, 4, 7, 8, 2, 1, 5]
    assert r["rc"] == 0


def test_release_checkpoint_in_and_out_without_torch(no_torch):
    """The release's cache_mapper.pt is read, and written again, by a process that cannot import torch."""
    import torch

    r = _section(no_torch, "release_interop")
    assert r["vocab"] == rf.TOKENIZER_VOCAB and r["warning"] is None
    assert r["description"].endswith("handoff release/eos_only (selected for a release checkpoint)")
    rel = no_torch["release_dir"]
    want, got = torch.load(rel / "published" / "cache_mapper.pt"), torch.load(rel / "exported" / "cache_mapper.pt")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_gguf_weights_without_torch(no_torch):
    """The `gguf` package dequantizes with numpy: the embedded model's weights load without torch."""
    r = _section(no_torch, "gguf_weights")
    assert r["layers"] == 30 and r["shape"] == [576, 576]


def test_gguf_tokenizer_without_torch(no_torch):
    """transformers' own GGUF tokenizer route imports torch (its GGUF reader); psynth_jax reads the
    metadata with the `gguf` package instead, so the embedded default model's tokenizer and chat
    template load on a box without torch."""
    r = no_torch["gguf_tokenizer"]
    assert r["ok"], r.get("error")
    assert r["ids"]
