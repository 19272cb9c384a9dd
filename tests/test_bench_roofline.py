"""Roofline measurement, the analytic cost model (exact integers), the `psynth bench` registry
(module-backed benchmarks, `bench roofline`) and the PyTorch peer (same weights -> same first token)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import numpy as np
import pytest

from benchmarks import roofline as measured
from benchmarks.ttft_report import roofline_fields
from psynth_jax.cli import bench as bench_cli
from psynth_jax.measure import roofline as rl
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.presets import preset

# hand-checkable: llama, V=100, d=16, f=32, 2 layers, 4 heads, 2 KV heads, head_dim 4, untied
SMALL = ModelConfig(family="llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=4)


# ------------------------------------------------------------------ cost model
def test_cost_model_exact_numbers():
    # q,k,v: 16*4*(4+2*2) = 512; o: 4*4*16 = 256; MLP: 3*16*32 = 1536
    assert rl.block_matmul_params(SMALL) == 2304
    assert SMALL.num_params() == 7888  # 2 layers x 2336 + 2 x 100 x 16 + 16
    assert rl.streamed_params(SMALL) == 6288  # minus the untied input embedding table
    assert rl.weight_bytes(SMALL, 4) == 25152 and rl.weight_bytes(SMALL, 2) == 12576
    # LoRA rank 2 on q (16+16), k (16+8), v (16+8), o (16+16) = 112 per rank per layer
    assert rl.lora_params(SMALL, 2) == 448 and rl.lora_params(SMALL, 0) == 0
    assert rl.weight_bytes(SMALL, 4, lora_rank=2) == 26944
    assert rl.kv_bytes(SMALL, 10, 2) == 640  # 2 x 2 layers x 2 heads x 4 x 10 tokens x 2 bytes
    assert rl.kv_bytes(SMALL, 10, 2, batch=3) == 1920
    assert rl.attention_pairs(3, 5) == 21 and rl.attention_pairs(10, 0) == 55
    # linear 2*3*2*2304 = 27648; attention 4*2*4*4*21 = 2688; LM head 2*16*100 = 3200
    assert rl.forward_flops(SMALL, 3, 5) == 33536
    assert rl.forward_flops(SMALL, 3, 5, lora_rank=2) == 33536 + 2 * 3 * 448
    assert rl.forward_flops(SMALL, 3, 5, batch=2) == 67072
    assert rl.forward_flops(SMALL, 3, 5, logits_tokens=3) == 33536 + 2 * 3200

    text = rl.text_path_cost(SMALL, 2, 3, 4, nbytes=2)  # 10 tokens from scratch
    assert (text.flops, text.bytes) == (92160 + 7040 + 3200, 12576 + 640)
    cache = rl.cache_path_cost(SMALL, 2, 3, 4, nbytes=2, lora_rank=2)  # 4 tokens over 6, LoRA on
    assert (cache.flops, cache.bytes) == (36864 + 3584 + 4352 + 3200, 13472 + 640)
    assert rl.prepare_bytes(SMALL, 2, 3, nbytes=2) == 768

    roof = rl.Roofline(matmul_flops_per_s=1e6, bandwidth_bytes_per_s=1e4, dtype="bfloat16", platform="x",
                       device_kind="x")
    assert text.floor_ms(roof) == pytest.approx(1321.6)  # memory bound: 13216 B / 1e4 B/s
    assert rl.floor_ms(0, 5e5, roof) == pytest.approx(500.0)  # compute bound


def test_cost_model_tied_embeddings_and_real_shape():
    tied = ModelConfig(**{**SMALL.__dict__, "tie_word_embeddings": True})
    assert rl.streamed_params(tied) == tied.num_params() == 6288  # the table is read once, as the LM head
    q = preset("qwen2.5-7b")  # ~6.5e9 non-embedding matmul params -> ~13 GFLOP per token
    assert rl.forward_flops(q, 1) == (2 * q.num_layers * rl.block_matmul_params(q)  # one token, no past:
                                      + 4 * 28 * 28 * 128 + 2 * 3584 * 152064)  # + attention to itself + LM head
    assert 12.5e9 < 2 * q.num_layers * rl.block_matmul_params(q) < 13.5e9


def test_roofline_fields_without_roofline_and_with_oom():
    row = {"K": 2, "L": 3, "prompt_tokens": 4, "batch": 1, "cache_prepare_ms": 1.0, "cache_ttft_ms": 4.0,
           "text_error": "out of memory"}
    f = roofline_fields(row, SMALL, None, dtype="bfloat16", lora_rank=2)
    assert f == {"text_flops": 102400, "text_bytes": 13216, "cache_flops": 48000, "cache_bytes": 14112,
                 "prepare_share": 0.25}
    roof = rl.Roofline(1e6, 1e4, "bfloat16", "x", "x")
    f = roofline_fields(row, SMALL, roof, dtype="bfloat16", lora_rank=2)
    assert f["cache_floor_ratio"] == pytest.approx(4.0 / f["cache_floor_ms"])
    assert "text_floor_ms" in f and "text_floor_ratio" not in f and "text_mfu" not in f


# ------------------------------------------------------------------ measurement
def test_measurements_are_positive_and_finite_on_cpu():
    r = measured.measure_roofline(matmul_sizes=(32, 64), bandwidth_mib=1, repeats=2)
    assert r.dtype == "float32" and r.platform == "cpu"
    for x in (r.matmul_flops_per_s, r.bandwidth_bytes_per_s, r.details["bandwidth"]["copy_bytes_per_s"],
              r.details["bandwidth"]["read_bytes_per_s"]):
        assert x > 0 and math.isfinite(x)
    assert set(r.details["matmul"]["per_size"]) == {"32", "64"}
    assert measured.measure_matmul_peak((32,), dtype="bfloat16", repeats=1)["flops_per_s"] > 0
    assert rl.Roofline.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_bench_roofline_cli_writes_json_reusable_by_ttft(tmp_path, capsys):
    rc = bench_cli.main(["roofline", "--sizes", "32,64", "--mib", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert "matmul peak" in capsys.readouterr().out
    data = json.loads((tmp_path / "roofline.json").read_text())
    assert data["benchmark"] == "roofline" and data["matmul_flops_per_s"] > 0 and data["bandwidth_bytes_per_s"] > 0
    assert rl.load_roofline(tmp_path / "roofline.json").matmul_flops_per_s == data["matmul_flops_per_s"]
    (tmp_path / "ttft.json").write_text(json.dumps({"metadata": {"roofline": data}, "rows": []}))
    assert rl.load_roofline(tmp_path / "ttft.json").bandwidth_bytes_per_s == data["bandwidth_bytes_per_s"]
    (tmp_path / "bad.json").write_text(json.dumps({"metadata": {"roofline": None}}))
    with pytest.raises(ValueError, match="holds no roofline"):
        rl.load_roofline(tmp_path / "bad.json")


# ------------------------------------------------------------------ CLI registry
def test_bench_help_lists_roofline(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "roofline" in out and "ttft" in out
    with pytest.raises(SystemExit):
        bench_cli.main(["ttft", "--help"])
    out = capsys.readouterr().out
    assert "--torch-peer" in out and "--no-roofline" in out and "--roofline-json" in out


def test_module_benchmarks_are_imported_only_when_chosen(monkeypatch):
    calls = []
    pkg, mod = types.ModuleType("psynth_fakepkg"), types.ModuleType("psynth_fakepkg.fakebench")

    def add_arguments(p):
        calls.append("add")
        p.add_argument("--x", type=int, default=1)

    mod.add_arguments, mod.run = add_arguments, lambda args: 7 + args.x
    monkeypatch.setitem(sys.modules, "psynth_fakepkg", pkg)
    monkeypatch.setitem(sys.modules, "psynth_fakepkg.fakebench", mod)
    monkeypatch.setitem(bench_cli.BENCHMARKS, "fake", ("psynth_fakepkg.fakebench", "a fake benchmark"))

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert calls == []  # building the parser imports no module-backed benchmark
    from benchmarks import ttft

    args = parser.parse_args(["ttft", "--ks", "1"])
    assert args._bench is ttft.run and calls == []
    args = parser.parse_args(["fake", "--x", "3"])
    assert calls == ["add"] and args.x == 3 and args._bench is mod.run
    assert bench_cli.run(args) == 10
    assert bench_cli.main(["fake"]) == 8


def test_torch_peer_without_torch_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from benchmarks.peer import PeerUnavailable
    from psynth_jax.cli import main as psynth_main

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError, find_spec -> None
    argv = ["ttft", "--arch", "tiny-llama", "--ks", "1", "--ls", "8", "--torch-peer", "--out", str(tmp_path)]
    with pytest.raises(PeerUnavailable, match="--torch-peer needs PyTorch and transformers.*torch.*pip install"):
        bench_cli.main(argv)
    monkeypatch.setitem(psynth_main.COMMANDS, "bench", ("bench", "benchmarks"))
    assert psynth_main.main(["bench", *argv]) == 2
    assert "psynth bench: error: --torch-peer needs PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "ttft.json").exists()


# ------------------------------------------------------------------ PyTorch peer
def test_peer_first_token_equals_jax_with_the_same_weights():
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from benchmarks import peer
    from psynth_jax.inference import runtime
    from psynth_jax.interop.export import merged_tensors
    from psynth_jax.model.loaded import random_model

    cfg = preset("tiny-llama")
    jm = random_model(cfg, dtype="float32", seed=3)
    tm = peer.build_torch_model(cfg, dtype="float32", device="cpu", state_dict=merged_tensors(jm))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    logits, _ = runtime.prefill(jm.graphdef, jm.state, jnp.asarray(tokens, jnp.int32),
                                jnp.full((2,), 24, jnp.int32), num_slots=32)
    jax_first = np.asarray(jax.numpy.argmax(logits, -1))
    with torch.inference_mode():
        t = torch.from_numpy(tokens)
        torch_logits = tm(input_ids=t, logits_to_keep=1).logits[:, -1].numpy()
        text_first = peer.text_first_token(tm, t).numpy()
        # the peer's cache path: the prompt over a cache of the first 16 tokens = the same first token
        past = tm(input_ids=t[:, :16], use_cache=True, logits_to_keep=1).past_key_values
        cache_first = peer.cache_first_token(tm, t[:, 16:], past).numpy()
    np.testing.assert_allclose(torch_logits, np.asarray(logits), rtol=1e-4, atol=1e-4)
    assert text_first.tolist() == jax_first.tolist() == cache_first.tolist()


def test_peer_point_times_are_positive():
    pytest.importorskip("torch")
    from benchmarks import peer

    cfg = preset("tiny-llama")
    model = peer.build_torch_model(cfg, dtype="float32", device="cpu")
    row = peer.measure_peer_point(model, cfg, 2, 4, prompt_tokens=4, repeats=1)
    for key in ("peer_text_ttft_ms", "peer_cache_ttft_ms"):
        assert row[key] > 0 and math.isfinite(row[key])
    assert peer._cfg_from_dict(json.loads(json.dumps(peer._cfg_to_dict(preset("llama-3.1-8b"))))) == \
        preset("llama-3.1-8b")
