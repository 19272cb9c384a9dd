"""Ahead-of-time compilation for a target this host does not have: its devices, and what its compiler says.

MaxText's train_compile.py checks a config before a slice is paid for by compiling the train
step for the slice's TPU topology on a CPU host; this module gives `psynth plan` the same pieces:

- `tpu_devices(accelerator)`: the TPU devices of a Cloud TPU slice, every chip of every host,
  from libtpu's topology description (`jax.experimental.topologies`). No TPU is needed, only
  libtpu (`pip install -e '.[tpu]'`: `jax[tpu]` pins the libtpu of the installed jax). A mesh
  built on them traces and compiles as on the slice: XLA:TPU's compiler, Mosaic for Pallas
  kernels, the chip's HBM as the limit.
- `compile_program(lowered)`: compile, and report memory (`memory_analysis`), cost
  (`cost_analysis`: FLOPs and bytes; XLA counts a while loop's body once and a Mosaic kernel as
  free, so read them as the matmul share of one pass), the collectives and Mosaic kernels in the
  compiled HLO (measure/hlo.py). A compiler that answers RESOURCE_EXHAUSTED gives a report that
  does not fit, with what it needed, what the chip offers and the largest buffers
  (`parse_oom`; XLA's memory-usage report when the compile dumps one, see `dump_flags`).
- `save_executable(compiled, path)`: the compiled program, serialized (jax's
  serialize_executable), for a pod run to load with the same jax and libtpu versions.

Compiling for the TPU's devices needs them in one process with libtpu loaded: libtpu guards
itself with a lockfile that lets one process at a time in unless ALLOW_MULTIPLE_LIBTPU_LOAD=1
(compile-only processes, such as the plan's children and parallel test workers, coexist with it).
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from psynth_jax.config.accelerators import GIB, Accelerator
from psynth_jax.measure import hlo

_UNITS = {"B": 1, "K": 2**10, "KiB": 2**10, "M": 2**20, "MiB": 2**20, "G": GIB, "GiB": GIB, "T": 2**40}


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def compiler_name(tpu: bool) -> str:
    """How the report names the compiler that gave its figures."""
    if tpu:
        return f"TPU compiler (XLA:TPU, libtpu {libtpu_version()}, jax {jax.__version__})"
    return f"CPU compiler on fake CPU devices (an estimate; jax {jax.__version__})"


def tpu_devices(accelerator: Accelerator) -> list[Any]:
    """Every TPU device of the slice, from libtpu's topology description; ValueError for a slice
    shape libtpu cannot describe."""
    from jax.experimental import topologies

    topo = accelerator.tpu_topology
    if topo is None:
        raise ValueError(f"{accelerator}: no TPU topology is known for this slice")
    devices = topologies.get_topology_desc(topology_name=topo.name, platform="tpu", chip_config_name=topo.chip_config,
                                           chips_per_host_bounds=topo.host_bounds).devices
    if len(devices) != accelerator.chips:
        raise ValueError(f"{accelerator}: libtpu's topology {topo.name} has {len(devices)} devices, not {accelerator.chips}")
    return list(devices)


def dump_flags(directory: str) -> str:
    """XLA_FLAGS that make the compiler write its memory-usage report (the largest buffers, named by
    shape) into `directory`, also for a compile that fails out of memory. Set before jax starts."""
    return f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE_"


def memory(compiled: Any) -> dict[str, int]:
    """`memory_analysis()` per device, bytes; total = arguments + temporaries + generated code +
    outputs not aliased with arguments; peak = the live bytes at the worst point (where the
    backend reports it: XLA:TPU does)."""
    m = compiled.memory_analysis()
    fields = {"arguments": "argument_size_in_bytes", "temporaries": "temp_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "generated_code": "generated_code_size_in_bytes"}
    out = {k: int(getattr(m, v, 0) or 0) for k, v in fields.items()}
    out["total"] = out["arguments"] + out["temporaries"] + out["generated_code"] + max(out["outputs"] - out["aliased"], 0)
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    if peak:
        out["peak"] = peak
    return out


def cost(compiled: Any) -> dict[str, float]:
    """`cost_analysis()`: FLOPs and bytes accessed of one pass (see the module doc for its limits)."""
    c = compiled.cost_analysis()
    c = (c[0] if c else {}) if isinstance(c, list) else (c or {})
    return {name: float(c[key]) for key, name in (("flops", "flops"), ("bytes accessed", "bytes_accessed"))
            if key in c}


def _size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def parse_oom(message: str) -> dict[str, Any]:
    """The compiler's RESOURCE_EXHAUSTED message -> needed and available bytes, largest buffers.

    XLA:TPU answers in one of two forms: an early check ("the total memory required for HLO
    temporaries (20.63G) exceeds available HBM (15.75G)", no buffer named) and buffer assignment's
    ("Used 16.28G of 15.75G hbm", then the largest allocations with their shapes).
    """
    out: dict[str, Any] = {"message": next((ln.strip() for ln in message.splitlines() if ln.strip()), "")[:500]}
    used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    early = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    for found in (used, early):
        if found:
            out["needed_bytes"] = _size(found.group(1), found.group(2))
            out["available_bytes"] = _size(found.group(3), found.group(4))
            break
    buffers = []
    for m in re.finditer(r"\n\s*\d+\.\s*Size:\s*([\d.]+)([KMGT])\n(.*?)(?=\n\s*\d+\.\s*Size:|\Z)", message, re.S):
        shape = re.search(r"Shape:\s*(\S+)", m.group(3))
        op = re.search(r'Operator:\s*op_name="?([^"\n]*)', m.group(3))
        buffers.append({"bytes": _size(m.group(1), m.group(2)), "shapes": shape.group(1) if shape else "?",
                        "op": op.group(1)[-200:] if op else None})
    if buffers:
        out["largest_buffers"] = buffers[:5]
    return out


def largest_buffers(dump_dir: str, top: int = 5) -> list[dict[str, Any]]:
    """The largest allocations of the module with the largest memory-usage report in `dump_dir`
    (the program just compiled): its size and the shapes of the values that share it."""
    best: tuple[int, str] = (-1, "")
    for path in glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")):
        text = Path(path).read_text()
        total = re.search(r"Total bytes: (\d+)", text)
        if total and int(total.group(1)) > best[0]:
            best = (int(total.group(1)), text)
    rows = {}
    for m in re.finditer(r"^\s*[\d.]+(?:B|KiB|MiB|GiB)\(\s*[\d.]+%\);\s*([\d.]+)(B|KiB|MiB|GiB);\s*(\d+);\s*\d+;\s*(.*)$",
                         best[1], re.M):
        rows[(int(m.group(3)), m.group(4))] = (_size(m.group(1), m.group(2)), m.group(4))
    return [{"bytes": size, "shapes": shapes[:300]} for size, shapes in sorted(rows.values(), reverse=True)[:top]]


def compile_program(lowered: Any, *, dump_dir: str | None = None, compiler_options: dict[str, str] | None = None,
                    executable_path: str | None = None) -> dict[str, Any]:
    """Compile `lowered` with its devices' compiler; {"fits", "compile_s", "memory", "cost", "hlo"}, or
    {"fits": False, "oom": parse_oom(...)} when the compiler runs out of the chip's memory.

    dump_dir: where XLA dumps (see `dump_flags`), emptied first; its report names the largest
    buffers. executable_path: serialize the compiled program there (`save_executable`).
    """
    if dump_dir:
        shutil.rmtree(dump_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
    except Exception as err:  # jax.errors.JaxRuntimeError; anything but an out-of-memory answer is re-raised
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        oom = parse_oom(text)
        if dump_dir and not oom.get("largest_buffers"):
            oom["largest_buffers"] = largest_buffers(dump_dir)
        return {"fits": False, "compile_s": round(time.perf_counter() - start, 1), "oom": oom}
    report: dict[str, Any] = {"fits": True, "compile_s": round(time.perf_counter() - start, 1),
                              "memory": memory(compiled), "cost": cost(compiled), "hlo": hlo.summary(compiled.as_text())}
    if dump_dir:
        report["largest_buffers"] = largest_buffers(dump_dir)
    if executable_path:
        report["executable"] = save_executable(compiled, executable_path)
    return report


def save_executable(compiled: Any, path: str) -> dict[str, Any]:
    """Serialize a compiled program (jax.experimental.serialize_executable: the payload and its
    argument / result trees, pickled together); {"path", "bytes"}. Loading it needs a backend of
    the same platform with the same jax and libtpu versions (`deserialize_and_load`)."""
    import pickle

    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"payload": payload, "in_tree": in_tree, "out_tree": out_tree, "jax": jax.__version__,
                     "libtpu": libtpu_version()}, f)
    return {"path": str(path), "bytes": os.path.getsize(path)}
