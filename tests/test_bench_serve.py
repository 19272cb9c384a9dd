"""`psynth bench serve` through its own argparse parser, on tiny-llama (SmolLM2's tokenizer) at tiny
sizes: the JSON's rows, the summary ratios as quotients of the stored fields, the floors from the
roofline file, the decode-step profiles and the plot. Timings are produced, never asserted."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from benchmarks import serve as serve_bench
from psynth_jax.measure.roofline import Roofline, dtype_bytes, kv_bytes, weight_bytes, write_roofline
from psynth_jax.model.presets import preset
from psynth_jax.model.transformer import LoRAConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve_bench.add_arguments(p)
    p.format_help()  # every help string formats with the defaults
    return serve_bench.run(p.parse_args(argv))


def test_serve_run_writes_consistent_json(tmp_path):
    roof = write_roofline(tmp_path / "roofline.json", Roofline(1e11, 2e10, "float32", "cpu", "cpu"))
    argv = ["--arch", "tiny-llama", "--clients", "3", "--requests", "3", "--k", "2", "--branch-tokens", "16",
            "--max-tokens", "4", "--slots", "2", "--max-context", "384", "--profile", "--roofline-json", str(roof),
            "--dtype", "float32", "--attn-impl", "cpu", "--timeout-s", "300", "--out", str(tmp_path / "out")]
    assert _run(argv) == 0  # docs/PERFORMANCE.md's issue #27 command's flags (its decode kernel), at tiny sizes
    data = json.loads((tmp_path / "out" / "serve.json").read_text())
    meta, rows = data["metadata"], data["rows"]
    assert meta["attn_impl"] == "cpu" and "--attn-impl cpu" in meta["command"]
    assert meta["command"].startswith("psynth bench serve --arch tiny-llama --clients 3")
    assert "--profile" in meta["command"] and meta["bandwidth_gbs"] == pytest.approx(20.0)
    assert [(r["path"], r["phase"], r["clients"]) for r in rows] == [
        ("cache", "sequential", 1), ("text", "sequential", 1), ("cache", "concurrent", 3), ("text", "concurrent", 3)]
    at = {(r["path"], r["phase"]): r for r in rows}
    cfg = dataclasses.replace(preset("tiny-llama"), vocab_size=49_152)  # SmolLM2's tokenizer's vocabulary
    for r in rows:
        assert r["requests"] == 3 and len(r["ttft_ms"]) == 3 and 3 <= r["completion_tokens"] <= 12
        assert r["ttft_p50_ms"] > 0 and r["wall_s"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["wall_s"], rel=1e-9)
        assert r["cached_tokens"] == (32 if r["path"] == "cache" else 0)  # 2 text branches of 16 kept tokens
        # the floor: weights (with the LoRA on the cache path) + the KV of the mean context, at 20 GB/s
        lora = LoRAConfig()
        wb = weight_bytes(cfg, 4, lora_rank=lora.rank if r["path"] == "cache" else 0, lora_targets=lora.targets)
        context = r["cached_tokens"] + r["prompt_tokens"] + r["completion_tokens"] / r["requests"] / 2
        assert r["floor_ms"] == pytest.approx(1e3 * (wb + kv_bytes(cfg, int(context), dtype_bytes("float32"))) / 2e10)
        assert r["token_over_floor"] == pytest.approx(r["token_ms_p50"] / r["floor_ms"])
    s = meta["summary"]
    assert s["cache_throughput_vs_sequential"] == pytest.approx(
        at["cache", "concurrent"]["decode_tokens_per_s"] / at["cache", "sequential"]["decode_tokens_per_s"], abs=1e-3)
    assert s["cache_over_text_ttft_p50"] == pytest.approx(
        at["cache", "concurrent"]["ttft_p50_ms"] / at["text", "concurrent"]["ttft_p50_ms"], abs=1e-3)
    assert s["batch1_decode_over_floor"] == pytest.approx(at["cache", "sequential"]["token_over_floor"], abs=1e-3)
    profiles = meta["decode_step_profiles"]
    assert [(p["name"], p["slots"], p["rows"]) for p in profiles] == [("2_slots", 2, 2), ("2_slots_1_row", 2, 1),
                                                                       ("1_slots", 1, 1)]
    for p in profiles:
        assert p["wall_ms"] > 0 and p["op_ms"] > 0 and p["top_ops"] and math.isfinite(p["over_floor"])
        assert s[f"step_ms_{p['name']}_1_live"] == pytest.approx(p["wall_ms"], abs=0.01)
    assert (tmp_path / "out" / "serve.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, match", [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--branch-tokens", "0"], "--branch-tokens must be >= 1"),
    (["--slots", "0"], "--slots must be >= 1"),
])
def test_bad_settings_name_the_problem(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        _run(argv + ["--arch", "tiny-llama", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written
