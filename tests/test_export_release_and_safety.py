"""`psynth export`: our run in the release's layout, the handoff records, and output-directory safety.

- a `psynth train` run (written as the trainer leaves one, affine_length mapper, trained under
  the default output_tokens/chat handoff) exported with `--format release`: cache_mapper.pt loads
  with `torch.load` + a strict state-dict load, judger_lora/ with `PeftModel.from_pretrained`
  (same logits as our LoRA), the mismatched handoff is said on stderr and in a note file, and
  the re-import gives the same weights and cache-path logits;
- every export records its handoff (psynth_export.json, safetensors metadata), and an import
  reads it back;
- issue #18: --out is never the backbone's or the input's directory, never silently
  overwritten, never left with a stale mapper or half an export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import hf_models
import release_fixtures as rf
from psynth_jax.interop.export import export_adapter
from psynth_jax.interop.importer import import_weights, with_adapter
from psynth_jax.interop.loader import load_model
from psynth_jax.interop.staging import ExportError
from test_interop_cli import run_cli, synthesizer, write_run
from test_interop_export import jax_logits, torch_logits
from test_interop_release import cache_logits, weights_of

TOKENS = np.random.default_rng(2).integers(6, 211, (2, 12))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """(tiny llama base with tokenizer, a run with an affine_length mapper, that run loaded, a run with a
    per_head_affine mapper)."""
    root = tmp_path_factory.mktemp("ours")
    base = root / "base"
    hf_models.make_tiny_sharp("llama", False, base, seed=4)
    hf_models.save_tiny_tokenizer(base)
    run = root / "run"
    write_run(base, run, "affine_length")
    synth = synthesizer(base)
    synth, _ = with_adapter(synth, run)
    write_run(base, root / "per_head", "per_head_affine")
    return base, run, synth, root / "per_head"


def digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_our_run_in_the_release_layout(ours, tmp_path, capsys):
    base, run, synth, _ = ours
    out = tmp_path / "release"
    assert run_cli(["--run", str(run), "--format", "release", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: these weights were trained under the handoff output_tokens/chat, but the release's runner " \
           "hands worker KV over as release/eos_only" in err
    assert "HANDOFF_WARNING.txt" in err and (out / "HANDOFF_WARNING.txt").read_text().startswith("WARNING: ")
    assert {p.name for p in out.iterdir()} == {"cache_mapper.pt", "cache_mapper_config.json", "judger_lora",
                                               "psynth_export.json", "HANDOFF_WARNING.txt"}  # no run_args.json
    # the release's loader: torch.load + load_state_dict(strict=True), PeftModel.from_pretrained
    state = torch.load(out / "cache_mapper.pt", weights_only=True)
    torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4)).load_state_dict(
        {k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    rf.CacheMapper().load_state_dict(state, strict=True)
    np.testing.assert_array_equal(state["net.2.weight"].numpy(), weights_of(synth)["mapper"]["net"]["w1"].T)
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                out / "judger_lora").eval()
    assert np.abs(torch_logits(peft_model, TOKENS) - jax_logits(synth.model, TOKENS, True)).max() <= 1e-4
    # re-import: the same weights, the same cache-path logits, the run's handoff read back
    again = synthesizer(base)
    again, loaded = with_adapter(again, out)
    desc = loaded.description
    assert desc.endswith("handoff output_tokens/chat (recorded in psynth_export.json)")
    jax.tree.map(np.testing.assert_array_equal, weights_of(again), weights_of(synth))
    np.testing.assert_array_equal(cache_logits(again), cache_logits(synth))


def test_handoff_is_recorded_in_every_export_and_read_back(ours, tmp_path):
    base, run, synth, _ = ours
    out = tmp_path / "both"
    run_cli(["--run", str(run), "--out", str(out), "--handoff-convention", "release"])  # an explicit choice
    want = {"convention": "release", "stop_tokens": "chat"}
    for kind, weights in (("merged", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        record = json.loads((out / kind / "psynth_export.json").read_text())
        assert record["handoff"] == want and record["format"] == ("merged" if kind == "merged" else "psynth")
        with safe_open(str(out / kind / weights), "np") as f:
            assert json.loads(f.metadata()["psynth_handoff"]) == want
    assert json.loads((out / "adapter" / "psynth_export.json").read_text())["mapper"] == {
        "kind": "affine_length", "hidden": 32, "metadata_features": "both", "num_kv_heads": None}
    imported = import_weights(out / "adapter", load_model(base))
    assert imported.handoff.as_dict() == want and imported.handoff_source == "recorded in psynth_export.json"
    # the psynth format round trip: the recorded handoff is applied, and the logits are the run's own
    # under that handoff (and not those under the handoff it was trained with: the choice matters)
    again = synthesizer(base)
    again, _ = with_adapter(again, out / "adapter")
    assert again.handoff.as_dict() == want
    same = synthesizer(base)
    same, _ = with_adapter(same, run, convention="release")
    np.testing.assert_array_equal(cache_logits(again), cache_logits(same))
    assert np.abs(cache_logits(again) - cache_logits(synth)).max() > 1e-3
    # chosen to match the release's runner: no warning
    rel = tmp_path / "rel"
    run_cli(["--run", str(run), "--format", "release", "--out", str(rel), "--handoff-convention", "release",
             "--worker-stop-tokens", "eos_only"])
    assert not (rel / "HANDOFF_WARNING.txt").exists()


# ------------------------------------------------------------------- output safety
def test_out_is_never_the_backbone_or_the_input(ours, tmp_path):
    base, run, _, _ = ours
    before = digest(base), digest(run)
    for out, what in [(base, r"is the backbone's directory"), (base.parent, r"contains the backbone's directory"),
                      (run, r"is the input being exported")]:
        with pytest.raises(ExportError, match=f"--out {out} {what}"):
            run_cli(["--run", str(run), "--out", str(out), "--force", "--merged"])
    assert (digest(base), digest(run)) == before


def test_non_empty_out_needs_force_which_replaces_it_whole(ours, tmp_path):
    _, run, _, _ = ours
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"--out .*out is not empty \(1 entries: notes.txt\); pass --force"):
        run_cli(["--run", str(run), "--out", str(out), "--adapter"])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    run_cli(["--run", str(run), "--out", str(out), "--adapter", "--force"])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "mapper.safetensors", "mapper_config.json", "psynth_export.json"}
    assert not list(tmp_path.glob(".out.psynth-*"))  # no staging or replaced copies left


def test_no_stale_mapper_beside_a_new_lora(ours, tmp_path):
    base, run, synth, _ = ours
    out = tmp_path / "adapter"
    run_cli(["--run", str(run), "--out", str(out), "--adapter"])
    plain = Path(shutil.copytree(out, tmp_path / "plain"))  # a PEFT adapter alone
    for name in ("mapper.safetensors", "mapper_config.json", "psynth_export.json"):
        (plain / name).unlink()
    run_cli(["--adapter-dir", str(plain), "--model", str(base), "--out", str(out), "--adapter", "--force"])
    assert not (out / "mapper.safetensors").exists() and not (out / "mapper_config.json").exists()
    assert json.loads((out / "psynth_export.json").read_text())["mapper"] is None
    # the library call into an existing directory removes the stale mapper too
    lib = Path(shutil.copytree(tmp_path / "plain", tmp_path / "lib"))
    (lib / "mapper.safetensors").write_bytes((tmp_path / "adapter").joinpath("adapter_model.safetensors").read_bytes())
    export_adapter(synth.model, None, lib)
    assert not (lib / "mapper.safetensors").exists()
    # and an import refuses a mapper its record says is not there
    (lib / "mapper.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mapper.safetensors is stale: .*psynth_export.json says this export has no mapper"):
        import_weights(lib, load_model(base))


def test_out_that_is_a_file_and_failed_exports_leave_nothing(ours, tmp_path):
    _, run, _, per_head_run = ours
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"--out .*file is a file; give a directory"):
        run_cli(["--run", str(run), "--out", str(tmp_path / "file")])
    assert (tmp_path / "file").read_text() == "x"
    # a per-head mapper has no place in the release's layout: refused after loading, nothing left behind
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ExportError, match="only the affine_length mapper; a per_head_affine mapper cannot be exported"):
        run_cli(["--run", str(per_head_run), "--format", "release", "--out", str(out)])
    assert not (tmp_path / "a").exists()
    # an existing out keeps its contents when the export fails
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "old.txt").write_text("old")
    with pytest.raises(ExportError):
        run_cli(["--run", str(per_head_run), "--format", "release", "--out", str(keep), "--force"])
    assert [p.name for p in keep.iterdir()] == ["old.txt"]
    with pytest.raises(ExportError, match="--format release writes the release's layout only"):
        run_cli(["--run", str(run), "--format", "release", "--merged", "--out", str(tmp_path / "x")])
