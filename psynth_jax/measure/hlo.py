"""What a compiled (or lowered) program does, read from its text: collectives, Mosaic kernels, dense attention.

Pure text parsing, no JAX: `psynth plan` reads a compiled program's HLO
(`compiled.as_text()`), the Mosaic lowering test a lowered program's StableHLO
(`lowered.as_text()`).

- `collectives(hlo)`: per kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute), the number of ops, the bytes their results hold once ("static") and the
  bytes moved per call of the program ("executed": each op weighted by how often its computation
  runs, while-loop bodies by their trip count). XLA:TPU prints no trip count on a while loop, so
  the bound its condition compares with is used: an upper bound for loops that exit early (a
  decode loop that stops on end-of-sequence). Bytes are of the result as one device holds it.
- `mosaic_kernels(text)`: the names of the Mosaic (TPU Pallas) kernels a program calls: the
  `kernel_name` of `tpu_custom_call` custom calls in StableHLO, the custom call's name in HLO. A
  Pallas kernel lowered in interpret mode becomes ordinary loops: no such call.
- `dense_products(text, seq_lengths)`: values with two dimensions among the given attention
  sequence lengths, e.g. a [T, S] score matrix: what blockwise and fused attention never build.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Iterable

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z\-]*)\(")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims in _ARRAY.findall(type_text)
            if dt in _DTYPE_BYTES]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry = name = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    bounds = [int(x) for c in comps.get(cond.group(1), []) if cond for x in re.findall(r"constant\((\d+)\)", c)]
    return max(bounds) if bounds else 1


def runs_per_call(hlo: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry computation."""
    comps, entry = _computations(hlo)
    runs: dict[str, int] = {}
    stack = [(entry, 1)] if entry else []
    while stack:
        comp, n = stack.pop()
        if runs.get(comp, 0) >= n:
            continue
        runs[comp] = n
        for line in comps[comp]:
            trip = _trip_count(line, comps) if " while(" in line else 1
            callees = [(a, c) for a, c in _CALLEES.findall(line)]
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                callees += [("branch", c) for c in re.findall(r"%?([\w.\-]+)", branches.group(1))]
            for attr, callee in callees:
                if callee in comps:
                    stack.append((callee, n * (trip if attr in ("body", "condition") else 1)))
    return runs


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes", "executed_bytes"}} of the compiled HLO's collectives (module doc)."""
    comps, _ = _computations(hlo)
    runs = runs_per_call(hlo)
    out: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "executed_bytes": 0})
    for comp, lines in comps.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            result, op = m.groups()
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            arrays = _arrays(result)
            if op.endswith("-start"):  # async: (operands..., results..., sync flags)
                arrays = [a for a in arrays if a[1]]
                if len(arrays) > 1 and kind in ("all-gather", "collective-permute"):
                    arrays = arrays[len(arrays) // 2:]
            size = sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays)
            entry = out[kind]
            entry["count"] += 1
            entry["bytes"] += size
            entry["executed_bytes"] += size * max(runs.get(comp, 0), 1)
    return dict(out)


def mosaic_kernels(text: str) -> list[str]:
    """Names of the Mosaic kernels called, one per call site (StableHLO or HLO text)."""
    names = re.findall(r'kernel_name\s*=\s*"([^"]+)"', text)  # StableHLO: the custom call's attribute
    if names:
        return names
    return re.findall(r'^\s*(?:ROOT\s+)?%?([A-Za-z_][\w\-]*?)(?:\.\d+)?\s*=.*custom_call_target="tpu_custom_call"',
                      text, re.M)


def dense_products(text: str, seq_lengths: Iterable[int]) -> list[str]:
    """Values with two or more dimensions among `seq_lengths` (a [T, S] attention product).

    StableHLO: the results of `dot_general`s. Compiled HLO: every instruction but parameters
    (XLA fuses and reshapes the score product, e.g. [B, Hkv, S, G*T], so a dot alone is not
    enough to look at). Choose the sequence lengths apart from every model dimension and tile
    size, so that such a dimension can only be a sequence.
    """
    seqs = set(seq_lengths)
    found = []
    for m in re.finditer(r"stablehlo\.dot_general[^\n]*->\s*tensor<([0-9x]+)x[a-z0-9]+>", text):
        if sum(int(d) in seqs for d in m.group(1).split("x")) >= 2:
            found.append(m.group(0)[-160:])
    for m in re.finditer(r"=\s*[a-z0-9]+\[([0-9,]+)\][^\s]*\s+([a-z\-]+)\(", text):
        if m.group(2) != "parameter" and sum(int(d) in seqs for d in m.group(1).split(",")) >= 2:
            found.append(m.group(0)[:160])
    return found


def summary(hlo: str) -> dict[str, Any]:
    """What `psynth plan` records of a compiled program: its collectives and Mosaic kernels."""
    kernels = mosaic_kernels(hlo)
    return {"collectives": collectives(hlo), "mosaic_kernels": dict(collections.Counter(kernels))}
