"""`psynth bench batch / decode / train`: each benchmark's run() through its own argparse parser, on
tiny-llama at tiny sizes. Timings are produced, never asserted (they depend on the machine); only
their presence, positivity and the consistency of every derived number with the stored fields."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import batch as batch_bench
from benchmarks import decode as decode_bench
from benchmarks import token_sampling as sampling_bench
from benchmarks import train_step as train_bench
from psynth_jax.measure import roofline
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.presets import preset
from psynth_jax.model.transformer import LoRAConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = ("benchmark", "schema_version", "created", "command", "arch", "model_config", "num_params", "weights",
             "dtype", "attn_impl", "repeats", "seed", "definitions", "device", "versions", "statistic")


def _run(module, argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(p)
    p.format_help()  # every help string formats with the defaults
    return module.run(p.parse_args(argv))


def _load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data["metadata"], data["rows"]


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_meta(meta: dict, name: str) -> None:
    for key in META_KEYS:
        assert key in meta, key
    assert meta["benchmark"] == name and meta["arch"] == "tiny-llama" and meta["dtype"] == "float32"
    assert meta["command"].startswith(f"psynth bench {name} --arch tiny-llama")
    assert meta["device"]["platform"] == jax.devices()[0].platform and "jax" in meta["versions"]


# ------------------------------------------------------------------- batch
def test_batch_run_writes_consistent_json(tmp_path):
    argv = ["--arch", "tiny-llama", "--bs", "2", "--k", "2", "--l", "16", "--prompt-tokens", "8", "--new-tokens", "4",
            "--repeats", "1", "--no-warmup", "--dtype", "float32", "--out", str(tmp_path)]
    assert _run(batch_bench, argv) == 0
    meta, rows = _load(tmp_path / "batch.json")
    _check_meta(meta, "batch")
    assert "--bs 2 " in meta["command"] and "--no-warmup" in meta["command"]
    assert (meta["K"], meta["L"], meta["prompt_tokens"], meta["new_tokens"], meta["paths"]) == (2, 16, 8, 4,
                                                                                              ["cache", "text"])
    assert [r["batch"] for r in rows] == [2]
    for r in rows:
        b, n = r["batch"], r["new_tokens"]
        assert "error" not in r
        for path in ("cache", "text"):
            for part in ("ttft", "decode", "latency"):
                assert _pos(r[f"{path}_{part}_ms"]), (path, part)
                assert _pos(r["first_call_ms"][f"{path}_{part}"]) and len(r["times_ms"][f"{path}_{part}"]) == 1
            assert r[f"{path}_output_tokens"] == b * n
            assert r[f"{path}_tokens_per_s"] == pytest.approx(b * n / (r[f"{path}_decode_ms"] / 1e3), rel=1e-9)
            assert r[f"{path}_ms_per_token"] == pytest.approx(r[f"{path}_decode_ms"] / n, rel=1e-9)
        assert r["ttft_speedup"] == pytest.approx(r["text_ttft_ms"] / r["cache_ttft_ms"], rel=1e-9)
        assert r["latency_speedup"] == pytest.approx(r["text_latency_ms"] / r["cache_latency_ms"], rel=1e-9)
        assert (r["branch_tokens"], r["text_tokens"], r["cache_slots"]) == (32, 40, 44)
    assert (tmp_path / "batch.png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------ decode
def test_decode_run_writes_consistent_json(tmp_path):
    argv = ["--arch", "tiny-llama", "--cache-tokens", "48", "--batch", "2", "--steps", "3", "--repeats", "1",
            "--dtype", "float32", "--attn-impl", "cpu",  # docs/PERFORMANCE.md's issue #27 decode command's kernels
            "--out", str(tmp_path)]  # bandwidth measured (benchmarks.roofline.measure_bandwidth)
    assert _run(decode_bench, argv) == 0
    meta, rows = _load(tmp_path / "decode.json")
    _check_meta(meta, "decode")
    assert meta["bandwidth_source"].startswith("measured") and _pos(meta["bandwidth_gbs"])
    assert meta["lora"]["on"] is True
    cfg = preset("tiny-llama")
    (r,) = rows
    assert (r["cache_tokens"], r["batch"], r["steps"], r["slots"]) == (48, 2, 3, 52)
    for key in ("loop_ms", "step_ms", "host_step_ms", "floor_ms", "tokens_per_s", "ratio", "achieved_gbs"):
        assert _pos(r[key]), key
    assert len(r["times_ms"]["host_step"]) == 3
    # the floor from the stored fields and the roofline cost model
    assert r["kv_tokens_read"] == 48 + (3 + 1) / 2
    assert r["weight_bytes"] == roofline.weight_bytes(cfg, 4, lora_rank=16)
    assert r["kv_bytes_read"] == pytest.approx(2 * cfg.num_layers * 2 * r["kv_tokens_read"] * cfg.num_kv_heads
                                               * cfg.head_dim * 4)
    assert r["bytes_per_step"] == pytest.approx(r["weight_bytes"] + r["kv_bytes_read"])
    assert r["floor_ms"] == pytest.approx(1e3 * r["bytes_per_step"] / (meta["bandwidth_gbs"] * 1e9), rel=1e-9)
    assert r["step_ms"] == pytest.approx(r["loop_ms"] / 3, rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx(2 * 3 / (r["loop_ms"] / 1e3), rel=1e-9)
    assert r["ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"], rel=1e-9)
    assert r["host_ratio"] == pytest.approx(r["host_step_ms"] / r["floor_ms"], rel=1e-9)
    assert r["achieved_gbs"] == pytest.approx(r["bytes_per_step"] / (r["step_ms"] / 1e3) / 1e9, rel=1e-9)
    assert (tmp_path / "decode.png").read_bytes()[:8] == PNG_MAGIC


def test_decode_bandwidth_sources(tmp_path):
    assert decode_bench.bandwidth_gbs(123.0) == (123.0, "given (--bandwidth-gbs)")
    r = roofline.Roofline(matmul_flops_per_s=2e12, bandwidth_bytes_per_s=3e11, dtype="float32", platform="cpu",
                          device_kind="cpu")
    path = roofline.write_roofline(tmp_path / "roofline.json", r)
    bw, source = decode_bench.bandwidth_gbs(None, str(path))
    assert bw == pytest.approx(300.0) and "roofline.json" in source
    peak, source = train_bench.peak_tflops(None, "float32", str(path))
    assert peak == pytest.approx(2.0) and "roofline.json" in source


# ------------------------------------------------------------------- train
def test_train_run_times_the_trainers_step(tmp_path, monkeypatch):
    """The timed function is train.step.make_train_step's step: it learns LoRA + mapper only."""
    from psynth_jax.train import step as step_mod

    assert train_bench.make_train_step is step_mod.make_train_step  # the trainer's own step
    real, seen = step_mod.make_train_step, []

    def spy(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(trainable, opt_state, frozen, batch):
            before_t, before_f = jax.tree.map(np.array, trainable), jax.tree.map(np.array, frozen)
            out = fn(trainable, opt_state, frozen, batch)
            seen.append(dict(before_t=before_t, before_f=before_f, after_t=jax.tree.map(np.array, out[0]),
                             after_f=jax.tree.map(np.array, frozen), loss=float(out[2]["loss"]),
                             shapes={k: v.shape for k, v in batch.items()}, opts=args[2]))
            return out
        return wrapped

    monkeypatch.setattr(train_bench, "make_train_step", spy)
    argv = ["--arch", "tiny-llama", "--branches", "2", "--branch-tokens", "16", "--branch-prefix-tokens", "4",
            "--live-tokens", "8", "--repeats", "2", "--remat", "on", "--peak-tflops", "0.5", "--dtype", "float32",
            "--out", str(tmp_path)]
    assert _run(train_bench, argv) == 0
    meta, rows = _load(tmp_path / "train.json")
    _check_meta(meta, "train")
    assert meta["remat"] == "on" and meta["compute_dtype"] == "float32" and meta["peak_tflops"] == 0.5
    assert "make_train_step" in meta["step_function"] and "stop_gradient" in meta["branch_part"]
    assert "Model FLOPs" in meta["flop_convention"] and "remat" in meta["flop_convention"]
    assert meta["reference_shape"] is False and meta["reference"]["tokens_per_s"] == 4420.0
    (r,) = rows
    # the spied step ran: compile step + 2 timed steps, with the trainer's batch contract
    assert len(seen) == 3 and seen[0]["opts"].remat is True
    assert seen[0]["shapes"] == {"branch_tokens": (1, 2, 20), "branch_prefix_len": (1, 2), "branch_len": (1, 2),
                                 "synth_tokens": (1, 8), "synth_len": (1,), "loss_mask": (1, 8),
                                 "example_valid": (1,)}
    first = seen[0]
    assert set(first["before_t"]) == {"lora", "mapper"}
    jax.tree.map(np.testing.assert_array_equal, first["before_f"], first["after_f"])  # backbone untouched
    delta = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first["before_t"]),
                                                        jax.tree.leaves(first["after_t"]))]
    assert max(delta) > 0  # LoRA / mapper learned
    assert [s["loss"] for s in seen] == pytest.approx(r["losses"])
    # the row
    assert r["remat"] is True and r["dtype"] == "float32" and "error" not in r
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert r["trainable_delta_norm"] > 0 and r["frozen_unchanged"] is True
    assert r["tokens_per_step"] == 1 * (2 * (4 + 16) + 8)
    assert _pos(r["step_ms"]) and _pos(r["first_call_ms"]) and len(r["times_ms"]) == 2
    step_s = r["step_ms"] / 1e3
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / step_s, rel=1e-9)
    assert r["model_tflops_per_s"] == pytest.approx(r["model_flops_per_step"] / step_s / 1e12, rel=1e-9)
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / step_s / 0.5e12, rel=1e-9)
    assert r["hfu"] == pytest.approx(r["hardware_flops_per_step"] / step_s / 0.5e12, rel=1e-9)
    f = r["flops"]
    assert f["remat_recompute"] > 0 and r["hardware_flops_per_step"] == pytest.approx(
        r["model_flops_per_step"] + f["remat_recompute"])
    assert r["trainable_params"] == roofline.lora_params(preset("tiny-llama"), 16) + 260
    assert r["vs_reference"] is None
    assert (tmp_path / "train.png").read_bytes()[:8] == PNG_MAGIC


def test_train_flops_by_hand():
    cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=2)
    lora = LoRAConfig(rank=1, alpha=2.0)  # q, k, v, o
    f = train_bench.train_step_flops(cfg, lora, batch=2, branches=3, branch_tokens=5, branch_prefix_tokens=1,
                                     live_tokens=4, remat=False)
    assert 4 * 2 * (2 + 2) + 2 * 2 * 4 + 3 * 4 * 8 == 144  # q k v, o, gate up down per layer
    dense_tok, attn_pair = 2 * 144 * 2, 4 * 2 * 2 * 2  # per token / per pair, both layers
    lora_tok = 2 * 2 * 1 * ((4 + 4) + (4 + 2) + (4 + 2) + (4 + 4))  # 2 FLOPs x layers x r x (in + out)
    branch = 6 * 6 * dense_tok + 6 * (6 * 7 // 2) * attn_pair  # 6 rows of 6 tokens, causal pairs
    pairs = 2 * (4 * 15 + 4 * 5 // 2)  # every branch key + causal live
    dense, head, lo, att = 8 * dense_tok, 8 * 2 * 4 * 10, 8 * lora_tok, pairs * attn_pair
    assert f["branch_forward"] == branch
    assert f["synth_forward"] == dense + head + lo + att
    assert f["synth_backward"] == (dense + head) + 2 * lo + 2 * att
    assert f["model_flops_per_step"] == f["hardware_flops_per_step"] == branch + (dense + head + lo + att) + (
        dense + head + 2 * lo + 2 * att)
    g = train_bench.train_step_flops(cfg, lora, batch=2, branches=3, branch_tokens=5, branch_prefix_tokens=1,
                                     live_tokens=4, remat=True)
    assert g["model_flops_per_step"] == f["model_flops_per_step"]
    assert g["hardware_flops_per_step"] - g["model_flops_per_step"] == dense + lo + att  # LM head not recomputed


# ---------------------------------------------------------------- sampling
def test_sampling_run_times_every_strategy_and_compares_the_nuclei(tmp_path):
    argv = ["--arch", "tiny-llama", "--batch", "1,3", "--repeats", "2", "--top-p", "0.8", "--out", str(tmp_path)]
    assert _run(sampling_bench, argv) == 0
    meta, rows = _load(tmp_path / "sampling.json")
    _check_meta(meta, "sampling")
    vocab = preset("tiny-llama").vocab_size
    assert meta["vocab"] == vocab and meta["top_p"] == 0.8 and "--top-p 0.8" in meta["command"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        for name in sampling_bench.STRATEGIES:
            assert _pos(r[f"{name}_ms"]) and len(r["times_ms"][name]) == 2, name
        assert r["sort_over_top_p"] == pytest.approx(r["top_p_sort_ms"] / r["top_p_ms"], rel=1e-9)
        assert r["mask_mismatch"] == 0  # same nucleus on these logits (differences only at rounding edges)
        assert 1 <= r["nucleus_tokens_mean"] < vocab
    assert (tmp_path / "sampling.png").read_bytes()[:8] == PNG_MAGIC


def test_sorted_nucleus_is_the_textbook_prefix():
    logits = jnp.log(jnp.asarray([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    got = sampling_bench.sorted_nucleus(logits, 0.7)
    # row 0: 0.5 + 0.3 reaches 0.7; row 1: ties at the cutoff are all kept
    assert got.tolist() == [[True, False, True, False], [True, True, True, True]]


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("module, argv, match", [
    (batch_bench, ["--bs", "1", "--k", "0"], "--k must be >= 1"),
    (batch_bench, ["--bs", "1", "--k", "8", "--l", "8192"], "max_position_embeddings"),
    (batch_bench, ["--bs", "1", "--paths", "cache,video"], "--paths"),
    (decode_bench, ["--cache-tokens", "40000"], "max_position_embeddings"),
    (decode_bench, ["--batch", "0"], "--batch must be >= 1"),
    (decode_bench, ["--steps", "0"], "--steps must be >= 1"),
    (decode_bench, ["--cache-tokens", "8", "--bandwidth-gbs", "-1"], "--bandwidth-gbs must be positive"),
    (sampling_bench, ["--top-p", "1.0"], "--top-p must be in"),
    (sampling_bench, ["--temperature", "0"], "--temperature must be > 0"),
    (train_bench, ["--live-tokens", "1"], "--live-tokens must be >= 2"),
    (train_bench, ["--branch-tokens", "40000"], "max_position_embeddings"),
    (train_bench, ["--batch", "0"], "--batch must be >= 1"),
    (train_bench, ["--peak-tflops", "0"], "--peak-tflops must be positive"),
])
def test_bad_settings_name_the_problem(tmp_path, module, argv, match):
    with pytest.raises(ValueError, match=match):
        _run(module, argv + ["--arch", "tiny-llama", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written


def test_batch_size_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="B < 1"):
        batch_bench.check_batch(preset("tiny-llama"), [1, 0], 2, 16, 8, 4, 0, 1, "affine_length")
    with pytest.raises(SystemExit):  # argparse: --bs takes positive integers only
        _run(batch_bench, ["--bs", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        _run(decode_bench, ["--arch", "gpt-5", "--out", str(tmp_path)])
