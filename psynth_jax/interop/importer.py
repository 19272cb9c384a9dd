"""Import trained synthesizer weights from any supported folder, and load them into a pipeline.

`import_weights(path, model)` resolves the folder (layout.py: a `psynth train` run, our adapter
export, a plain PEFT adapter, the reference release's checkpoint as it ships), checks that the
parts it should hold are there, reads and validates all of them against `model` (adapter.py),
and only then builds the new backbone: a bad folder loads nothing. It also says what the weights
were trained under (the handoff convention and worker stop tokens, synthesis/handoff.py):

- a run: its config's `handoff:`; our exports: what psynth_export.json (or the adapter's
  safetensors metadata) records;
- a release checkpoint: the release's own handoff, `Handoff("release", "eos_only")`;
- a plain PEFT adapter: nothing (None).

`with_adapter(synth, path)` builds the ParallelSynthesis that runs an import: `synth`'s settings
with the imported backbone (LoRA and vocabulary), mapper and handoff, and one line saying what it
loaded and chose. An explicit handoff choice (`convention=` / `stop_tokens=`, from
`--handoff-convention`, `--worker-stop-tokens` or an eval config's `handoff:` section) wins over
the recorded one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from psynth_jax.interop.adapter import (
    AdapterError, PeftWeights, apply_peft_adapter, describe_lora, describe_mapper, load_mapper, read_peft_adapter,
    without_trained_lora,
)
from psynth_jax.interop.export import HANDOFF_METADATA
from psynth_jax.interop.layout import (
    EXPORT_RECORD, MAPPER_WEIGHTS, RELEASE_HANDOFF, RELEASE_LORA, RELEASE_MAPPER, RELEASE_RUN_ARGS, Layout,
    LayoutError, ReleaseRecords, recorded_handoff, release_records, resolve,
)
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.interop.runs import restore_run
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import Mapper, make_mapper
from psynth_jax.synthesis.pipeline import ParallelSynthesis


def describe_handoff(h: Handoff) -> str:
    return f"{h.convention}/{h.stop_tokens}"


@dataclasses.dataclass
class Imported:
    """One set of trained weights, read, checked and applied to a backbone (nothing else changed)."""

    layout: Layout
    model: LoadedModel  # the backbone with the LoRA (and, when the adapter carries them, its embeddings)
    mapper: Mapper | None  # None: the folder holds no mapper
    handoff: Handoff | None  # what the weights were trained under; None: nothing says
    handoff_source: str  # where `handoff` comes from, for descriptions
    embeddings: bool  # the LoRA carried embed_tokens / lm_head (the vocabulary was aligned to it)
    parts: list[str]  # the one-line description, in pieces

    def describe(self) -> str:
        return ", ".join(self.parts)


def import_weights(path: str | Path, model: LoadedModel) -> Imported:
    """Read the weights at `path` for `model` (see the module docstring); `model` is not changed."""
    layout = resolve(path)
    if layout.kind == "run":
        run = restore_run(layout.root, model)
        handoff = Handoff.from_config(run.config.handoff)
        parts = [f"trained: run {layout.root} step {run.step}", f"mapper {describe_mapper(run.mapper)}",
                 describe_lora(run.model.lora)]
        return Imported(layout, run.model, run.mapper, handoff, "recorded in the run", False, parts)
    return _import_files(layout, model)


def _import_files(layout: Layout, model: LoadedModel) -> Imported:
    release = layout.kind == "release"
    records = release_records(layout.root) if release else None
    _check_components(layout, records)
    peft = read_peft_adapter(model, layout.lora_dir) if layout.lora_dir is not None else None
    mapper = None
    if layout.mapper_file is not None:
        settings = None
        if layout.mapper_file.name == RELEASE_MAPPER and records is not None:
            settings = {k: records.mapper_setting(k) for k in ("hidden_dim", "metadata_features")}
        mapper = load_mapper(layout.mapper_file, model.cfg.num_kv_heads, settings=settings)
    handoff, source = _trained_handoff(layout, peft)
    # everything is read and checked: build
    new = apply_peft_adapter(model, peft) if peft is not None else without_trained_lora(model)

    parts = [f"release checkpoint: {layout.where}" + (f" step {records.step}" if records and records.step else "")
             if release else f"adapter: {layout.where}"]
    if mapper is not None:
        parts.append(f"mapper {describe_mapper(mapper)} ({layout.mapper_file.name})")
    else:
        where = f"no {RELEASE_MAPPER}" if release else "none in the adapter dir"
        parts.append(f"mapper: {where}, identity")
    if peft is not None:
        parts.append(describe_lora(peft.lora) + (f" ({RELEASE_LORA}/)" if layout.lora_dir != layout.root else ""))
        if peft.vocab_size is not None:
            parts.append(_vocabulary_note(model, peft))
    else:
        parts.append(f"LoRA: no {RELEASE_LORA}/, B = 0")
    if records is not None and records.model_name and Path(records.model_name).name != Path(model.source).name:
        parts.append(f"note: trained on {records.model_name} ({RELEASE_RUN_ARGS}), this backbone is {model.source}")
    return Imported(layout, new, mapper, handoff, source, peft is not None and peft.vocab_size is not None, parts)


def _check_components(layout: Layout, records: ReleaseRecords | None) -> None:
    """A part the folder's records say was trained must be there; a part they say is absent must not."""
    record = layout.record
    if record is not None:  # written by psynth: it lists exactly what it wrote
        listed = record.get("mapper") is not None
        present = layout.mapper_file is not None
        if listed and not present:
            name = RELEASE_MAPPER if layout.kind == "release" else MAPPER_WEIGHTS
            raise LayoutError(f"{layout.root / EXPORT_RECORD} lists a mapper, but {layout.root / name} is missing")
        if present and not listed:
            raise LayoutError(f"{layout.mapper_file} is stale: {layout.root / EXPORT_RECORD} says this export has "
                              "no mapper; remove the file or re-export")
    if records is not None:
        if layout.mapper_file is None and records.trained("mapper"):
            raise LayoutError(f"{layout.root} has no {RELEASE_MAPPER}, but its records ({_said_by(layout, records)}) "
                              "say a mapper was trained: the checkpoint is incomplete")
        if layout.lora_dir is None and records.trained("lora"):
            raise LayoutError(f"{layout.root} has no {RELEASE_LORA}/, but its records ({_said_by(layout, records)}) "
                              "say a LoRA was trained: the checkpoint is incomplete")


def _said_by(layout: Layout, records: ReleaseRecords) -> str:
    names = []
    if records.mapper_config is not None:
        names.append("cache_mapper_config.json")
    if records.run_args_path is not None:
        names.append(str(records.run_args_path))
    return ", ".join(names) or str(layout.root)


def _trained_handoff(layout: Layout, peft: PeftWeights | None) -> tuple[Handoff | None, str]:
    recorded = recorded_handoff(layout.record, layout.root)
    if recorded is not None:
        return recorded, f"recorded in {EXPORT_RECORD}"
    if peft is not None and HANDOFF_METADATA in peft.metadata:
        try:
            return Handoff.from_dict(json.loads(peft.metadata[HANDOFF_METADATA])), "recorded in the adapter"
        except (ValueError, TypeError) as e:
            raise AdapterError(f"{peft.path}: bad {HANDOFF_METADATA} metadata: {e}") from e
    if layout.kind == "release" and layout.record is None:
        return RELEASE_HANDOFF, "selected for a release checkpoint"
    return None, ""


def _vocabulary_note(model: LoadedModel, peft: PeftWeights) -> str:
    parts = "+".join(n for n, t in (("embed_tokens", peft.embed), ("lm_head", peft.lm_head)) if t is not None)
    v = peft.vocab_size
    if v == model.cfg.vocab_size:
        return f"{parts} from the adapter ({v} tokens)"
    return (f"vocabulary aligned to the adapter: {model.cfg.vocab_size} -> {v} tokens ({parts} from the adapter, "
            "as the release's align_model_vocab_to_adapter)")


def choose_handoff(current: Handoff, imported: Handoff | None, source: str, *, convention: str | None = None,
                   stop_tokens: str | None = None) -> tuple[Handoff, str]:
    """The handoff to run with, and how it was chosen, in words.

    An explicit `convention` / `stop_tokens` (None: not chosen) wins; the rest comes from what
    the weights were trained under, else stays `current`.
    """
    chosen = Handoff.from_config(convention=convention, stop_tokens=stop_tokens,
                                 base=imported if imported is not None else current)
    if convention is None and stop_tokens is None:
        if imported is None:
            return chosen, f"handoff {describe_handoff(chosen)} (none recorded in the weights: kept)"
        return chosen, f"handoff {describe_handoff(chosen)} ({source})"
    if imported is not None and imported != chosen:
        return chosen, (f"handoff {describe_handoff(chosen)} (your choice; the weights were trained under "
                        f"{describe_handoff(imported)})")
    return chosen, f"handoff {describe_handoff(chosen)} (your choice)"


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """What `with_adapter` loaded: its one-line description and which parts were trained."""

    description: str
    handoff: Handoff  # the new synthesizer's
    mapper_trained: bool  # False: the folder had no mapper (identity now)
    lora_trained: bool  # False: the folder had no LoRA (B = 0 now)

    def __str__(self) -> str:
        return self.description


def with_adapter(synth: ParallelSynthesis, path: str | Path, *, convention: str | None = None,
                 stop_tokens: str | None = None) -> tuple[ParallelSynthesis, LoadedWeights]:
    """`synth` with the trained weights at `path` (any folder `import_weights` reads), and one line
    saying what was loaded and which handoff was chosen.

    The new synthesizer has `synth`'s settings, the imported backbone (its LoRA and an adapter's
    vocabulary; the other arrays shared), the imported mapper (a folder without one gives the
    identity mapper, what the release computes without cache_mapper.pt) and the handoff
    `choose_handoff` picks. `synth` itself is unchanged, also when the folder fails to load.
    """
    imported = import_weights(path, synth.model)
    handoff, how = choose_handoff(synth.handoff, imported.handoff, imported.handoff_source,
                                  convention=convention, stop_tokens=stop_tokens)
    mapper = imported.mapper if imported.mapper is not None else make_mapper("affine_length",
                                                                             imported.model.cfg.num_kv_heads)
    new = dataclasses.replace(synth, model=imported.model, mapper=mapper, handoff=handoff)
    lora = imported.layout.kind == "run" or imported.layout.lora_dir is not None
    return new, LoadedWeights(f"{imported.describe()}, {how}", handoff, imported.mapper is not None, lora)
