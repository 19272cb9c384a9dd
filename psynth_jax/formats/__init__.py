"""Formats every stage reads: data rows (local files or hub datasets) and the boxed-answer convention.

Low in the import flow (model <- inference <- synthesis <- data/train/eval <- bench/cli):
nothing here imports another psynth_jax package.
"""
