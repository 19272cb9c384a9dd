"""A memory plan before anyone spends accelerator time: every program a config runs, compiled for the target.

The train step's sibling (as MaxText's train_compile.py beside train.py): the same programs
(train/programs.py) compiled ahead of time for the slice a config will run on, from any host;
`psynth plan`.

Which compiler gives the figures:
- a Cloud TPU target with libtpu installed (`pip install -e '.[tpu]'`): the TPU compiler
  (XLA:TPU, Mosaic for the Pallas kernels), for the slice's own TPU devices (aot.tpu_devices).
  A training config is compiled on the whole slice with its full mesh and global batch, which
  is what runs (XLA:TPU refuses a part of a v5e slice: "device assignment should include all
  slice devices"); an eval config on one host's chips (hosts split the examples, each runs the
  config's mesh), as a slice of that size. Its verdict is the compiler's: a program fits when it
  compiles; one that does not fit is the compiler's RESOURCE_EXHAUSTED answer, with the bytes it
  needed and the largest buffers (XLA's memory-usage report, dumped for the plan).
- otherwise (a GPU node; no libtpu; `--compiler cpu`): an estimate, labelled so: the same
  programs compiled by the CPU compiler for fake CPU devices shaped like one data-parallel
  replica (data=1 x fsdp x tensor, its share of the batch), their total compared with 95% of
  the chip's memory. JAX has no deviceless CUDA compile (the GPU compiler needs a GPU), so GPU
  targets always get this estimate.

Programs: training: the train step at every batch shape the data guards admit
(`programs.admitted_train_shapes`), and, when the stage distills targets itself, the generation
that writes them (workers, text prefill, text decode) on the training mesh; eval: the workers'
generate, the handoff, prepare, the cache path's and the text path's prefill and decode
(`programs.PROGRAMS`) at the eval's shapes. Per program and device: `memory_analysis()`
(arguments, temporaries, outputs, peak), `cost_analysis()` (FLOPs, bytes), and on TPU the
collectives and Mosaic kernels in the compiled HLO (measure/hlo.py).

The compiles run in a child process (JAX fixes its devices when it starts, and the plan needs
fake CPU devices or libtpu's TPU ones, not this process's): `run_plan` spawns it and reads back
its JSON. Its progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from psynth_jax.config import load_config, resolve_mesh_shape
from psynth_jax.config.accelerators import GIB, Accelerator, parse_accelerator
from psynth_jax.config.eval_schema import load_eval_config
from psynth_jax.config.loader import _load_yaml_tree

# Fraction of a chip's memory the CPU estimate may use: the runtime, compiler scratch and
# fragmentation need the rest. (The TPU compiler knows its chip's limit itself.)
USABLE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan: a config file (+ overrides), its kind, the target, and how.

    branches / branch_tokens / prompt_tokens: eval shapes (None: the config's num_workers and
    worker_tokens); prompt_tokens is also the worker prompt of distillation. compiler: "auto"
    (TPU when the target is a TPU and libtpu is installed), "tpu" or "cpu". programs: only these
    (names as the report gives them; None: all). save_executable: a folder for each compiled
    program that fits (TPU).
    """

    config: str
    overrides: tuple[str, ...]
    accelerator: Accelerator
    kind: str  # "train" | "eval"
    branches: int | None = None
    branch_tokens: int | None = None
    prompt_tokens: int = 256
    compiler: str = "auto"
    programs: tuple[str, ...] | None = None
    save_executable: str | None = None

    def uses_tpu_compiler(self) -> bool:
        """Whether the TPU compiler gives the figures; ValueError when it is asked for and cannot."""
        from psynth_jax.train.aot import libtpu_version

        if self.compiler == "cpu":
            return False
        if self.compiler == "tpu" and not self.accelerator.is_tpu:
            raise ValueError(f"--compiler tpu: {self.accelerator} is not a TPU")
        if self.accelerator.is_tpu and self.accelerator.tpu_topology is None:
            if self.compiler == "tpu":
                raise ValueError(f"--compiler tpu: no TPU topology is known for {self.accelerator}")
            return False
        if self.accelerator.is_tpu and libtpu_version() is None:
            if self.compiler == "tpu":
                raise ValueError("--compiler tpu needs libtpu, the TPU compiler: pip install -e '.[tpu]'")
            return False
        return self.accelerator.is_tpu


def config_kind(path: str) -> str:
    """"eval" for a `psynth eval` config (it has `tasks`), else "train"."""
    tree = _load_yaml_tree(Path(path))
    return "eval" if isinstance(tree, dict) and "tasks" in tree else "train"


def load(req: PlanRequest) -> Any:
    return load_eval_config(req.config, req.overrides) if req.kind == "eval" else load_config(req.config, req.overrides)


def mesh_fits(req: PlanRequest) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of the config's mesh on the target; ValueError naming both otherwise.

    Training spans every chip of the slice; an eval runs its mesh on each host's own chips (the
    hosts split the examples), so an eval mesh is checked against one host's.
    """
    cfg = load(req)
    chips = req.accelerator.chips_per_host if req.kind == "eval" else req.accelerator.chips
    try:
        return resolve_mesh_shape(cfg.mesh, chips)
    except ValueError as err:
        where = f"one host ({chips} chips) of {req.accelerator}" if req.kind == "eval" else str(req.accelerator)
        raise ValueError(f"{req.config}: the mesh does not fit {where}: {err}") from None


# ------------------------------------------------------------------------------- the parent
def run_plan(req: PlanRequest, timeout_s: int = 6 * 3600) -> dict[str, Any]:
    """Compile the config's programs in a child process for the target; the plan with its verdict."""
    data, fsdp, tensor = mesh_fits(req)
    tpu = req.uses_tpu_compiler()
    payload = dict(dataclasses.asdict(req), overrides=list(req.overrides), accelerator=_accelerator_name(req.accelerator),
                   tpu=tpu)
    with tempfile.TemporaryDirectory(prefix="psynth_plan_") as tmp:
        env = dict(os.environ, JAX_PLATFORMS="cpu", PSYNTH_PLAN_OUT=os.path.join(tmp, "plan.json"))
        if tpu:
            from psynth_jax.train.aot import dump_flags

            dump = os.path.join(tmp, "xla_dump")
            # libtpu lets one process in at a time unless told that these are compile-only ones
            env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PSYNTH_PLAN_DUMP=dump, TF_CPP_MIN_LOG_LEVEL="3",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {dump_flags(dump)}".strip())
        else:
            # The CPU compiler has no bf16 arithmetic: it converts bf16 weights to f32 for every dot,
            # and its loop-invariant code motion would hoist those converts out of the layer loop,
            # keeping an f32 copy of every layer's weights alive at once (2x the parameters, an
            # artifact no TPU / GPU compile has). Without that pass only the running layer's copy
            # exists: an overestimate by about one layer's weights in f32 per device.
            env.update(JAX_NUM_CPU_DEVICES=str(fsdp * tensor),
                       XLA_FLAGS="--xla_disable_hlo_passes=while-loop-invariant-code-motion")
        proc = subprocess.run([sys.executable, "-m", "psynth_jax.train.plan", json.dumps(payload)], env=env,
                              stdout=subprocess.DEVNULL, timeout=timeout_s)
        out = Path(env["PSYNTH_PLAN_OUT"])
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the memory plan's compile failed (exit {proc.returncode}; its error is above)")
        plan = json.loads(out.read_text())
    return verdict(plan, req)


def _accelerator_name(acc: Accelerator) -> str:
    """A name parse_accelerator reads back as `acc`."""
    if acc.is_tpu:
        count = acc.chips * acc.chip.cores_per_chip_in_name
        return f"{'v5litepod' if acc.chip.name == 'v5e' else acc.chip.name}-{count}"
    return f"{acc.chips}x{acc.chip.name}"


def verdict(plan: dict[str, Any], req: PlanRequest) -> dict[str, Any]:
    """Add fits, the worst program and the largest item to a child's plan.

    TPU compiler: fits when every program compiled (the compiler's answer); the largest item is
    the largest buffer of a program that did not fit. CPU estimate: the largest program's total
    against USABLE_FRACTION of the chip; the largest item is the largest of the plan's items.
    """
    progs = plan["programs"]
    failed = [name for name, p in progs.items() if not p["fits"]]
    worst = failed[0] if failed else max(progs, key=lambda n: progs[n]["memory"]["total"])
    out = dict(plan, config=req.config, kind=req.kind, accelerator=str(req.accelerator), chip=req.accelerator.chip.name,
               chips=req.accelerator.chips, worst_program=worst)
    if plan["tpu"]:
        out["fits"] = not failed
        if failed:
            oom = progs[worst]["oom"]
            biggest = (oom.get("largest_buffers") or [None])[0]
            out["largest_item"] = (f"{biggest['bytes'] / GIB:.2f} GiB buffer {biggest['shapes']}" if biggest
                                   else "(the compiler named no buffer)") + f" in program {worst}"
        return out
    c = progs[worst]["memory"]
    usable = int(req.accelerator.chip.hbm_bytes * USABLE_FRACTION)
    parts = dict(plan["items"], compiled_temporaries=c["temporaries"])
    out.update(total=c["total"], usable=usable, fits=c["total"] <= usable, largest_item=max(parts, key=parts.get))
    return out


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a small report, GiB per device."""
    m = p["mesh"]
    lines = [f"memory plan: {p['config']} ({p['kind']}) on {p['accelerator']}",
             f"  compiler: {p['compiler']}",
             f"  compiled on: {p['compiled_on']}; mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
             "  per device (GiB):"]
    for name, b in p["items"].items():
        note = "  (inside the compiled buffers)" if name == "kv_caches" else ""
        lines.append(f"    {name:<24}{_gib(b):>8}{note}")
    lines.append(f"  {'program':<34}{'args':>7}{'temps':>7}{'out':>7}{'total':>7}{'peak':>7}  {'TFLOP':>7}{'GB':>7}"
                 "  shape")
    for name, r in p["programs"].items():
        if not r["fits"]:
            oom = r["oom"]
            need = (f"needs {_gib(oom['needed_bytes'])} of {_gib(oom['available_bytes'])}"
                    if "needed_bytes" in oom else oom["message"][:80])
            lines.append(f"  {name:<34}  DOES NOT FIT: {need}  [{r['shape']}]")
            continue
        mem, cost = r["memory"], r.get("cost", {})
        out = mem["outputs"] - mem["aliased"]
        lines.append(f"  {name:<34}{_gib(mem['arguments']):>7}{_gib(mem['temporaries']):>7}{_gib(out):>7}"
                     f"{_gib(mem['total']):>7}{_gib(mem['peak']) if 'peak' in mem else '-':>7}  "
                     f"{cost.get('flops', 0) / 1e12:>7.2f}{cost.get('bytes_accessed', 0) / 1e9:>7.1f}  [{r['shape']}]")
        hlo = r.get("hlo")
        if p["tpu"] and hlo:
            coll = ", ".join(f"{k} x{v['count']} {_gib(v['executed_bytes'])} GiB"
                             for k, v in sorted(hlo["collectives"].items()))
            kernels = sum(hlo["mosaic_kernels"].values())
            lines.append(f"  {'':<34}collectives: {coll or 'none'}; Mosaic kernels: {kernels}")
    lines.append("  (total = args + temps + generated code + outputs not aliased; peak = live bytes at the worst point; "
                 "TFLOP / GB: cost_analysis, one pass: loop bodies counted once, Mosaic kernels as free)")
    if p["tpu"]:
        lines.append("  (XLA:TPU lets its scheduler spend free HBM on temporaries (prefetch, overlap), so a total above "
                     "the chip can compile: the compiler's answer is the verdict, the peak the headroom)")
        lines.append(f"  fits (the TPU compiler compiled every program; largest: {p['worst_program']})" if p["fits"]
                     else f"  DOES NOT FIT: the largest item is {p['largest_item']}")
    else:
        lines.append(f"  largest program {p['worst_program']}: {_gib(p['total'])} of {_gib(p['usable'])} usable "
                     f"({USABLE_FRACTION:.0%} of {p['chip']}) -> " + ("fits" if p["fits"] else
                                                                      f"DOES NOT FIT: the largest item is {p['largest_item']}"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the child
def child_main(request_json: str) -> None:
    """Entry of the compile child: compile the request's programs; write the plan as JSON."""
    from psynth_jax.train import plan_child

    req = json.loads(request_json)
    started = time.perf_counter()
    plan = plan_child.compile_plan(req, load(PlanRequest(req["config"], tuple(req["overrides"]),
                                                         parse_accelerator(req["accelerator"]), req["kind"])))
    plan["wall_s"] = round(time.perf_counter() - started, 1)
    Path(os.environ["PSYNTH_PLAN_OUT"]).write_text(json.dumps(plan))


if __name__ == "__main__":
    child_main(sys.argv[1])
