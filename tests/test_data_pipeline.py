"""The grain training pipeline with the real SmolLM2 tokenizer: batch contract, loss masks,
determinism, exact resume, guards, bucketing and multi-process sharding."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from psynth_jax.config.schema import DataConfig, DataSourceConfig
from psynth_jax.data.examples import Branch
from psynth_jax.data.pipeline import TrainBatch, make_train_iterator
from psynth_jax.data.sources import load_stage
from psynth_jax.data.tokenize import end_of_turn_id
from psynth_jax.interop.embedded import default_gguf_path
from psynth_jax.interop.tokenizer import load_tokenizer

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
SOURCES = (DataSourceConfig(path=str(GSM8K), builder="exposure", limit=40),
           DataSourceConfig(path=str(GSM8K), builder="aggregation", limit=40))
CFG = DataConfig(train=SOURCES, seed=3, buckets=(256, 512, 768, 1024, 2048), batch_size=4,
                 max_total_tokens=4096, max_live_tokens=2048, max_cache_tokens=4096)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_gguf_path())


@pytest.fixture(scope="module")
def examples():
    return load_stage(CFG).examples


def _take(it, n: int) -> list[TrainBatch]:
    return [next(it) for _ in range(n)]


def _same(a: TrainBatch, b: TrainBatch) -> bool:
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(TrainBatch))


def test_batch_contract(tokenizer, examples):
    it, stats = make_train_iterator(CFG, tokenizer, examples=examples)
    assert stats.examples == stats.kept == 80 and sum(stats.skipped.values()) == 0
    k = CFG.num_branches
    for batch in _take(it, stats.batches_per_epoch):
        b, _, tb = batch.branch_tokens.shape
        assert b == CFG.batch_size and batch.branch_tokens.shape[1] == k
        assert {tb, batch.synth_tokens.shape[1], batch.text_tokens.shape[1]} <= set(CFG.buckets)
        for name, dtype in [("branch_tokens", np.int32), ("branch_prefix_len", np.int32), ("branch_len", np.int32),
                            ("synth_tokens", np.int32), ("synth_len", np.int32), ("loss_mask", np.float32),
                            ("text_tokens", np.int32), ("text_len", np.int32), ("text_loss_mask", np.float32),
                            ("example_valid", np.bool_)]:
            assert getattr(batch, name).dtype == dtype, name
        assert (batch.branch_len >= 1).all()
        assert (batch.branch_prefix_len + batch.branch_len <= tb).all()
        # right padding with 0 after each sequence's length
        used = batch.branch_prefix_len + batch.branch_len
        assert not np.where(np.arange(tb) >= used[..., None], batch.branch_tokens, 0).any()
        assert not np.where(np.arange(batch.synth_tokens.shape[1]) >= batch.synth_len[:, None],
                            batch.synth_tokens, 0).any()
        np.testing.assert_array_equal(batch.loss_mask.sum(1), batch.text_loss_mask.sum(1))
        # padding rows (example_valid False) repeat a real example of the batch
        for row in np.nonzero(~batch.example_valid)[0]:
            np.testing.assert_array_equal(batch.synth_tokens[row], batch.synth_tokens[0])
    assert stats.padding_rows_per_epoch == stats.batches_per_epoch * CFG.batch_size - stats.kept


def test_loss_mask_selects_exactly_target_and_end_of_turn(tokenizer, examples):
    by_branches = {tuple(b.output for b in e.branches): e for e in examples}
    eot = end_of_turn_id(tokenizer)
    it, _ = make_train_iterator(CFG, tokenizer, examples=examples)
    batch = next(it)
    for r in np.nonzero(batch.example_valid)[0]:
        ts = batch.synth_tokens[r]
        pos = np.nonzero(batch.loss_mask[r])[0]
        assert np.array_equal(pos, np.arange(pos[0], pos[-1] + 1))  # contiguous
        predicted = ts[pos + 1]
        assert predicted[-1] == eot and pos[-1] + 2 == batch.synth_len[r]
        target = tokenizer.decode(predicted[:-1])
        prompt = tokenizer.decode(ts[: pos[0] + 1])
        assert prompt.endswith("<|im_start|>assistant\n") and "latent information" in prompt
        # the text path has the same target after a prompt that carries every branch as text
        tt = batch.text_tokens[r]
        tpos = np.nonzero(batch.text_loss_mask[r])[0]
        np.testing.assert_array_equal(tt[tpos + 1], predicted)
        text_prompt = tokenizer.decode(tt[: tpos[0] + 1])
        branches = []
        for i in range(CFG.num_branches):
            p, n = batch.branch_prefix_len[r, i], batch.branch_len[r, i]
            assert tokenizer.decode(batch.branch_tokens[r, i, :p]).endswith("<|im_start|>assistant\n")
            branches.append(tokenizer.decode(batch.branch_tokens[r, i, p : p + n]))
            assert f"[Sub-agent {i + 1}]:\n{branches[-1]}" in text_prompt
        example = by_branches[tuple(branches)]
        assert target == example.target and f"Task: {example.question}" in prompt


def test_same_seed_same_batches_other_seed_differs(tokenizer, examples):
    a = _take(make_train_iterator(CFG, tokenizer, examples=examples)[0], 8)
    b = _take(make_train_iterator(CFG, tokenizer, examples=examples)[0], 8)
    c = _take(make_train_iterator(dataclasses.replace(CFG, seed=4), tokenizer, examples=examples)[0], 8)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_resume_from_state_sees_exactly_the_next_batches(tokenizer, examples):
    it, stats = make_train_iterator(CFG, tokenizer, examples=examples)
    n = stats.batches_per_epoch - 2  # so the m batches after it cross into the next epoch
    _take(it, n)
    state = it.get_state()
    expected = _take(it, 5)
    fresh, _ = make_train_iterator(CFG, tokenizer, examples=examples)
    fresh.set_state(state)
    assert all(_same(x, y) for x, y in zip(_take(fresh, 5), expected))
    # a new epoch is a new order
    first = _take(make_train_iterator(CFG, tokenizer, examples=examples)[0], stats.batches_per_epoch * 2)
    half = stats.batches_per_epoch
    assert not all(_same(x, y) for x, y in zip(first[:half], first[half:]))


def test_guards_skip_and_count_by_reason(tokenizer, examples):
    for reason, overrides in [("cache", dict(max_cache_tokens=150)), ("live", dict(max_live_tokens=300)),
                              ("total", dict(max_total_tokens=450)), ("no_bucket", dict(buckets=(256, 512)))]:
        _, stats = make_train_iterator(dataclasses.replace(CFG, **overrides), tokenizer, examples=examples)
        assert 0 < stats.skipped[reason] == sum(stats.skipped.values()), (reason, stats.skipped)
        assert stats.kept + stats.skipped[reason] == stats.examples
    empty = dataclasses.replace(examples[0], id="empty", branches=(*examples[0].branches[:2], Branch("", "")))
    _, stats = make_train_iterator(CFG, tokenizer, examples=[empty, *examples[1:]])
    assert stats.skipped["empty_branch"] == 1 and stats.kept == stats.examples - 1
    with pytest.raises(ValueError, match="no example passed the guards.*num_branches=80"):
        make_train_iterator(dataclasses.replace(CFG, min_branches=4), tokenizer, examples=examples)


def test_shards_split_every_global_batch(tokenizer, examples):
    full = _take(make_train_iterator(CFG, tokenizer, examples=examples)[0], 6)
    halves = [_take(make_train_iterator(CFG, tokenizer, examples=examples, shard_index=i, shard_count=2)[0], 6)
              for i in range(2)]
    for g, h0, h1 in zip(full, *halves):
        for f in dataclasses.fields(TrainBatch):
            np.testing.assert_array_equal(np.concatenate([getattr(h0, f.name), getattr(h1, f.name)]),
                                          getattr(g, f.name))
    with pytest.raises(ValueError, match="not divisible"):
        make_train_iterator(CFG, tokenizer, examples=examples, shard_count=3)


def test_eval_split_is_one_finite_epoch(tokenizer, examples):
    it, stats = make_train_iterator(CFG, tokenizer, examples=examples[:10], split="eval")
    batches = list(it)
    assert len(batches) == stats.batches_per_epoch
    assert sum(int(b.example_valid.sum()) for b in batches) == stats.kept == 10


DATA = GSM8K.parents[1]
K_SOURCES = (DataSourceConfig(path=str(DATA / "instructions_icl/flan_cot/*.tsv"), builder="exposure", limit=8,
                              k=(2, 3, 4, 5)),
             DataSourceConfig(path=str(DATA / "multihop_evidence/hotpotqa_200_migres.jsonl"), builder="aggregation",
                              limit=16, k=(2, 3, 4, 5, 6)),
             DataSourceConfig(path=str(GSM8K), builder="aggregation", limit=8))
K_CFG = dataclasses.replace(CFG, train=K_SOURCES, batch_size=3, min_branches=2, max_branches=6,
                            buckets=(256, 512, 1024, 2048))


def _signature(batch: TrainBatch, row: int) -> bytes:
    """What identifies one example in a batch: its synthesizer tokens and branch tokens."""
    return batch.synth_tokens[row, : batch.synth_len[row]].tobytes() + batch.branch_tokens[row].tobytes()


def test_k_varies_per_example_and_every_batch_has_one_static_shape(tokenizer):
    examples = load_stage(K_CFG).examples
    assert {e.num_branches for e in examples} >= {2, 3, 4, 5}
    it, stats = make_train_iterator(K_CFG, tokenizer, examples=examples)
    assert stats.kept == len(examples) and set(stats.by_k) == {e.num_branches for e in examples}
    assert stats.by_k == dict(sorted(collections.Counter(e.num_branches for e in examples).items()))
    for epoch in range(2):
        seen = collections.Counter()
        for batch in _take(it, stats.batches_per_epoch):
            b, k, tb = batch.branch_tokens.shape
            assert b == K_CFG.batch_size and tb in K_CFG.buckets and 2 <= k <= 6
            assert batch.branch_len.shape == batch.branch_prefix_len.shape == (b, k)
            assert (batch.branch_len >= 1).all()  # every row really has K branches: no padded branch
            for row in np.nonzero(batch.example_valid)[0]:
                seen[_signature(batch, row)] += 1
        # each kept example exactly once per epoch
        assert sum(seen.values()) == stats.kept and set(seen.values()) == {1}, epoch
    # the shapes a run compiles: one per (K, Tb, Ts) of the bucket keys "K<k> <Tb>x<Ts>x<Tt>"
    shapes = {(int(k[1:]), *map(int, sizes.split("x")[:2])) for k, sizes in map(str.split, stats.buckets)}
    got = {(b.branch_tokens.shape[1], b.branch_tokens.shape[2], b.synth_tokens.shape[1])
           for b in _take(make_train_iterator(K_CFG, tokenizer, examples=examples)[0], stats.batches_per_epoch)}
    assert got == shapes


def test_k_varying_resume_is_exact(tokenizer):
    examples = load_stage(K_CFG).examples
    it, stats = make_train_iterator(K_CFG, tokenizer, examples=examples)
    _take(it, stats.batches_per_epoch // 2)
    state = it.get_state()
    expected = _take(it, stats.batches_per_epoch)  # the rest of this epoch and into the next
    fresh, _ = make_train_iterator(K_CFG, tokenizer, examples=examples)
    fresh.set_state(state)
    assert all(_same(x, y) for x, y in zip(_take(fresh, stats.batches_per_epoch), expected))


def test_k_outside_the_range_is_skipped_and_counted_per_source(tokenizer):
    examples = load_stage(K_CFG).examples
    narrow = dataclasses.replace(K_CFG, min_branches=3, max_branches=4)
    _, stats = make_train_iterator(narrow, tokenizer, examples=examples)
    outside = sum(not 3 <= e.num_branches <= 4 for e in examples)
    assert stats.skipped["num_branches"] == outside > 0 and set(stats.by_k) <= {3, 4}
    per_source = collections.Counter(e.meta["source"] for e in examples if not 3 <= e.num_branches <= 4)
    assert {s: v["skipped"].get("num_branches", 0) for s, v in stats.by_source.items()} == {
        s: per_source.get(s, 0) for s in stats.by_source}
