"""Training data: examples, builders for every data role, tokenization with guards, the grain pipeline.

- examples.py: `SynthesisExample` (question, K branches, target), the on-disk row format.
- sources.py: a stage's sources -> row format (recognised or configured) -> the builder of the
  source's role -> caps and weights (mixture.py) -> `LoadedStage` with a report per source.
- builders.py (GSM8K / MATH: step split, candidates, split statements; problems.py, chunking.py,
  corruption.py), chat.py (chat rounds), icl.py (worked examples), evidence.py (evidence
  paragraphs), tool_use.py (function docs / parallel calls): model-free builders (build.py: what
  they share); distill.py: distillation for every task family (needs the backbone).
- tokenize.py: chat-templated token sequences, guards (K range, token limits) and bucket keys.
- pipeline.py: `make_train_iterator` -> checkpointable iterator of `TrainBatch` (one K per batch).
- summary.py: the data summary (rows per source, role and K, skips by reason).

Nothing under psynth_jax.model / inference / synthesis imports this package.
"""
