"""Training computes what inference computes: one synthesis core, from the data pipeline's batch.

For one example laid out by the training data pipeline (tokenizer, chat templates, buckets,
padding), the objective's student logits at every synthesizer-prompt position equal the cache
path's prefill logits, built the way inference builds them (`ParallelSynthesis` from stored
token ids); and the KL teacher's logits at every text-prompt position equal the text path's.
Float32, XLA attention, tiny models of each family, a non-trivial mapper and LoRA, both handoff
conventions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.config.schema import DataConfig, DataSourceConfig
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.data.pipeline import make_train_iterator
from psynth_jax.inference import runtime
from psynth_jax.interop.loader import load_model
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core, prompts
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from psynth_jax.train.objective import ObjectiveConfig, merge_trainable, split_trainable, student_hidden, teacher_hidden
from tiny_smol import make_tiny_smol

EXAMPLE = SynthesisExample(
    id="consistency/0", family="math", question="A farmer has 3 pens with 12 sheep each. How many sheep?",
    branches=(Branch("", "Each pen has 12 sheep and there are 3 pens."),
              Branch("", "3 times 12 is 36, so the answer is 36."),
              Branch("", "I think the farmer has \\boxed{36} sheep in total.")),
    target="There are 3 x 12 = 36 sheep, so the answer is \\boxed{36}.",
)


def _perturbed(model, seed: int):
    """The model with a non-zero LoRA and a non-identity per-head mapper (both would be no-ops at init)."""
    decoder = nnx.merge(model.graphdef, model.state)
    mapper = make_mapper("per_head_affine", model.cfg.num_kv_heads, seed=seed)
    graphdefs, trainable, frozen = split_trainable(decoder, mapper)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return merge_trainable(graphdefs, trainable, frozen)


@pytest.mark.parametrize("family,convention", [("llama", "output_tokens"), ("qwen2", "release"),
                                               ("qwen3", "output_tokens"), ("qwen3", "release")])
def test_training_logits_equal_inference_logits(tmp_path, family, convention):
    path = make_tiny_smol(tmp_path / family, family=family)
    base = load_model(path, lora=LoRAConfig(rank=4, alpha=8.0))
    decoder, mapper = _perturbed(base, seed=1)
    graphdef, state = nnx.split(decoder)
    model = type(base)(base.cfg, graphdef, state, base.dtype_name, base.source, base.lora, base.tokenizer, base.mesh)
    handoff = Handoff(convention=convention)
    tok = model.tokenizer

    # training: the data pipeline's batch, the objective's student and teacher
    data = DataConfig(train=(DataSourceConfig(path="unused", builder="distillation"),), buckets=(256, 512),
                      max_total_tokens=2048, max_live_tokens=512, max_cache_tokens=1024)
    batch = {k: jnp.asarray(v) for k, v in vars(next(make_train_iterator(data, tok, examples=[EXAMPLE])[0])).items()}
    opts = ObjectiveConfig(handoff=handoff)
    student = np.asarray(decoder.logits(student_hidden(decoder, mapper, batch, opts)))[0]
    teacher = np.asarray(decoder.logits(teacher_hidden(decoder, batch, opts)))[0]

    # inference: ParallelSynthesis from stored token ids, as eval rebuilds worker caches
    synth = ParallelSynthesis(model, mapper, handoff=handoff)
    q, k = EXAMPLE.question, EXAMPLE.num_branches
    prefixes = [[synth.gen.chat_tokens(prompts.worker_messages(q, "math"))] * k]
    outputs = [[tok(b.output, add_special_tokens=False)["input_ids"] for b in EXAMPLE.branches]]
    branches = synth.branches_from_tokens(prefixes, outputs)
    prompt = synth.gen.chat_tokens(prompts.cache_synth_messages(q, k, "math"))
    cache, _ = core.jit_prepare(branches, synth.mapper_def, synth.mapper_state, cfg=model.cfg,
                                extra_slots=len(prompt) + 8)
    cache_logits, _ = core.jit_cache_prefill(model.graphdef, model.state, jnp.asarray([prompt]),
                                             jnp.asarray([len(prompt)]), cache, output="all")
    text_prompt = synth.gen.chat_tokens(prompts.text_synth_messages(q, [b.output for b in EXAMPLE.branches], "math"))
    text_logits, _ = runtime.prefill(model.graphdef, model.state, jnp.asarray([text_prompt]),
                                     jnp.asarray([len(text_prompt)]), num_slots=len(text_prompt), output="all")
    first_cache = synth.cache_path([q], branches, max_new_tokens=1).first_logits[0]
    first_text = synth.text_path([q], [[b.output for b in EXAMPLE.branches]], max_new_tokens=1).first_logits[0]

    # the pipeline tokenized the same prompts; the student's prompt positions are inference's
    n, m = len(prompt), len(text_prompt)
    assert np.asarray(batch["synth_tokens"])[0, :n].tolist() == prompt
    assert np.asarray(batch["text_tokens"])[0, :m].tolist() == text_prompt
    d_student = np.abs(student[:n] - np.asarray(cache_logits)[0, :n]).max()
    d_teacher = np.abs(teacher[:m] - np.asarray(text_logits)[0, :m]).max()
    print(f"{family} {convention}: student vs cache path {d_student:.2e}, teacher vs text path {d_teacher:.2e}")
    assert d_student <= 2e-4 and d_teacher <= 2e-4
    assert np.abs(student[n - 1] - first_cache).max() <= 2e-4  # what the first answer token is sampled from
    assert np.abs(teacher[m - 1] - first_text).max() <= 2e-4
    assert np.abs(student[n - 1] - teacher[m - 1]).max() > 1e-3  # two different layouts: not vacuous
