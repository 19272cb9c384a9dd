"""Training data: examples, builders, tokenization with guards, and the grain input pipeline.

- examples.py: `SynthesisExample` (question, K branches, target), the on-disk row format.
- problems.py: GSM8K / MATH rows -> `Problem` (question, worked solution, gold answer).
- chunking.py, corruption.py: the text operations the builders need.
- builders.py: exposure and aggregation examples (no model); distill.py: distillation (model).
- sources.py: `load_examples(sources, num_branches, seed)` from config sources.
- tokenize.py: chat-templated token sequences, guards and buckets for one example.
- pipeline.py: `make_train_iterator` -> checkpointable iterator of `TrainBatch`.

Nothing under psynth_jax.model / inference / synthesis imports this package.
"""
