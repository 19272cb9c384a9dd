"""Helpers shared by the benchmarks (`psynth bench ttft`, `batch`, `decode`, `train`, `sampling`):
common options, the reproducing command line, JSON metadata (device, versions), the printed table
and the saved results (plotting helpers live in plots.py)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import LoRAConfig

SCHEMA_VERSION = 1
WEIGHTS_NOTE = "random weights, KV and tokens: timing does not depend on their values"

Column = tuple[str, str, str]  # (title, row key, format)


def add_common_arguments(p: argparse.ArgumentParser, *, name: str, repeats: int = 3) -> None:
    """--arch, --dtype, --attn-impl, --repeats, --seed, --out, --no-plot (same meaning in every benchmark)."""
    from psynth_jax.model.presets import PRESETS

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
    from psynth_jax.model.presets import preset

    if not Path(text).exists():
        try:
            preset(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def resolve_arch(arch: str) -> tuple[ModelConfig, str, str | None]:
    """(ModelConfig, display name, hub id) for a preset name or a config.json path / model dir."""
    from psynth_jax.model.presets import hub_id, preset

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
    import typing

    from psynth_jax.config.schema import AttnImpl

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


def say(tag: str, msg: str) -> None:
    print(f"[bench {tag}] {msg}", file=sys.stderr, flush=True)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Header + one line per row; missing values print as '-' (or the row's error marker)."""

    def width(title: str, fmt: str) -> int:
        sample: Any = "" if "s}" in fmt else (0 if "d}" in fmt else 0.0)
        return max(len(fmt.format(sample)), len(title))

    lines = ["  ".join(t.rjust(width(t, f)) for t, _, f in columns)]
    for row in rows:
        cells = []
        for title, key, fmt in columns:
            v = row.get(key)
            text = fmt.format(v) if v is not None else ("ERR" if row.get("error") else "-")
            cells.append(text.rjust(width(title, fmt)))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def lora_rank_of(lora: LoRAConfig | None) -> int:
    return 0 if lora is None else lora.rank


def save_results(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], out: str | Path, *,
                 plot: Callable[[dict[str, Any], list[dict[str, Any]], Path], Path | None] | None) -> None:
    """Stamp the end-of-run host load, write `<out>/<name>.json` and, unless plot is None, `<name>.png`."""
    meta["device"]["host_load_avg_1m_end"] = load_average()
    out = Path(out)
    say(name, f"wrote {write_json(out / f'{name}.json', meta, rows)}")
    png = plot(meta, rows, out / f"{name}.png") if plot is not None else None
    if png is not None:
        say(name, f"wrote {png}")


def device_info() -> dict[str, Any]:
    """The device timed (the first of jax.devices()) and the host: what every result names."""
    devices = jax.devices()
    d = devices[0]
    return {
        "platform": d.platform,
        "device_kind": getattr(d, "device_kind", d.platform),
        "num_devices": len(devices),
        "used_devices": 1,
        "host_cpu": _cpu_model(),
        "host_cpu_count": os.cpu_count(),
        "host_load_avg_1m": load_average(),
    }


def load_average() -> float | None:
    """The host's 1-minute load average (other jobs on a shared machine skew CPU timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
