"""Where a jitted call's time goes: self time per XLA op, tagged with what the op computes.

`profile_jit(fn, args_fn, out_dir)` compiles `fn` once as one module, runs it `calls` times
under `jax.profiler.trace` (the Perfetto trace stays in out_dir for a viewer) and returns an
`OpProfile`: per op of that module its self time per call (the event's duration minus the
events nested in it on the same thread, so a `while` or `conditional` counts only its own
overhead, not the fusions it runs), what it is (`kind`: dot, exp, reduce, copy, gather,
dynamic-slice, elementwise, control; read from the compiled HLO) and the JAX operation it comes
from (the HLO metadata's op_name, e.g. an einsum's spec). `by_kind` sums the self times per
kind: the figure that says whether a call is bound by its matmuls or by everything around them.

Self times of ops that XLA:CPU splits across its thread pool are summed over threads, so on a
multi-core host `op_ms` can exceed the wall time of a call; shares are of `op_ms`.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_OPCODE = re.compile(r"^\s*([a-z][\w\-]*)\(")
_KINDS = (("dot", "dot"), ("convolution", "dot"), ("custom-call", "custom-call"), ("exponential", "exp"),
          ("reduce", "reduce"), ("gather", "gather"), ("scatter", "scatter"),
          ("dynamic-update-slice", "dynamic-update-slice"), ("dynamic-slice", "dynamic-slice"),
          ("while", "control"), ("conditional", "control"), ("transpose", "copy"), ("copy", "copy"))


@dataclasses.dataclass
class OpProfile:
    """Self times of one module's ops, ms per call, largest first."""

    calls: int
    wall_ms: float  # median wall time of the profiled calls
    ops: list[dict[str, Any]]  # {"op", "kind", "source", "ms", "count"} per op, ms per call

    @property
    def op_ms(self) -> float:
        return sum(o["ms"] for o in self.ops)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = collections.Counter()
        for o in self.ops:
            out[o["kind"]] += o["ms"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self, top: int = 12) -> dict[str, Any]:
        total = self.op_ms
        return {
            "calls": self.calls, "wall_ms": round(self.wall_ms, 3), "op_ms": round(total, 3),
            "by_kind_ms": {k: round(v, 3) for k, v in self.by_kind().items()},
            "by_kind_share": {k: round(v / total, 4) for k, v in self.by_kind().items()} if total else {},
            "top_ops": [dict(o, ms=round(o["ms"], 3)) for o in self.ops[:top]],
        }

    def format(self, top: int = 12) -> str:
        total = self.op_ms or 1.0
        kinds = ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in self.by_kind().items())
        lines = [f"wall {self.wall_ms:.1f} ms/call, op self time {self.op_ms:.1f} ms/call: {kinds}"]
        for o in self.ops[:top]:
            lines.append(f"  {o['ms']:8.2f} ms {o['count']:5d}x  {o['kind']:<13} {o['op']:<32} {o['source'][-70:]}")
        return "\n".join(lines)


def describe_hlo(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (kind, source op_name)} for every instruction of a compiled HLO text.

    A fusion's kind is the most telling opcode of the computation it calls (a dot over an
    exponential over a reduce ...); its source is its own op_name, else the last one in the
    computation it calls.
    """
    comps: dict[str, list[tuple[str, str, str, str]]] = {}  # computation -> [(name, opcode, op_name, calls)]
    current: list[tuple[str, str, str, str]] | None = None
    for line in hlo_text.splitlines():
        if line.startswith("HloModule"):
            continue
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(", 1)[0].replace("ENTRY", "").strip().lstrip("%")
            current = comps.setdefault(head, [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, rest = m.groups()
            op = _OPCODE.match(_after_shape(rest))
            src, calls = _OPNAME.search(rest), _CALLS.search(rest)
            current.append((name, op.group(1) if op else "", src.group(1) if src else "",
                            calls.group(1) if calls else ""))

    def kind_of(opcodes: set[str]) -> str:
        for key, kind in _KINDS:
            if key in opcodes:
                return kind
        return "elementwise"

    out: dict[str, tuple[str, str]] = {}
    for instrs in comps.values():
        for name, opcode, src, calls in instrs:
            if opcode == "fusion":
                called = comps.get(calls, [])
                kind = kind_of({op for _, op, _, _ in called})
                src = src or next((s for _, _, s, _ in reversed(called) if s), "")
            else:
                kind = kind_of({opcode})
            out[name] = (kind, src)
    return out


def _after_shape(rest: str) -> str:
    """An instruction's text after its result shape (a token, or a parenthesised tuple)."""
    if not rest.startswith("("):
        return rest.split(" ", 1)[1] if " " in rest else ""
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[i + 1:]
    return ""


def module_name(hlo_text: str) -> str:
    """The module name of a compiled HLO text (its first line: "HloModule NAME, ...")."""
    first = hlo_text.split("\n", 1)[0]
    if not first.startswith("HloModule "):
        raise ValueError(f"not an HLO module text: {first[:80]!r}")
    return first.split()[1].rstrip(",")


def self_times(trace_file: Path, module: str) -> dict[str, tuple[float, int]]:
    """{op: (total self microseconds, count)} for the events of `module` in a Perfetto trace."""
    with gzip.open(trace_file) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads: dict[tuple[Any, Any], list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, event, child time]

        def close(until: float) -> None:
            while stack and stack[-1][0] <= until:
                end, ev, child = stack.pop()
                if stack:
                    stack[-1][2] += ev["dur"]
                args = ev.get("args") or {}
                if args.get("hlo_module") == module and "hlo_op" in args:
                    t = totals[args["hlo_op"]]
                    t[0] += ev["dur"] - child
                    t[1] += 1

        for e in evs:
            close(e["ts"])
            stack.append([e["ts"] + e["dur"], e, 0.0])
        close(float("inf"))
    return {k: (v[0], int(v[1])) for k, v in totals.items()}


def profile_jit(fn: Callable[..., Any], args_fn: Callable[[], tuple], out_dir: str | Path, *,
                calls: int = 3, donate_argnums: tuple[int, ...] = ()) -> OpProfile:
    """Profile `jax.jit(fn)(*args_fn())` (one module; nested jits inline) over `calls` calls.

    args_fn builds fresh arguments for every call (outside the traced window's timing of
    interest, e.g. a cache the call donates); the first call compiles and is not traced.
    donate_argnums: the arguments the call may overwrite, as the profiled function's own jit
    donates them (a nested jit's donation is dropped when it inlines: without this the module
    copies each donated buffer, a cost the real call does not have).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    args = args_fn()
    compiled = jitted.lower(*args).compile()
    text = compiled.as_text()
    module, info = module_name(text), describe_hlo(text)
    jax.block_until_ready(compiled(*args))
    walls = []
    before = set(out_dir.rglob("*.trace.json.gz"))
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(max(calls, 1)):
            args = jax.block_until_ready(args_fn())
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            walls.append(1e3 * (time.perf_counter() - t0))
    traces = sorted(set(out_dir.rglob("*.trace.json.gz")) - before)
    if not traces:
        raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {out_dir}")
    times = self_times(traces[-1], module)
    if not times:
        raise RuntimeError(f"the trace {traces[-1]} has no events of module {module!r}")
    n = max(calls, 1)
    ops = [{"op": op, "kind": info.get(op, ("unknown", ""))[0], "source": info.get(op, ("", ""))[1],
            "ms": us / 1e3 / n, "count": cnt // n} for op, (us, cnt) in times.items()]
    ops.sort(key=lambda o: -o["ms"])
    return OpProfile(calls=n, wall_ms=statistics.median(walls), ops=ops)
