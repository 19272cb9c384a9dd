"""Evaluation tasks and scorers (no model code), and the eval runner built on them.

- tasks: `load_task(name, path=None, limit=None, seed=0)` -> list[EvalExample]
- scoring: `score(example, completion)`, `score_many(...)`, `extract_answer(example, completion)`
- sandbox: `run_code(code)` / `run_many(codes)` run programs in a separate, limited process
- extract, converters, example: the pieces those are built from (rows come from formats.records)
- runner: `run_eval(EvalConfig)` (`psynth eval`): every task x mode, resumable; modes: the six
  modes; store: the run directory; stats: metrics; report / plots: results.json, results.md, PNGs
"""
