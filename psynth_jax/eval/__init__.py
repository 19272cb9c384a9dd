"""Evaluation tasks and scorers (no model code).

- tasks: `load_task(name, path=None, limit=None, seed=0)` -> list[EvalExample]
- scoring: `score(example, completion)`, `score_many(...)`, `extract_answer(example, completion)`
- sandbox: `run_code(code)` / `run_many(codes)` run programs in a separate, limited process
- extract, converters, records, example: the pieces those are built from
"""
