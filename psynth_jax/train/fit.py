"""`psynth plan --fit KEY`: the largest value of a config key that fits, from the compiler's answers.

As MaxText users find their largest batch with AOT compiles: each candidate value is one plan
(train/plan.py: a fresh child, the whole config compiled for the target), and a bisection over
the ascending candidates keeps the last that fits: memory grows with the key (batch size, a
guard such as data.max_branch_slots), so fits is monotone in it. Each probe's answer is the
compiler's: on TPU, compiled or RESOURCE_EXHAUSTED with the bytes it needed.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from psynth_jax.config.accelerators import GIB
from psynth_jax.train.plan import PlanRequest, load, run_plan


def current_value(req: PlanRequest, key: str) -> Any:
    """The config's value of a dotted key (data.batch_size)."""
    node: Any = load(req)
    for part in key.split("."):
        if not hasattr(node, part):
            raise ValueError(f"--fit {key}: the config has no field {part!r} there")
        node = getattr(node, part)
    return node


def candidates(req: PlanRequest, key: str) -> list[str]:
    """Default candidates for an integer key: its value x 1/2, 1, 3/2, 2, 3, 4 (positive, distinct)."""
    value = current_value(req, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"--fit {key}: its value {value!r} is not a positive integer; give --fit-values")
    return [str(v) for v in sorted({value // 2, value, value * 3 // 2, value * 2, value * 3, value * 4}) if v > 0]


def _probe(req: PlanRequest, key: str, value: str) -> dict[str, Any]:
    plan = run_plan(dataclasses.replace(req, overrides=req.overrides + (f"{key}={value}",)))
    worst = plan["programs"][plan["worst_program"]]
    out: dict[str, Any] = {"fits": plan["fits"], "program": plan["worst_program"], "compiler": plan["compiler"]}
    if worst["fits"]:
        out.update(total=worst["memory"]["total"], peak=worst["memory"].get("peak"))
    else:
        oom = worst["oom"]
        out.update(needed=oom.get("needed_bytes"), available=oom.get("available_bytes"), message=oom["message"],
                   largest_item=plan.get("largest_item"))
    return out


def fit_search(req: PlanRequest, key: str, values: list[str]) -> dict[str, Any]:
    """Bisection over `values` (ascending) for the last one whose plan fits."""
    valid = []
    rejected = {}
    for v in values:
        try:
            current_value(dataclasses.replace(req, overrides=req.overrides + (f"{key}={v}",)), key)
            valid.append(v)
        except ValueError as err:  # a value the config refuses (e.g. a batch the mesh does not divide)
            rejected[v] = str(err).splitlines()[0][:300]
    probes: dict[str, Any] = {}
    lo, hi, best = 0, len(valid) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        print(f"[psynth plan] --fit {key}: trying {valid[mid]}", file=sys.stderr, flush=True)
        probes[valid[mid]] = _probe(req, key, valid[mid])
        if probes[valid[mid]]["fits"]:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return {"config": req.config, "accelerator": str(req.accelerator), "key": key, "values": valid,
            "rejected": rejected, "probes": {v: probes[v] for v in valid if v in probes},
            "largest_fitting": valid[best] if best is not None else None}


def format_fit(result: dict[str, Any]) -> str:
    key = result["key"]
    lines = [f"fit search: {key} for {result['config']} on {result['accelerator']}"]
    for v, p in result["probes"].items():
        if p["fits"]:
            peak = f", peak {p['peak'] / GIB:.2f}" if p.get("peak") else ""
            lines.append(f"  {key}={v}: fits ({p['program']}: {p['total'] / GIB:.2f} GiB per device{peak})")
        elif p.get("needed"):
            lines.append(f"  {key}={v}: does not fit ({p['program']} needs {p['needed'] / GIB:.2f} of "
                         f"{p['available'] / GIB:.2f} GiB)")
        else:
            lines.append(f"  {key}={v}: does not fit ({p['program']}: {p.get('largest_item') or p.get('message')})")
    for v, why in result["rejected"].items():
        lines.append(f"  {key}={v}: refused by the config ({why})")
    compiler = next((p["compiler"] for p in result["probes"].values()), "no compile")
    lines.append(f"largest {key} that fits: {result['largest_fitting']}  ({compiler})")
    return "\n".join(lines)
