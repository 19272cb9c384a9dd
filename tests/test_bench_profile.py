"""psynth_jax/measure/profile.py: self times from a real jax.profiler trace, op kinds from compiled HLO, and the
nesting arithmetic on a hand-made trace."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from psynth_jax.measure.profile import describe_hlo, module_name, profile_jit, self_times


def test_self_time_subtracts_nested_events_on_the_same_thread(tmp_path):
    """A `while` of 100 us holding two fusions of 30 and 20 us keeps 50 us of its own; an event on
    another thread overlapping in time is not its child; events of other modules are left out."""
    def ev(name, ts, dur, tid=1, module="jit_f"):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_module": module, "hlo_op": name}}

    events = [ev("while.1", 0, 100), ev("fusion.2", 10, 30), ev("fusion.3", 50, 20),
              ev("fusion.4", 5, 40, tid=2), ev("fusion.9", 200, 7, module="jit_other"),
              {"ph": "X", "pid": 1, "tid": 1, "ts": 120, "dur": 5, "name": "ThunkExecutor::Execute"}]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = self_times(path, "jit_f")
    assert got == {"while.1": (50.0, 1), "fusion.2": (30.0, 1), "fusion.3": (20.0, 1), "fusion.4": (40.0, 1)}


def test_describe_hlo_tags_fusions_by_what_they_compute():
    text = """HloModule jit_f, entry_computation_layout={(f32[4,4]{1,0})->f32[4,4]{1,0}}

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/ij,jk->ik/dot_general"}
}

%fused_exp (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %exponential.1 = f32[4,4]{1,0} exponential(%p0.1), metadata={op_name="jit(f)/exp"}
}

ENTRY %main.9 (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %ynn_fusion = f32[4,4]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_dot
  %t = (f32[4,4]{1,0}, /*index=1*/s32[]) tuple(%ynn_fusion, %x)
  ROOT %exp_fusion = f32[4,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_exp, metadata={op_name="jit(f)/exp"}
}
"""
    info = describe_hlo(text)
    assert module_name(text) == "jit_f"
    assert info["ynn_fusion"] == ("dot", "jit(f)/ij,jk->ik/dot_general")  # source from the called root
    assert info["exp_fusion"] == ("exp", "jit(f)/exp")
    assert info["t"][0] == "elementwise"  # a tuple with an /*index=*/ comment in its shape still parses
    with pytest.raises(ValueError, match="not an HLO module"):
        module_name("garbage")


def test_profile_of_a_real_jitted_loop_finds_its_matmul(tmp_path):
    """A fori_loop of 6 matmuls + tanh: the trace has the dot fusion 6 times per call, tagged `dot`
    with the einsum it comes from; the Perfetto trace is kept."""
    def f(x, w):
        def body(i, h):
            return jnp.tanh(jnp.einsum("ij,jk->ik", h, w))
        return jax.lax.fori_loop(0, 6, body, x)

    x, w = jnp.ones((128, 256)), jnp.full((256, 256), 1e-3)
    prof = profile_jit(f, lambda: (x, w), tmp_path, calls=2)
    dots = [o for o in prof.ops if o["kind"] == "dot"]
    assert dots and dots[0]["count"] == 6, prof.format()
    assert "ij,jk->ik" in dots[0]["source"]
    assert prof.by_kind()["dot"] > 0 and prof.wall_ms > 0
    assert prof.summary()["top_ops"][0]["ms"] == round(prof.ops[0]["ms"], 3)
    assert list(tmp_path.rglob("*.trace.json.gz"))
