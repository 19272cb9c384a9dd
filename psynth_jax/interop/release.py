"""Export in the reference release's checkpoint layout, for its PyTorch runner.

The release's runner (`parallel-synthesis-single --checkpoint_dir DIR ...`, or
`--parallel_kv_load_dir DIR` of its other commands) loads, through `load_trainable_modules`:

    DIR/cache_mapper.pt              torch.save of LengthAwareAffineKVMapper.state_dict():
                                     exactly net.0.weight [h, in], net.0.bias [h], net.2.weight [4, h],
                                     net.2.bias [4], loaded with strict=True
    DIR/cache_mapper_config.json     {"hidden_dim": h, "metadata_features": "both" | ...}
    DIR/judger_lora/                 a PEFT adapter (PeftModel.from_pretrained)

`export_release` writes exactly that (cache_mapper.pt without torch, torch_pickle.py), plus our
psynth_export.json, which the runner ignores. It writes no run_args.json: the runner would read
it as defaults for every argument it was not given. The runner's handoff is the "release"
convention with eos-only workers; weights trained under another convention still load there,
but compute something else than they were trained for, so the export says so loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

from psynth_jax.interop.export import mapper_record, mapper_tensors, write_export_record, write_peft_adapter
from psynth_jax.interop.layout import RELEASE_HANDOFF, RELEASE_LORA, RELEASE_MAPPER, RELEASE_MAPPER_CONFIG
from psynth_jax.interop.staging import ExportError
from psynth_jax.interop.torch_pickle import write_torch_state_dict
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import Mapper

HANDOFF_NOTE = "HANDOFF_WARNING.txt"


def _fmt(h: Handoff) -> str:
    return f"{h.convention}/{h.stop_tokens}"


def handoff_warning(handoff: Handoff | None) -> str | None:
    """Why the release's runner will not compute what these weights were trained for (None: it will)."""
    want = _fmt(RELEASE_HANDOFF)
    if handoff is None:
        return (f"the exported weights record no handoff convention; the release's runner hands worker KV over "
                f"as {want} (the window [P-1, P+G-1), workers stopping on eos only). If they were trained "
                "another way, its results will differ from psynth's.")
    if handoff == RELEASE_HANDOFF:
        return None
    return (f"these weights were trained under the handoff {_fmt(handoff)}, but the release's runner hands worker KV "
            f"over as {want} (the window [P-1, P+G-1) and eos-only workers): it will run them, but not compute what "
            f"they were trained for. Serve them with psynth (handoff {_fmt(handoff)}), or retrain with "
            "handoff.convention=release and handoff.stop_tokens=eos_only for the release's runner.")


def export_release(model: LoadedModel, mapper: Mapper | None, out_dir: str | Path, *, handoff: Handoff | None,
                   embeddings: bool = False, source: str = "") -> str | None:
    """Write the release layout into `out_dir`; return the handoff warning (also written to
    HANDOFF_WARNING.txt there), or None when the release's runner matches the training handoff.

    `mapper` None: a LoRA-only checkpoint (the runner then loads judger_lora/ alone).
    `embeddings`: judger_lora/ carries embed_tokens / lm_head (a vocabulary aligned on import).
    """
    if mapper is not None and mapper.kind != "affine_length":
        raise ExportError(f"the release's runner has only the affine_length mapper; a {mapper.kind} mapper "
                          "cannot be exported in its format (use --format psynth)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_peft_adapter(model, out / RELEASE_LORA, embeddings=embeddings, handoff=handoff)
    if mapper is not None:
        write_torch_state_dict(mapper_tensors(mapper), out / RELEASE_MAPPER)
        record = mapper_record(mapper)
        (out / RELEASE_MAPPER_CONFIG).write_text(json.dumps(
            {"hidden_dim": record["hidden"], "metadata_features": record["metadata_features"]}, indent=2) + "\n")
    write_export_record(out, model, format="release", handoff=handoff, mapper=mapper, embeddings=embeddings,
                        source=source)
    warning = handoff_warning(handoff)
    if warning is not None:
        (out / HANDOFF_NOTE).write_text(f"WARNING: {warning}\n")
    return warning
