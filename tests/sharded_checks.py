"""The 8-device checks of tests/test_sharded.py, run in ONE child process with 8 fake CPU devices.

Usage: python sharded_checks.py TINY_ROOT OUT.json [SYNTHESIS_FAMILIES [PARTS]]. TINY_ROOT holds tiny checkpoints written by
the parent (tests/tiny_smol.py: `make_tiny_smol`), one folder per family. Writes a JSON
of measured facts the parent asserts on: per-device bytes against the sharded shares, the
largest read against the largest shard, and 1-device vs 8-device logits, greedy tokens and eval
records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from psynth_jax.inference.sampling import SamplingConfig  # noqa: E402
from psynth_jax.interop import loader  # noqa: E402
from psynth_jax.interop.sources import open_source  # noqa: E402
from psynth_jax.model.sharding import Rules, bytes_per_device, make_mesh, sharded_bytes, state_shardings  # noqa: E402
from psynth_jax.model.transformer import LoRAConfig  # noqa: E402
from psynth_jax.synthesis import prompts  # noqa: E402
from psynth_jax.synthesis.pipeline import ParallelSynthesis  # noqa: E402

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 times 11?"]
MESHES = {"fsdp2_tensor4": (1, 2, 4), "data2_fsdp2_tensor2": (2, 2, 2)}


class RecordingSource:
    """A TensorSource that remembers the size of every read (to bound what a process reads at once)."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, name, index=None):
        out = self.inner.read(name, index)
        self.reads.append((name, int(out.nbytes)))
        return out


def loading_facts(directory: Path, mesh_shape) -> dict:
    """Load with reads recorded: bytes per device vs the sharded shares, largest read vs largest shard."""
    mesh = make_mesh(mesh_shape)
    src = RecordingSource(open_source(directory))
    from psynth_jax.model.config import ModelConfig

    cfg = ModelConfig.from_hf(src.config_dict())
    _, state = loader.state_from_source(cfg, src, np.float32, None, mesh=mesh)
    shardings = state_shardings(state, mesh, Rules())
    leaves = jax.tree.leaves(state)
    share = sum(sharded_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, jax.tree.leaves(shardings)))
    whole = sum(x.nbytes for x in leaves)
    per_device = bytes_per_device(state)
    # the largest slice of ONE transformers tensor any device shard needs (a stacked leaf's shard is
    # read layer by layer)
    largest_shard_slice = max(
        sharded_bytes(x.shape, x.dtype, s) // (x.shape[0] if x.ndim == 3 else 1)
        for x, s in zip(leaves, jax.tree.leaves(shardings)))
    sharded = [str(s.spec) for s in jax.tree.leaves(shardings) if any(p is not None for p in s.spec)]
    return {"per_device": sorted(per_device.values()), "share": share, "whole": whole,
            "largest_read": max(n for _, n in src.reads), "largest_shard_slice": largest_shard_slice,
            "num_sharded_leaves": len(sharded), "num_leaves": len(leaves)}


def synthesis_run(directory: Path, mesh_shape, zero_copy: bool = False) -> dict:
    """Workers, cache path, text path and single agent, all greedy, on `mesh_shape`: tokens and logits;
    with `zero_copy`, also the zero-copy cache path (the synthesizer reading the worker rows in place)."""
    mesh = make_mesh(mesh_shape) if mesh_shape != (1, 1, 1) else make_mesh(mesh_shape, jax.devices()[:1])
    model = loader.load_model(directory, lora=LoRAConfig(rank=4, alpha=8.0), mesh=mesh)
    synth = ParallelSynthesis(model)
    convs = [[prompts.worker_messages(q)] * 2 for q in QUESTIONS]
    w = synth.run_workers(convs, max_new_tokens=10, sampling=SamplingConfig(), seed=0)
    cache = synth.cache_path(QUESTIONS, w.branches, max_new_tokens=8)
    rebuilt = synth.branches_from_tokens([[synth.gen.chat_tokens(c) for c in conv] for conv in convs], w.tokens,
                                         w.stopped)
    again = synth.cache_path(QUESTIONS, rebuilt, max_new_tokens=8)
    text = synth.text_path(QUESTIONS, w.texts, max_new_tokens=8)
    single = synth.single_agent(QUESTIONS, max_new_tokens=8)
    k_spec = str(w.branches.k.sharding.spec) if hasattr(w.branches.k.sharding, "spec") else ""
    out = {"workers": w.tokens, "cache": cache.tokens, "rebuilt": again.tokens, "text": text.tokens,
           "single": single.tokens, "cache_logits": cache.first_logits.tolist(),
           "text_logits": text.first_logits.tolist(), "branch_k_spec": k_spec}
    if zero_copy:
        zc = ParallelSynthesis(model, zero_copy=True)
        wz = zc.run_workers(convs, max_new_tokens=10, sampling=SamplingConfig(), seed=0)
        viewed = zc.cache_path(QUESTIONS, wz.branches, max_new_tokens=8)
        out.update(zero_copy=viewed.tokens, zero_copy_logits=viewed.first_logits.tolist())
    return out


def eval_records(directory: Path, mesh_shape, out_dir: Path) -> list:
    """A tiny `psynth eval` (GSM8K, 2 examples, every mode) on `mesh_shape`: its records, untimed fields."""
    from psynth_jax.config.eval_schema import EvalConfig, EvalTaskConfig
    from psynth_jax.config.schema import MeshConfig, ModelSourceConfig
    from psynth_jax.eval.runner import run_eval

    cfg = EvalConfig(model=ModelSourceConfig(source=str(directory), dtype="float32"),
                     tasks=(EvalTaskConfig(name="gsm8k", limit=2),), num_workers=2, worker_tokens=8,
                     max_new_tokens=6, batch_size=2, timing_repeats=0, out_dir=str(out_dir),
                     mesh=MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]))
    run_eval(cfg, quiet=True)
    rows = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    return sorted([r["task"], r["id"], r["mode"], r["text"], r["answer"], r["correct"]] for r in rows)


def main(root: str, out: str, synthesis: str = "llama,qwen2,qwen3", parts: str = "loading,eval") -> None:
    """Facts for every family folder under `root`: loading (when in `parts`), synthesis runs for the
    families named in `synthesis` (comma-separated), and eval on tiny_llama (when in `parts`)."""
    assert jax.device_count() == 8, jax.devices()
    root_dir = Path(root)
    wanted, parts_ = set(filter(None, synthesis.split(","))), set(filter(None, parts.split(",")))
    facts: dict = {"loading": {}, "synthesis": {}, "eval": {}}
    for family_dir in sorted(p for p in root_dir.iterdir() if p.is_dir() and p.name.startswith("tiny_")):
        family = family_dir.name.removeprefix("tiny_")
        if "loading" in parts_:
            facts["loading"][family] = {name: loading_facts(family_dir, shape) for name, shape in MESHES.items()}
        if family not in wanted:
            continue
        meshes = MESHES if family == "llama" else {"data2_fsdp2_tensor2": MESHES["data2_fsdp2_tensor2"]}
        zc = family == "llama"  # the zero-copy path once, on one device and on the 2 x 2 x 2 mesh
        facts["synthesis"][family] = {
            "one_device": synthesis_run(family_dir, (1, 1, 1), zero_copy=zc),
            **{n: synthesis_run(family_dir, s, zero_copy=zc and n == "data2_fsdp2_tensor2") for n, s in meshes.items()}}
    if "eval" in parts_:
        llama = root_dir / "tiny_llama"
        facts["eval"] = {"one_device": eval_records(llama, (1, 1, 1), root_dir / "eval_1"),
                         "data2_fsdp2_tensor2": eval_records(llama, (2, 2, 2), root_dir / "eval_8")}
    Path(out).write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
