"""Formats every stage reads: data rows (local files or hub datasets), the boxed-answer convention,
text/JSON/JSON-lines files read with errors naming file and line (text_files), and the run
directory lock of `psynth train` / `psynth eval` (run_lock).

Low in the import flow (model <- inference <- synthesis <- data/train/eval <- cli (benchmarks/ sits outside the package)):
nothing here imports another psynth_jax package.
"""
