"""The one harness every benchmark runs on: options, columns, timings, metadata, results, plots.

A benchmark module (`psynth bench <name>`, or `python -m benchmarks.<name>`) declares its own
options (`add_arguments`, with `add_common_arguments` for the shared ones), its columns
(`Column`s) and definitions, and measures its rows; everything around that is here:
- options: `add_common_arguments`, the argparse types `int_list` / `arch_type`, `resolve_arch`,
  `resolve_dtype`, and `command_line`, the `psynth bench ...` line that reproduces a run;
- timings: `Recorder`, which keeps each timed function's compile call and timed calls per row;
- the printed table: `format_header` / `format_row` / `format_table` (a missing value prints as
  OOM when its path ran out of memory, ERR when the row failed, else "-");
- results: `base_metadata` (what ran, where, how to reproduce it), `report` (table on stderr, the
  JSON and the PNG), `write_json`;
- plots: `pyplot_or_none`, `plain_formatter`, `log2_x`, `save_figure`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from psynth_jax.config.schema import AttnImpl
from psynth_jax.measure.timing import Timing
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.presets import PRESETS, hub_id, preset
from psynth_jax.model.transformer import LoRAConfig

SCHEMA_VERSION = 1
WEIGHTS_NOTE = "random weights, KV and tokens: timing does not depend on their values"

Column = tuple[str, str, str]  # (title, row key, format)


def add_common_arguments(p: argparse.ArgumentParser, *, name: str, repeats: int = 3) -> None:
    """--arch, --dtype, --attn-impl, --repeats, --seed, --out, --no-plot (same meaning in every benchmark)."""
    p.add_argument("--arch", type=arch_type, default="tiny-llama",
                   help=f"architecture preset ({', '.join(PRESETS)}) or a transformers config.json / model dir; "
                        "weights are random (timing does not depend on them)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter/cache/activation dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--attn-impl", default="xla", choices=attn_impls(),
                   help="attention kernel (cudnn: GPU only; splash: TPU only)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls per measurement (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--out", default="runs/bench", help=f"output directory ({name}.json, {name}.png)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def arch_type(text: str) -> str:
    """argparse type: a preset name or an existing config.json / model dir (anything else is reported)."""
    if not Path(text).exists():
        try:
            preset(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def resolve_arch(arch: str) -> tuple[ModelConfig, str, str | None]:
    """(ModelConfig, display name, hub id) for a preset name or a config.json path / model dir."""
    path = Path(arch)
    if path.exists():
        return ModelConfig.from_hf(path), str(path), None
    return preset(arch), arch.strip().lower(), hub_id(arch)


def resolve_dtype(dtype: str) -> str:
    """"auto" -> float32 on CPU, bfloat16 on GPU/TPU; any other name as given."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def attn_impls() -> list[str]:
    """The attention kernels the experiment config accepts (psynth_jax.config.schema.AttnImpl)."""
    return list(typing.get_args(AttnImpl))


def command_line(benchmark: str, args: argparse.Namespace, options: Sequence[str], switches: Sequence[str] = (),
                 **resolved: Any) -> str:
    """The canonical `psynth bench <benchmark> ...` line reproducing a run (recorded in the JSON).

    options: argparse dests written as `--dest value` (lists comma-joined, None skipped);
    switches: store_true dests written as a bare flag when set; resolved: dest -> value overriding
    args (e.g. the dtype "auto" resolved to).
    """
    argv = ["psynth", "bench", benchmark]
    for dest in options:
        value = resolved.get(dest, getattr(args, dest, None))
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += ["--" + dest.replace("_", "-"), str(value)]
    argv += ["--" + d.replace("_", "-") for d in switches if getattr(args, d, False)]
    return shlex.join(argv)


def base_metadata(benchmark: str, cfg: ModelConfig, *, arch: str, hub: str | None, dtype: str, attn_impl: str,
                  command: str | None, repeats: int, seed: int, schema_version: int = SCHEMA_VERSION,
                  weights_note: str = WEIGHTS_NOTE) -> dict[str, Any]:
    """The metadata every benchmark JSON starts with (what ran, where, how to reproduce it)."""
    return {
        "benchmark": benchmark,
        "schema_version": schema_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "arch": arch,
        "hub_id": hub,
        "model_config": dataclasses.asdict(cfg),
        "num_params": cfg.num_params(),
        "weights": "random",
        "weights_note": weights_note,
        "dtype": dtype,
        "attn_impl": attn_impl,
        "repeats": repeats,
        "seed": seed,
        "device": device_info(),
        "versions": versions(),
    }


def main(benchmark: str) -> int:
    """`python -m benchmarks.<module> ...`: the same as `psynth bench <benchmark> ...` (its checks included)."""
    from psynth_jax.cli.bench import main as bench_main  # the CLI sits above the package's layers

    return bench_main([benchmark, *sys.argv[1:]])


def say(tag: str, msg: str) -> None:
    print(f"[bench {tag}] {msg}", file=sys.stderr, flush=True)


class Recorder:
    """Each timed function's compile-inclusive first call and timed calls (ms) for one row."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}

    def record(self, name: str, t: Timing) -> float:
        """Keep `t` under `name`; return its median, ms."""
        self.first[name] = round(1e3 * t.first_s, 4)
        self.times[name] = [round(1e3 * x, 4) for x in t.times_s]
        return t.median_ms

    def fields(self) -> dict[str, Any]:
        return {"first_call_ms": self.first, "times_ms": self.times}


def _width(title: str, fmt: str) -> int:
    sample: Any = "" if "s}" in fmt else (0 if "d}" in fmt else 0.0)
    if "[1]" in fmt:  # a [low, high] pair, e.g. "{0[0]:.2f}-{0[1]:.2f}"
        sample = (sample, sample)
    return max(len(fmt.format(sample)), len(title))


def format_header(columns: Sequence[Column]) -> str:
    return "  ".join(t.rjust(_width(t, f)) for t, _, f in columns)


def format_row(row: dict[str, Any], columns: Sequence[Column], paths: Sequence[str] = ()) -> str:
    """One row; a missing value prints as OOM when the row records `<path>_error` for the path its
    key starts with (of `paths`), ERR when the row records an error, else "-"."""
    cells = []
    for title, key, fmt in columns:
        v = row.get(key)
        if v is not None:
            text = fmt.format(v)
        elif any(key.startswith(p) and f"{p}_error" in row for p in paths):
            text = "OOM"
        else:
            text = "ERR" if row.get("error") else "-"
        cells.append(text.rjust(_width(title, fmt)))
    return "  ".join(cells)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], paths: Sequence[str] = ()) -> str:
    """Header + one line per row (see `format_row`)."""
    return "\n".join([format_header(columns)] + [format_row(r, columns, paths) for r in rows])


def lora_rank_of(lora: LoRAConfig | None) -> int:
    return 0 if lora is None else lora.rank


def report(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[Column],
           args: argparse.Namespace, plot: Callable[[dict[str, Any], list[dict[str, Any]], Path], Path | None] | None,
           paths: Sequence[str] = ()) -> None:
    """Print the table on stderr, stamp the end-of-run host load, write `<out>/<name>.json` and,
    unless --no-plot (or no plot), `<name>.png`."""
    print(format_table(rows, columns, paths), file=sys.stderr, flush=True)
    stamp_end(meta)
    out = Path(args.out)
    say(name, f"wrote {write_json(out / f'{name}.json', meta, rows)}")
    png = plot(meta, rows, out / f"{name}.png") if plot is not None and not getattr(args, "no_plot", False) else None
    if png is not None:
        say(name, f"wrote {png}")


def describe_run(name: str, arch: str, cfg: ModelConfig, meta: dict[str, Any], extra: str = "") -> None:
    """The line every model benchmark starts with: shape, random weights, dtype, kernel, device."""
    dev = meta["device"]
    say(name, f"{arch}: {cfg.num_params() / 1e9:.3f}B params, RANDOM weights, {meta['dtype']}, "
              f"attn={meta['attn_impl']}, on {dev['device_kind']} [{dev['platform']}]" + (f"; {extra}" if extra else ""))


def device_info() -> dict[str, Any]:
    """The device timed (the first of jax.devices()) and the host: what every result names. The
    host CPU's model, vendor and vector/matrix ISA flags say which CPU kind a CPU timing is of
    (the same command ranks JAX and PyTorch differently on an AMD EPYC and an Intel Xeon)."""
    devices = jax.devices()
    d = devices[0]
    cpu = cpu_info()
    return {
        "platform": d.platform,
        "device_kind": getattr(d, "device_kind", d.platform),
        "num_devices": len(devices),
        "used_devices": 1,
        "host_cpu": cpu["model"],
        "host_cpu_vendor": cpu["vendor"],
        "host_cpu_flags": cpu["flags"],
        "host_cpu_threads_per_core": cpu["threads_per_core"],
        "host_cpu_count": os.cpu_count(),
        "host_cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "host_load_avg_1m": load_average(),
        "host_load_avg_start": load_averages(),
    }


def stamp_end(meta: dict[str, Any]) -> None:
    """Record the host's load averages at the end of a run next to those of its start."""
    meta["device"]["host_load_avg_1m_end"] = load_average()
    meta["device"]["host_load_avg_end"] = load_averages()


def load_average() -> float | None:
    """The host's 1-minute load average (other jobs on a shared machine skew CPU timings)."""
    loads = load_averages()
    return None if loads is None else loads[0]


def load_averages() -> list[float] | None:
    """The host's 1-, 5- and 15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# the ISA flags that decide which matmul and attention kernels XLA:CPU and PyTorch can use
ISA_FLAG_PREFIXES = ("avx2", "avx512", "amx", "avx_vnni", "fma")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """{"model", "vendor", "flags", "threads_per_core"} of the host CPU from /proc/cpuinfo (or the
    text given), as `lscpu` names them; flags: the vector/matrix ISA extensions (AVX2, AVX-512*,
    AMX*, AVX-VNNI, FMA) only; threads_per_core: siblings / cpu cores (2: the vCPUs are
    hyperthreads sharing cores and their vector units), None when not reported. Elsewhere: the
    platform's processor name, no flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(ISA_FLAG_PREFIXES))
    siblings, cores = fields.get("siblings", ""), fields.get("cpu cores", "")
    per_core = int(siblings) // int(cores) if siblings.isdigit() and cores.isdigit() and int(cores) else None
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "vendor": fields.get("vendor_id"), "flags": flags, "threads_per_core": per_core}


def versions() -> dict[str, str]:
    """Versions of the libraries a timing depends on (+ CUDA runtime/driver/cuDNN with a CUDA jaxlib)."""
    import flax
    import jaxlib

    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "numpy": np.__version__, "python": platform.python_version(), **cuda_versions(),
    }


def cuda_versions() -> dict[str, str]:
    """{"cuda_runtime": "12080", "cuda_driver": ..., "cudnn": "91000", ...} from jax's CUDA plugin, as
    integers in CUDA's own encoding; empty without one. The plugin's version module is private
    to jax, so every lookup is defensive."""
    try:
        from jax._src.lib import cuda_versions as plugin
    except ImportError:
        return {}
    out = {}
    for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas"):
        getter = getattr(plugin, f"{name}_get_version", None) if plugin is not None else None
        try:
            out[name] = str(int(getter())) if getter is not None else None
        except Exception:  # noqa: BLE001 - no device or an older plugin: leave the version out
            out[name] = None
    return {k: v for k, v in out.items() if v is not None}


def write_json(path: str | Path, metadata: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write {"metadata", "rows"} as strict JSON (NaN refused), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=2, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------ plots
def pyplot_or_none(what: str = "the plot"):
    """matplotlib.pyplot on the Agg backend, or None with a warning when matplotlib is missing."""
    try:
        import matplotlib  # optional: a bare inference box runs the sweeps and writes JSON only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed: skipping {what} (pip install matplotlib)")
        return None
    return plt


def plain_formatter():
    """Tick labels as plain numbers (1024, not 2^10 or 1e3)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def log2_x(ax, xs: Sequence[float]) -> None:
    """A log2 x axis with plain tick labels, when the sweep has more than one x."""
    if len(set(xs)) > 1:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain_formatter())


def save_figure(plt, fig, path: str | Path, *, top: float = 1.0) -> Path:
    """Lay out (keeping the top `1 - top` of the figure for a suptitle), write the PNG, close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
