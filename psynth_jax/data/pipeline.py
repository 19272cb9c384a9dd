"""The training input pipeline on grain: examples -> tokens -> guards -> buckets -> batches.

1. Every example is tokenized once up front (tokenize.py) and checked against the guards of
   DataConfig; skipped examples are counted by reason, per source, role and K (DataStats). Doing
   this before batching lets examples be grouped by shape, gives exact statistics, and makes
   every process (which all read all sources) compute the same global plan.
2. Each kept example gets a bucket key (K, Tb, Ts, Tt): its branch count, then the smallest
   `DataConfig.buckets` value >= its widest branch, its synthesizer sequence and its text-path
   sequence. K varies per example (data.min_branches..max_branches); a batch never mixes Ks.
3. Epoch e's global batches: the kept examples in a permutation seeded by (seed, e), grouped
   by bucket key (stable, in shuffled order), cut into batches of `batch_size` (each
   bucket's last batch padded), then the batch order permuted by (seed + 1, e). Every batch has
   one static shape, every epoch a fresh order, and the plan depends only on (examples, config,
   epoch).
4. A grain MapDataset over batch indices (range -> repeat -> map_with_index) turns index i into
   batch i % n of epoch i // n, and process `shard_index` of `shard_count` takes its rows
   [shard_index * b, (shard_index + 1) * b) of every global batch, b = batch_size / shard_count.
   All processes thus step through the same shapes in lockstep. The grain iterator's state
   ({"next_index": i}) is all a checkpoint needs to resume at exactly the next batch.

Padding rows (example_valid False) repeat the batch's first example, so they are real,
finite inputs that the loss masks out.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Literal, Sequence

import grain
import numpy as np

from psynth_jax.config.schema import DataConfig
from psynth_jax.data.examples import SynthesisExample
from psynth_jax.data.sources import load_stage
from psynth_jax.data.tokenize import SKIP_REASONS, ExampleTokenizer, TokenizedExample, bucket_key, skip_reason

__all__ = ["DataStats", "TrainBatch", "load_stage", "make_train_iterator", "tokenize_and_guard"]

BucketKey = tuple[int, int, int, int]  # (K, Tb, Ts, Tt)


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One (per-process) batch. B = rows, K = branches; every token array right-padded with 0.

    branch_tokens [B, K, Tb]: worker prompt then output tokens; branch_prefix_len [B, K] = P_i;
    branch_len [B, K] = L_i >= 1. synth_tokens [B, Ts]: synthesizer prompt, target, end-of-turn;
    synth_len [B]; loss_mask [B, Ts] is 1.0 at t when synth_tokens[t + 1] is a target or the
    end-of-turn token (logits at t predict t + 1). text_* : the same for the text-concatenation
    prompt, with the same target tokens. example_valid [B]: False for padding rows.
    """

    branch_tokens: np.ndarray
    branch_prefix_len: np.ndarray
    branch_len: np.ndarray
    synth_tokens: np.ndarray
    synth_len: np.ndarray
    loss_mask: np.ndarray
    text_tokens: np.ndarray
    text_len: np.ndarray
    text_loss_mask: np.ndarray
    example_valid: np.ndarray


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What the guards and bucketing did (global: the same on every process)."""

    examples: int
    kept: int
    skipped: dict[str, int]  # reason (tokenize.SKIP_REASONS) -> examples
    buckets: dict[str, int]  # "K<k> <Tb>x<Ts>x<Tt>" -> kept examples
    batch_size: int  # global
    local_batch_size: int  # rows per process
    batches_per_epoch: int
    padding_rows_per_epoch: int
    by_k: dict[int, int] = dataclasses.field(default_factory=dict)  # K -> kept examples
    by_role: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # role -> kept, skipped
    # source (meta "source") -> {"kept": n, "skipped": {reason: n}, "by_k": {K: n}}
    by_source: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{r}={n}" for r, n in self.skipped.items() if n) or "none"
        buckets = ", ".join(f"{k}: {n}" for k, n in self.buckets.items())
        return (f"{self.kept}/{self.examples} examples kept (skipped: {skipped}); buckets {buckets}; "
                f"{self.batches_per_epoch} batches of {self.batch_size} per epoch "
                f"({self.padding_rows_per_epoch} padding rows)")


def tokenize_and_guard(
    examples: Sequence[SynthesisExample], tokenizer: Any, cfg: DataConfig
) -> tuple[list[TokenizedExample], list[BucketKey], dict[str, int], list[str | None]]:
    """(kept tokenized examples, their bucket keys, skipped counts for every reason, each input
    example's skip reason or None)."""
    kept, keys, reasons = [], [], []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for tex in ExampleTokenizer(tokenizer)(examples):
        reason = skip_reason(tex, cfg)
        reasons.append(reason)
        if reason is None:
            kept.append(tex)
            keys.append(bucket_key(tex, cfg.buckets))
        else:
            skipped[reason] += 1
    return kept, keys, skipped, reasons


def _breakdowns(examples: Sequence[SynthesisExample], reasons: Sequence[str | None]
                ) -> tuple[dict[int, int], dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """Kept examples per K; kept / skipped per role; kept, skipped by reason and K per source."""
    by_k: collections.Counter[int] = collections.Counter()
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    by_source: dict[str, dict[str, Any]] = {}
    for ex, reason in zip(examples, reasons, strict=True):
        role = str(ex.meta.get("role") or ex.meta.get("builder") or "unknown")
        src = by_source.setdefault(str(ex.meta.get("source") or "unknown"),
                                   {"kept": 0, "skipped": collections.Counter(), "by_k": collections.Counter()})
        if reason is None:
            by_k[ex.num_branches] += 1
            by_role[role]["kept"] += 1
            src["kept"] += 1
            src["by_k"][ex.num_branches] += 1
        else:
            by_role[role]["skipped"] += 1
            src["skipped"][reason] += 1
    sources = {name: {"kept": s["kept"], "skipped": dict(s["skipped"]), "by_k": dict(sorted(s["by_k"].items()))}
               for name, s in by_source.items()}
    return dict(sorted(by_k.items())), {r: dict(c) for r, c in by_role.items()}, sources


def _shuffled(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) for (seed, epoch): numpy's PCG64 stream seeded by both (grain's
    per-index MapDataset.shuffle costs ~20 us an index, too slow for a million-example plan)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _BatchPlan:
    """Global batches (arrays of kept-example indices, at most batch_size long) of each epoch."""

    def __init__(self, keys: Sequence[BucketKey], batch_size: int, seed: int):
        self.keys = list(keys)
        self.batch_size = batch_size
        self.seed = seed
        sizes = collections.Counter(self.keys)
        self.num_batches = sum(-(-n // batch_size) for n in sizes.values())
        self.padding_rows = self.num_batches * batch_size - len(self.keys)
        self._lock = threading.Lock()
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = _shuffled(len(self.keys), self.seed, epoch)
        groups: dict[BucketKey, list[int]] = {}
        for i in order:
            groups.setdefault(self.keys[i], []).append(int(i))
        batches = [np.asarray(groups[key][s : s + self.batch_size])
                   for key in sorted(groups) for s in range(0, len(groups[key]), self.batch_size)]
        return [batches[j] for j in _shuffled(len(batches), (self.seed + 1) % 2**32, epoch)]

    def batch(self, index: int) -> np.ndarray:
        """Global batch `index` (epoch index // num_batches); each epoch is planned once."""
        epoch, j = divmod(index, self.num_batches)
        with self._lock:  # grain may call from several threads
            if self._cached is None or self._cached[0] != epoch:
                self._cached = (epoch, self._epoch_batches(epoch))
            return self._cached[1][j]


def _pad_rows(seqs: Sequence[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _loss_mask(prompt_lens: Sequence[int], target_lens: Sequence[int], width: int) -> np.ndarray:
    """1.0 at t in [prompt - 1, prompt - 1 + target): the positions predicting target tokens."""
    t = np.arange(width)[None, :]
    start = np.asarray(prompt_lens)[:, None] - 1
    return ((t >= start) & (t < start + np.asarray(target_lens)[:, None])).astype(np.float32)


def collate(rows: Sequence[TokenizedExample], valid: Sequence[bool], key: BucketKey) -> TrainBatch:
    """Pad rows (all of bucket `key`) into a TrainBatch."""
    k, tb, ts, tt = key
    branch = np.zeros((len(rows), k, tb), np.int32)
    for i, r in enumerate(rows):
        branch[i] = _pad_rows(r.branch_tokens, tb)
    targets = [r.target_len for r in rows]
    return TrainBatch(
        branch_tokens=branch,
        branch_prefix_len=np.stack([r.branch_prefix_len for r in rows]),
        branch_len=np.stack([r.branch_len for r in rows]),
        synth_tokens=_pad_rows([r.synth_tokens for r in rows], ts),
        synth_len=np.asarray([len(r.synth_tokens) for r in rows], np.int32),
        loss_mask=_loss_mask([r.synth_prompt_len for r in rows], targets, ts),
        text_tokens=_pad_rows([r.text_tokens for r in rows], tt),
        text_len=np.asarray([len(r.text_tokens) for r in rows], np.int32),
        text_loss_mask=_loss_mask([r.text_prompt_len for r in rows], targets, tt),
        example_valid=np.asarray(valid, bool),
    )


def make_train_iterator(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    examples: Sequence[SynthesisExample] | None = None,
    split: Literal["train", "eval"] = "train",
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    prefetch: int = 4,
) -> tuple[grain.DatasetIterator, DataStats]:
    """A checkpointable iterator of TrainBatch (this process's rows) and the data statistics.

    examples: the examples to use; None loads cfg.train or cfg.eval (by `split`) with their
      builders. shard_index / shard_count: this process and the process count (multi-host:
      jax.process_index() / jax.process_count()); cfg.batch_size is the global batch and must
      be divisible by shard_count. num_epochs: None repeats forever for "train" and means one
      epoch for "eval". The iterator's get_state() / set_state() (grain) resume exactly.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    if cfg.batch_size % shard_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {shard_count} processes")
    if examples is None:
        examples = load_stage(cfg, split).examples
    if num_epochs is None and split == "eval":
        num_epochs = 1
    kept, keys, skipped, reasons = tokenize_and_guard(examples, tokenizer, cfg)
    local = cfg.batch_size // shard_count
    plan = _BatchPlan(keys, cfg.batch_size, cfg.seed)
    by_k, by_role, by_source = _breakdowns(examples, reasons)
    stats = DataStats(
        examples=len(examples), kept=len(kept), skipped=skipped,
        buckets={f"K{k} {tb}x{ts}x{tt}": n for (k, tb, ts, tt), n in sorted(collections.Counter(keys).items())},
        batch_size=cfg.batch_size, local_batch_size=local, batches_per_epoch=plan.num_batches,
        padding_rows_per_epoch=plan.padding_rows, by_k=by_k, by_role=by_role, by_source=by_source,
    )
    if not kept:
        raise ValueError(f"no example passed the guards: {stats.summary()}")
    if split == "train" and cfg.batch_size > len(kept):  # every row past the examples is computed padding
        raise ValueError(f"data.batch_size={cfg.batch_size} but stage {split!r} has {len(kept)} examples: each step "
                         f"would compute {plan.padding_rows} padding rows per epoch; lower data.batch_size to at most "
                         f"{len(kept)} (or add data)")

    def batch_at(index: int, _: int) -> TrainBatch:
        members = plan.batch(index)
        rows = [kept[members[p]] if p < len(members) else kept[members[0]] for p in range(cfg.batch_size)]
        valid = [p < len(members) for p in range(cfg.batch_size)]
        mine = slice(shard_index * local, (shard_index + 1) * local)
        return collate(rows[mine], valid[mine], keys[members[0]])

    ds = grain.MapDataset.range(plan.num_batches).repeat(num_epochs).map_with_index(batch_at)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read)), stats
