"""The `psynth eval` config: which backbone and trained weights, which benchmarks, which modes.

Same machinery as the training config (typed.py: YAML with `base:` inheritance, `key=value`
overrides, errors naming the dotted field), its own schema. `load_eval_config` type-checks and
then runs `validate_eval_config`, so an unknown mode or an impossible number fails with a message
naming the field before anything heavy (data, model) is loaded; task names are checked by the
task registry (eval/tasks.py `check_task_names`), which `psynth eval` runs next, as early.

Six modes, all answering from the SAME stored worker branches (METHOD.md sections 3-4):
single agent, text-concatenation synthesis, naive cache concatenation (identity mapper, LoRA
off), mapper only (trained mapper, LoRA off), LoRA only (identity mapper, LoRA on), and full
Parallel-Synthesis (trained mapper + LoRA on).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import yaml

from psynth_jax.config.loader import _load_yaml_tree, apply_override
from psynth_jax.config.schema import HandoffConfig, MeshConfig, ModelSourceConfig
from psynth_jax.config.typed import ConfigError, from_dict, to_dict

ModeName = Literal["single", "text", "naive_cache", "mapper_only", "lora_only", "psynth"]
MODES: tuple[str, ...] = typing.get_args(ModeName)

GENERIC_TASKS = ("mc", "qa")  # tasks that read a user's file, described by `fields`

# Fields that do not change any stored branch or record: a resumed run may change them freely.
RESUMABLE_FIELDS = ("tasks", "modes", "out_dir", "score_workers", "mesh")

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class TaskFields:
    """Column names of a user's file for the generic tasks (None: the usual names, in brackets)."""

    id: Optional[str] = None  # a stable id per row [id; else the row's position]
    question: Optional[str] = None  # the question text [question]
    choices: Optional[str] = None  # mc: the options, a list or {label: text} [choices, options]
    # mc: the correct option as a 0-based index, a letter / label or its text [answer, label, answerKey];
    # qa: the accepted answer, or a list of them [answers, answer]
    answer: Optional[str] = None
    context: Optional[str] = None  # qa: paragraphs given as branches, texts or {title, text} [context]


@_frozen
class EvalTaskConfig:
    """One benchmark: a task registry name, an optional source, how many examples (first N)."""

    # gsm8k, math500, humaneval, mbpp, arc_challenge, marble_db, multihop_qa, tool_calls, aime2024, ...,
    # or the generic mc / qa on a user's file (eval/tasks.py)
    name: str
    path: Optional[str] = None  # local file / dataset folder / hub id; None: shipped data or default hub id
    limit: Optional[int] = None  # first N examples in source order; None: all
    fields: TaskFields = dataclasses.field(default_factory=TaskFields)  # mc / qa: the file's column names
    # tasks with given branches: at most this many (qa: context paragraphs; tool_calls: function docs,
    # default 8); multihop_qa: this many paragraphs, or every supporting one if more (default 4)
    branches: Optional[int] = None


@_frozen
class EvalConfig:
    """Everything one evaluation run needs."""

    model: ModelSourceConfig = dataclasses.field(default_factory=ModelSourceConfig)
    # trained mapper + LoRA: a `psynth train` run dir or an exported adapter dir; None: untrained
    # (identity mapper, LoRA B = 0), so mapper_only / lora_only / psynth behave as naive_cache.
    adapter: Optional[str] = None
    # None (no `handoff:` section): what the adapter was trained under (a release checkpoint selects
    # release / eos_only), else output_tokens / chat. A section given is the user's explicit choice and wins.
    handoff: Optional[HandoffConfig] = None
    # devices: requests data-parallel over data (x fsdp), the backbone split over fsdp / tensor
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    tasks: tuple[EvalTaskConfig, ...]
    modes: tuple[ModeName, ...] = MODES
    num_workers: int = 3  # K worker branches per example (marble_db: one per expert profile instead)
    worker_tokens: int = 256  # max new tokens per worker branch
    max_new_tokens: int = 256  # max new tokens of every synthesis / single-agent answer
    worker_temperature: float = 0.7
    worker_top_p: float = 0.95
    synth_temperature: float = 0.0  # 0: greedy answers (every mode alike)
    seed: int = 0
    batch_size: int = 1  # requests per batched worker / answer call (throughput only: TTFT is always batch 1)
    timing_repeats: int = 3  # timed batch-1 runs per (example, mode), median, after a compile run; 0: no TTFT
    timing_examples: Optional[int] = None  # time only each task's first N examples (None: all); accuracy uses all
    score_workers: int = 2  # code programs run in parallel by the scorer
    code_timeout_s: float = 10.0  # per program, as in the paper
    out_dir: str  # run directory: records, stored branches, results; an existing one is resumed


def load_eval_config(path: str | Path, overrides: Iterable[str] = ()) -> EvalConfig:
    """Load an eval YAML (following `base:`), apply `key=value` overrides, type-check, validate."""
    raw = _load_yaml_tree(Path(path))
    for override in overrides:
        apply_override(raw, override)
    cfg = from_dict(EvalConfig, raw)
    validate_eval_config(cfg)
    return cfg


def dump_eval_config(cfg: EvalConfig) -> str:
    """The resolved config as YAML, loadable again by `load_eval_config`."""
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
    return "# psynth_jax eval config (resolved: base files and overrides applied)\n" + body


def fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    """The fields that decide stored branches and records: a resumed run must agree on all of them.

    An unset or default handoff is left out, so runs made before the setting existed resume (the
    adapter, which an unset handoff defers to, is part of the fingerprint); so is the default
    (materialised) cache path.
    """
    out = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_FIELDS}
    if cfg.handoff is None or cfg.handoff == HandoffConfig():
        del out["handoff"]
    if not cfg.model.zero_copy:
        out["model"] = {k: v for k, v in out["model"].items() if k != "zero_copy"}
    return out


def validate_eval_config(cfg: EvalConfig) -> None:
    """Raise ConfigError listing every semantic problem, each starting with its dotted field."""
    errors = [*_task_errors(cfg), *_number_errors(cfg)]
    if len(set(cfg.modes)) != len(cfg.modes):
        errors.append(f"modes has duplicates: {list(cfg.modes)}")
    if not cfg.modes:
        errors.append(f"modes must name at least one of {', '.join(MODES)}")
    if cfg.adapter is not None and "://" not in cfg.adapter and not Path(cfg.adapter).expanduser().exists():
        errors.append(f"adapter: {cfg.adapter!r} does not exist (a `psynth train` run dir, an adapter dir or a "
                      "release checkpoint folder)")
    if not cfg.out_dir.strip():
        errors.append("out_dir must name a directory (local, or gs://bucket/path)")
    if errors:
        raise ConfigError(errors)


def _task_errors(cfg: EvalConfig) -> list[str]:
    """Problems of the task list; the task names themselves are checked where tasks are loaded
    (eval/tasks.py `check_task_names`), so the config knows no task registry."""
    errors = [] if cfg.tasks else ["tasks must list at least one benchmark"]
    seen: set[str] = set()
    for i, t in enumerate(cfg.tasks):
        if t.name in seen:
            errors.append(f"tasks[{i}].name: task {t.name!r} is listed twice")
        seen.add(t.name)
        if t.limit is not None and t.limit < 1:
            errors.append(f"tasks[{i}].limit must be >= 1 or null (all examples), got {t.limit}")
        if t.path is not None and _looks_local(t.path) and not Path(t.path).expanduser().exists():
            errors.append(f"tasks[{i}].path: local path {t.path!r} does not exist (relative paths are read from "
                          f"{Path.cwd()})")
        if t.name in GENERIC_TASKS and t.path is None:
            errors.append(f"tasks[{i}].path: task {t.name!r} reads your own file: set path "
                          "(and fields for its columns)")
        if t.branches is not None and t.branches < 1:
            errors.append(f"tasks[{i}].branches must be >= 1 or null, got {t.branches}")
    return errors


def _looks_local(path: str) -> bool:
    """A path that can only name a local file: explicit (./, /, ~) or with a data file suffix
    (anything else may be a hub id, tried when the task loads)."""
    return path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".parquet", ".csv", ".gz"))


def _number_errors(cfg: EvalConfig) -> list[str]:
    checks = [
        (cfg.num_workers >= 1, f"num_workers must be >= 1, got {cfg.num_workers}"),
        (cfg.worker_tokens >= 1, f"worker_tokens must be >= 1, got {cfg.worker_tokens}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.worker_temperature >= 0, f"worker_temperature must be >= 0, got {cfg.worker_temperature}"),
        (0 < cfg.worker_top_p <= 1, f"worker_top_p must be in (0, 1], got {cfg.worker_top_p}"),
        (cfg.synth_temperature >= 0, f"synth_temperature must be >= 0, got {cfg.synth_temperature}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.timing_repeats >= 0, f"timing_repeats must be >= 0 (0: no TTFT), got {cfg.timing_repeats}"),
        (cfg.timing_examples is None or cfg.timing_examples >= 1,
         f"timing_examples must be >= 1 or null (time every example), got {cfg.timing_examples}"),
        (cfg.score_workers >= 1, f"score_workers must be >= 1, got {cfg.score_workers}"),
        (cfg.code_timeout_s > 0, f"code_timeout_s must be > 0, got {cfg.code_timeout_s}"),
    ]
    return [message for ok, message in checks if not ok]


__all__ = [
    "MODES",
    "ConfigError",
    "EvalConfig",
    "EvalTaskConfig",
    "GENERIC_TASKS",
    "ModeName",
    "TaskFields",
    "dump_eval_config",
    "fingerprint",
    "load_eval_config",
    "validate_eval_config",
]
