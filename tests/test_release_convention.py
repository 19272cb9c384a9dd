"""The "release" handoff convention keeps exactly what the reference release's workers hand over.

The release decodes workers with HF `generate` (which never computes the KV of the last sampled
token) and keeps the last G cache positions, G = generated tokens with the stop token: positions
[P-1, P+G-1) of a branch whose prompt has P tokens. Our workers under `Handoff("release",
"eos_only")` must keep the same keys and values, for a branch that stopped on eos, one capped by
the token budget, and both decoded in one left-padded HF batch (each row's own window). The
references are transformers' PyTorch models of each family, greedy, from the same prompt ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transformers

from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.interop.loader import load_model
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from tiny_smol import make_tiny_smol

NEW = 6
PROMPTS = [[{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
           [{"role": "user", "content": "Name a prime number larger than ten."}]]


def hf_greedy(model, rows: list[list[int]], eos: int | None):
    """Left-padded batched greedy generate: (tokens per row, the cache keys/values per layer, pads);
    eos None: no stop token at all."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    gen = out.sequences[:, width:].tolist()
    cache = out.past_key_values
    keys = [layer.keys.numpy() for layer in cache.layers]  # [B, Hkv, T, D]
    values = [layer.values.numpy() for layer in cache.layers]
    return gen, keys, values, [width - len(r) for r in rows]


def generated(tokens: list[int], eos: int) -> list[int]:
    """A row's generated tokens up to and including its eos (HF pads the rest)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def check_against_generate(tmp_path, torch_model, rows: list[list[int]], eos: int) -> list[bool]:
    """Our release-convention workers with stop token `eos` vs HF generate on the same prompts
    (one left-padded batch): tokens, kept lengths and kept K/V; returns which branches stopped."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.tokenizer.eos_token_id == eos
    synth = ParallelSynthesis(model, handoff=Handoff("release", "eos_only"))
    assert synth.worker_stop_ids == (eos,)
    workers = synth.run_workers([PROMPTS], max_new_tokens=NEW, sampling=SamplingConfig())
    gen, keys, values, pads = hf_greedy(torch_model, rows, eos)
    k, v = np.asarray(workers.branches.k), np.asarray(workers.branches.v)
    kept = np.asarray(workers.branches.lengths)[0]
    stopped = workers.stopped[0]
    worst = 0.0
    for j, (row, pad) in enumerate(zip(rows, pads)):
        g = len(generated(gen[j], eos))
        assert stopped[j] == (eos in gen[j])
        assert workers.tokens[0][j] == generated(gen[j], eos)[: g - stopped[j]]  # the same greedy tokens
        assert kept[j] == g  # G tokens kept: the last prompt token + the first G - 1 generated
        p = len(row)
        window = slice(pad + p - 1, pad + p + g - 1)
        for layer in range(len(keys)):
            ref_k = keys[layer][j][:, window].transpose(1, 0, 2)  # [G, Hkv, D]
            ref_v = values[layer][j][:, window].transpose(1, 0, 2)
            worst = max(worst, float(np.abs(k[layer, 0, j, :g] - ref_k).max()),
                        float(np.abs(v[layer, 0, j, :g] - ref_v).max()))
    assert np.asarray(workers.branches.offsets)[0].tolist() == [len(r) for r in rows]  # keys move by -P
    print(f"stop token {eos}: stopped {stopped}, G = {kept.tolist()}, kept KV vs HF generate's cache "
          f"max abs diff {worst:.2e}")
    assert worst <= 1e-4
    return stopped


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_release_workers_keep_the_cache_generate_leaves(tmp_path, family):
    make_tiny_smol(tmp_path, family=family)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    probe = ParallelSynthesis(load_model(tmp_path))
    rows = [probe.gen.chat_tokens(p) for p in PROMPTS]
    (a, b), _, _, _ = hf_greedy(torch_model, rows, eos=None)
    # the first branch stops on a token it says 3rd or later (two prompt lengths: a padded batch) ...
    early = next((t for i, t in enumerate(a) if i >= 1 and t not in a[:i]), a[0])
    assert check_against_generate(tmp_path, torch_model, rows, early)[0]
    # ... and with a stop token neither says, both are capped at the token budget
    unused = next(t for t in range(1000, 2000) if t not in a and t not in b)
    assert check_against_generate(tmp_path, torch_model, rows, unused) == [False, False]
