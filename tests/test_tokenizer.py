"""Our torch-free GGUF tokenizer equals transformers' own GGUF tokenizer on real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from psynth_jax.interop.embedded import default_gguf_path
from psynth_jax.inference.generator import stop_token_ids
from psynth_jax.interop.tokenizer import load_tokenizer

GSM8K = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"


@pytest.fixture(scope="module")
def pair():
    path = default_gguf_path()
    return load_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_chat_template_and_special_tokens_match(pair):
    ours, ref = pair
    msgs = [{"role": "system", "content": "You are X."},
            {"role": "user", "content": "Héllo wörld 12345\ttabs\n\ndef f(x): return x**2 <|im_end|>"}]
    a = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    b = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a == b
    assert ours.encode(a, add_special_tokens=False) == ref.encode(b, add_special_tokens=False)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    assert ours.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(ours)


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")
def test_real_questions_tokenize_identically(pair):
    ours, ref = pair
    questions = [json.loads(line)["question"] for line in GSM8K.open()][:300]
    assert all(ours.encode(q) == ref.encode(q) for q in questions)
    assert ours.decode(ours.encode(questions[0])) == questions[0]
