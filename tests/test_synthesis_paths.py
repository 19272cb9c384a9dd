"""The batched synthesis paths against independent references (transformers' PyTorch greedy
decoding), batch invariance, and the errors bad input gets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import transformers

from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.interop.loader import load_model
from psynth_jax.measure.ttft import time_to_first_token
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import prompts
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.synthesis.pipeline import ParallelSynthesis, PathResult, answer_kl, request_branches
from tiny_smol import make_tiny_smol

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 times 11?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = make_tiny_smol(tmp_path_factory.mktemp("tiny"))
    model = load_model(d, lora=LoRAConfig(rank=4, alpha=8.0))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    synth = ParallelSynthesis(model)
    convs = [[prompts.worker_messages(q)] * 2 for q in QUESTIONS]
    workers = synth.run_workers(convs, max_new_tokens=12, sampling=SamplingConfig(1.0, 0.9), seed=3)
    return synth, torch_model, workers


def torch_greedy(torch_model, tokenizer, messages, n):
    ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[0, 2])
    toks = out[0, len(ids):].tolist()
    return toks[:-1] if toks and toks[-1] in (0, 2) else toks


def test_workers_keep_output_tokens_only(setup):
    synth, _, w = setup
    lengths = np.asarray(w.branches.lengths)
    assert lengths.shape == (2, 2)
    assert all(lengths[b, i] == len(w.tokens[b][i]) for b in range(2) for i in range(2))
    assert int(np.asarray(w.branches.offsets).min()) > 10  # offsets = worker prompt lengths (dropped KV)


def test_text_path_equals_plain_greedy_decoding_of_the_concatenated_prompt(setup):
    synth, torch_model, w = setup
    res = synth.text_path(QUESTIONS, w.texts, max_new_tokens=10)
    for b, q in enumerate(QUESTIONS):
        msgs = prompts.text_synth_messages(q, w.texts[b])
        body = msgs[1]["content"]
        assert prompts.TEXT_HEADING in body
        for i, t in enumerate(w.texts[b]):
            assert f"[Sub-agent {i + 1}]:\n{t}" in body
        assert res.tokens[b] == torch_greedy(torch_model, synth.tok, msgs, 10)
    assert time_to_first_token(synth.text_steps(QUESTIONS, w.texts, max_new_tokens=10), 1).total_s > 0


def test_single_agent_equals_plain_greedy_decoding(setup):
    synth, torch_model, _ = setup
    res = synth.single_agent(QUESTIONS, max_new_tokens=10)
    for b, q in enumerate(QUESTIONS):
        assert res.tokens[b] == torch_greedy(torch_model, synth.tok, prompts.single_agent_messages(q), 10)


def test_cache_path_batched_equals_alone(setup):
    synth, _, w = setup
    both = synth.cache_path(QUESTIONS, w.branches, max_new_tokens=10)
    for b in range(2):
        one = synth.branches_from_tokens([[synth.gen.chat_tokens(prompts.worker_messages(QUESTIONS[b]))] * 2],
                                         [w.tokens[b]])
        alone = synth.cache_path([QUESTIONS[b]], one, max_new_tokens=10)
        assert alone.tokens[0] == both.tokens[b]
    ttft = time_to_first_token(synth.cache_steps(QUESTIONS, w.branches, max_new_tokens=10), 1)
    assert set(ttft.breakdown) == {"prepare_s", "prefill_s"} and ttft.total_s > 0
    assert both.prompt_tokens[0] < len(synth.gen.chat_tokens(prompts.text_synth_messages(QUESTIONS[0], w.texts[0])))


def torch_answer_logprobs(torch_model, tokenizer, messages, answer):
    """log_softmax of transformers' logits at the positions predicting each token of `answer`,
    teacher-forced after the chat prompt."""
    ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids + list(answer)])).logits[0].double()
    return torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(answer)], dim=-1).numpy()


def test_teacher_forced_kl_pieces_against_transformers(setup):
    """`eval --kl`'s pieces: the text side equals transformers' teacher-forced log-probabilities on
    [text prompt | answer]; answer_kl is the mean over positions of sum p_t (log p_t - log p_c);
    teacher_forced_kl over a batch equals the pieces per request, with each request's own caches
    (request_branches), equal to caches built for that request alone."""
    synth, torch_model, w = setup
    answers = synth.text_path(QUESTIONS, w.texts, max_new_tokens=6).tokens
    batched = synth.teacher_forced_kl(QUESTIONS, w.branches, w.texts, answers, lora=False)
    for b, q in enumerate(QUESTIONS):
        text = synth.text_answer_logprobs(q, w.texts[b], answers[b])
        ref = torch_answer_logprobs(torch_model, synth.tok, prompts.text_synth_messages(q, w.texts[b]), answers[b])
        assert text.shape == ref.shape == (len(answers[b]), synth.model.cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(text), ref, atol=1e-4)
        alone = synth.branches_from_tokens([[synth.gen.chat_tokens(prompts.worker_messages(q))] * 2], [w.tokens[b]])
        cache = np.asarray(synth.cache_answer_logprobs(q, alone, answers[b], lora=False), dtype=np.float64)
        np.testing.assert_allclose(cache, np.asarray(synth.cache_answer_logprobs(
            q, request_branches(w.branches, b), answers[b], lora=False)), atol=1e-5)
        expected = float(np.mean(np.sum(np.exp(ref) * (ref - cache), axis=-1)))
        assert answer_kl(text, cache) == pytest.approx(expected, abs=1e-5)
        assert batched[b] == pytest.approx(expected, abs=1e-5)
    # the formula and its direction on far-apart distributions (the tiny model's are all near
    # uniform): KL(first || second) = sum p1 (log p1 - log p2), not the reverse
    rng = np.random.default_rng(0)
    l1, l2 = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in 3 * rng.normal(size=(2, 5, 50)))
    far = float(np.mean(np.sum(np.exp(l1) * (l1 - l2), axis=-1)))
    assert far > 1 and answer_kl(l1, l2) == pytest.approx(far, rel=1e-5)
    assert answer_kl(l1, l1) == pytest.approx(0.0, abs=1e-7) and answer_kl(l2, l1) != pytest.approx(far, rel=1e-2)
    (empty,) = synth.teacher_forced_kl(QUESTIONS[:1], request_branches(w.branches, 0), w.texts[:1], [[]])
    assert math.isnan(empty)
    with pytest.raises(ValueError, match="one request's branch caches expected, got 2"):
        synth.cache_answer_logprobs(QUESTIONS[0], w.branches, answers[0])


def test_branches_from_stored_tokens_equal_worker_caches(setup):
    """Re-prefilling stored worker output (what eval does) gives the caches decoding produced."""
    synth, _, w = setup
    prefixes = [[synth.gen.chat_tokens(prompts.worker_messages(q))] * 2 for q in QUESTIONS]
    rebuilt = synth.branches_from_tokens(prefixes, w.tokens)
    n = int(np.asarray(w.branches.lengths).max())
    np.testing.assert_array_equal(np.asarray(rebuilt.lengths), np.asarray(w.branches.lengths))
    for arr in ("k", "v"):
        a = np.asarray(getattr(rebuilt, arr))[:, :, :, :n]
        b = np.asarray(getattr(w.branches, arr))[:, :, :, :n]
        mask = np.arange(n)[None, None, :] < np.asarray(w.branches.lengths)[..., None]
        assert np.abs((a - b)[:, mask]).max() <= 1e-4


def test_bad_input(setup):
    synth, _, w = setup
    with pytest.raises(ValueError, match="K=0"):
        synth.run_workers([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="2 questions for 1 requests"):
        one = synth.branches_from_tokens([[[1, 2, 3]]], [[[4, 5]]])
        synth.cache_path(QUESTIONS, one)
    with pytest.raises(ValueError, match="mapper was built for 3 KV heads"):
        ParallelSynthesis(synth.model, make_mapper("per_head_affine", 3))
    with pytest.raises(ValueError, match="is empty"):
        synth.branches_from_tokens([[[1, 2], [1, 2]]], [[[5], []]])
    with pytest.raises(ValueError, match="unknown task family"):
        ParallelSynthesis(synth.model, family="poetry")
    no_lora = ParallelSynthesis(load_model(synth.model.source, with_tokenizer=True))
    with pytest.raises(ValueError, match="without a LoRA adapter"):
        no_lora.cache_path(QUESTIONS, w.branches)
    with pytest.raises(ValueError, match="exceeds the model's maximum length"):
        synth.text_path(QUESTIONS, [["word " * 2100], ["x"]], max_new_tokens=4)


def test_the_synthesizer_is_built_whole_and_times_nothing(setup):
    """Mapper, LoRA and handoff are given at construction; a variant is a new synthesizer sharing the
    backbone; the answers carry no timing (measure/ttft.py times the same steps)."""
    synth, _, w = setup
    with pytest.raises(dataclasses.FrozenInstanceError):
        synth.family = "qa"
    variant = dataclasses.replace(synth, family="qa")
    assert (variant.family, synth.family) == ("qa", "math") and variant.model is synth.model
    assert {f.name for f in dataclasses.fields(PathResult)} == {"name", "texts", "tokens", "prompt_tokens",
                                                                "first_logits"}
