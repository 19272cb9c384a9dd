"""What a directory of trained synthesizer weights is, where its parts are, and what it records.

Every importer (`psynth demo --adapter`, `with_adapter`, `psynth export --adapter-dir`, the
eval config's `adapter:`) resolves its path here first, so all of them accept the same folders:

- a `psynth train` run directory (config.yaml + checkpoints/);
- a flat adapter directory, ours or any PEFT one: adapter_config.json + adapter_model.safetensors,
  with our mapper.safetensors (+ mapper_config.json) or the release's cache_mapper.pt beside it,
  and our record psynth_export.json when psynth wrote it;
- the reference release's checkpoint folder as it ships (its `resolve_parallel_kv_checkpoint`):
  cache_mapper.pt and/or judger_lora/ at the top, else under latest/, else under
  step_checkpoints/latest/, with optional cache_mapper_config.json (hidden_dim,
  metadata_features), checkpoint_meta.json (global_step, source_run_dir) and run_args.json (the
  training CLI's arguments). Pointing at its judger_lora/ resolves to the folder above, which
  must then hold cache_mapper.pt: a mapper is never dropped in silence.

Nothing here reads weights; `adapter.py` does, after the layout and its records say what to expect.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from psynth_jax.synthesis.handoff import Handoff

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAPPER_WEIGHTS = "mapper.safetensors"
MAPPER_CONFIG = "mapper_config.json"
# written by every psynth export (both formats); the release's runner ignores unknown files
EXPORT_RECORD = "psynth_export.json"
RELEASE_MAPPER = "cache_mapper.pt"
RELEASE_MAPPER_CONFIG = "cache_mapper_config.json"
RELEASE_LORA = "judger_lora"
RELEASE_META = "checkpoint_meta.json"
RELEASE_RUN_ARGS = "run_args.json"
RELEASE_SUBDIRS = ("latest", "step_checkpoints/latest")
# what the release's runner does: its workers' KV window and their stop token (synthesis/handoff.py)
RELEASE_HANDOFF = Handoff(convention="release", stop_tokens="eos_only")

Kind = Literal["run", "adapter", "release"]


class LayoutError(ValueError):
    """A directory whose files contradict each other or its records (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parts of one set of trained weights are."""

    kind: Kind  # "run": a psynth train run; "adapter": a flat adapter dir; "release": the release's layout
    root: Path  # the directory holding the weights (after following latest/ etc.)
    lora_dir: Path | None  # the PEFT adapter directory, None when there is none
    mapper_file: Path | None  # mapper.safetensors or cache_mapper.pt, None when there is none
    via: str = ""  # how `root` was found from the path given ("" when it is that path)
    record: dict[str, Any] | None = None  # psynth_export.json, when psynth wrote this directory

    @property
    def where(self) -> str:
        return f"{self.root} ({self.via})" if self.via else str(self.root)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; a clear error names the file otherwise."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise LayoutError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None


def _is_release_root(d: Path) -> bool:
    """The release's `has_parallel_kv_artifacts`."""
    return (d / RELEASE_MAPPER).is_file() or (d / RELEASE_LORA).is_dir()


def _mapper_in(d: Path) -> Path | None:
    found = [d / n for n in (MAPPER_WEIGHTS, RELEASE_MAPPER) if (d / n).is_file()]
    if len(found) > 1:
        raise LayoutError(f"{d} holds both {MAPPER_WEIGHTS} and {RELEASE_MAPPER}: which mapper is meant is "
                          "ambiguous; remove the stale one")
    return found[0] if found else None


def resolve(path: str | Path) -> Layout:
    """The layout of `path`; FileNotFoundError / LayoutError name what is missing or contradictory."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{given} does not exist")
    if not given.is_dir():
        raise LayoutError(f"{given} is a file; point at a directory (a `psynth train` run, an adapter "
                          f"directory or a release checkpoint folder)")
    if (given / "config.yaml").is_file():
        return Layout("run", given, None, None)
    if given.name == RELEASE_LORA and (given / ADAPTER_CONFIG).is_file():
        parent = given.parent
        if not (parent / RELEASE_MAPPER).is_file():
            raise LayoutError(f"{given} is the LoRA of a release checkpoint, but {parent} has no {RELEASE_MAPPER}: "
                              f"the mapper would be dropped. Point at {parent} to load the checkpoint as it is "
                              "(LoRA only, said so), or restore its cache_mapper.pt")
        return _release(parent, f"given its {RELEASE_LORA}/")
    if (given / ADAPTER_CONFIG).is_file():
        record = _optional_json(given / EXPORT_RECORD)
        mapper = _mapper_in(given)
        kind: Kind = "release" if record is None and mapper is not None and mapper.name == RELEASE_MAPPER \
            else "adapter"
        return Layout(kind, given, given, mapper, record=record)
    if _is_release_root(given):
        return _release(given, "")
    for sub in RELEASE_SUBDIRS:
        if (given / sub).is_dir() and _is_release_root(given / sub):
            return _release(given / sub, f"{sub}/ of {given}")
    raise FileNotFoundError(
        f"{given} is neither a `psynth train` run directory (config.yaml), an adapter directory "
        f"({ADAPTER_CONFIG}), nor a release checkpoint ({RELEASE_MAPPER} or {RELEASE_LORA}/, also under "
        f"{' or '.join(s + '/' for s in RELEASE_SUBDIRS)})")


def _release(root: Path, via: str) -> Layout:
    lora = root / RELEASE_LORA
    if lora.exists() and not (lora / ADAPTER_CONFIG).is_file():
        raise LayoutError(f"{lora} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    if (root / MAPPER_WEIGHTS).is_file():
        raise LayoutError(f"{root} mixes layouts: {MAPPER_WEIGHTS} beside {RELEASE_LORA}/; remove the stale file")
    mapper = root / RELEASE_MAPPER
    return Layout("release", root, lora if lora.is_dir() else None, mapper if mapper.is_file() else None, via,
                  record=_optional_json(root / EXPORT_RECORD))


# ------------------------------------------------------------------- the release's records
@dataclasses.dataclass(frozen=True)
class ReleaseRecords:
    """What a release checkpoint folder says about itself (each part optional)."""

    mapper_config: dict[str, Any] | None  # cache_mapper_config.json: hidden_dim, metadata_features
    run_args: dict[str, Any] | None  # run_args.json: the training CLI's arguments
    run_args_path: Path | None
    step: int | None  # checkpoint_meta.json: global_step

    def trained(self, component: Literal["mapper", "lora"]) -> bool | None:
        """Whether training produced `component`, from the records; None when they do not say.

        cache_mapper_config.json is written only beside a saved mapper; run_args.json has the
        enable flags the training CLI sets from --parallel_kv_train_components."""
        if component == "mapper" and self.mapper_config is not None:
            return True
        args = self.run_args or {}
        flag = args.get("parallel_kv_enable_affine_map" if component == "mapper" else "parallel_kv_enable_judger_lora")
        if flag is not None:
            return bool(flag)
        modes = args.get("parallel_kv_train_components")
        if modes is not None:
            return modes == "both" or modes == ("mapper_only" if component == "mapper" else "lora_only")
        return None

    def mapper_setting(self, key: str) -> Any:
        """hidden_dim / metadata_features: cache_mapper_config.json first, then run_args.json (as the
        release's loader: the config file overrides the arguments)."""
        if self.mapper_config is not None and key in self.mapper_config:
            return self.mapper_config[key]
        return (self.run_args or {}).get(f"parallel_kv_mapper_{key}")

    @property
    def model_name(self) -> str | None:
        name = (self.run_args or {}).get("model_name")
        return str(name) if name else None


def release_records(root: Path) -> ReleaseRecords:
    """cache_mapper_config.json, checkpoint_meta.json and run_args.json of a release checkpoint.

    run_args.json is found as the release's post-eval finds it: beside the weights, else in the
    `source_run_dir` that checkpoint_meta.json names (a step checkpoint's training run).
    """
    meta = _optional_json(root / RELEASE_META)
    run_args_path: Path | None = root / RELEASE_RUN_ARGS
    if not run_args_path.is_file():
        run_args_path = None
        source = str((meta or {}).get("source_run_dir") or "").strip()
        if source and (Path(source).expanduser() / RELEASE_RUN_ARGS).is_file():
            run_args_path = Path(source).expanduser() / RELEASE_RUN_ARGS
    step = (meta or {}).get("global_step")
    return ReleaseRecords(
        mapper_config=_optional_json(root / RELEASE_MAPPER_CONFIG),
        run_args=read_json_object(run_args_path) if run_args_path else None,
        run_args_path=run_args_path,
        step=int(step) if isinstance(step, (int, float)) else None,
    )


def recorded_handoff(record: dict[str, Any] | None, where: Path) -> Handoff | None:
    """The handoff a psynth export recorded (None when there is no record or it has none)."""
    if record is None or record.get("handoff") is None:
        return None
    try:
        return Handoff.from_dict(record["handoff"])
    except (ValueError, TypeError) as e:
        raise LayoutError(f"{where / EXPORT_RECORD}: bad handoff {record['handoff']!r}: {e}") from e
