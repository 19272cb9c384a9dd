"""`psynth bench ttft`: presets, the sweep's JSON and PNG, the CLI wiring. Timings are produced,
never asserted (they depend on the machine); only their presence and consistency are checked."""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

from benchmarks import harness, ttft
from benchmarks.plots import plot_ttft
from benchmarks.ttft_report import spread_fields
from psynth_jax.cli import bench as bench_cli
from psynth_jax.model.presets import PRESETS, hub_id, preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIME_KEYS = ("cache_prepare_ms", "cache_prefill_ms", "cache_ttft_ms", "text_ttft_ms")
MATERIALISED_KEYS = ("cache_reencode_assemble_ms", "cache_mapper_ms")  # parts of its preparation
PEER_KEYS = ("peer_text_ttft_ms", "peer_cache_ttft_ms")
ROOT = Path(__file__).resolve().parents[1]
# a documented command at CI scale: these flags' values shrink, every other flag is kept as written
SMALL = {"--arch": "tiny-llama", "--ks": "1,2", "--ls": "8", "--prompt-tokens": "8", "--repeats": "2"}


def documented_ttft_commands(section: str = "## CPU, issue #29") -> list[list[str]]:
    """The `psynth bench ttft` commands of a docs/PERFORMANCE.md section, as argv after `bench`."""
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    body = text[text.index(section):]
    body = body[:body.index("\n## ", 10)]
    body = body.replace("\\\n", " ")  # continued lines joined
    return [shlex.split(c) for c in re.findall(r"^psynth bench (ttft [^\n]*)", body, re.M)]


def at_small_scale(argv: list[str], out: Path, small: dict[str, str] = SMALL) -> list[str]:
    """argv with SMALL's values and --out replaced (added when missing), repository paths made absolute."""
    argv, small = list(argv), {**small, "--out": str(out)}
    for flag, value in small.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return [str(ROOT / a) if not a.startswith("-") and (ROOT / a).is_file() else a for a in argv]


# ----------------------------------------------------------------- presets
@pytest.mark.parametrize("name, params", [("qwen3-8b", 8.19e9), ("llama-3.1-8b", 8.03e9),
                                          ("qwen3-14b", 14.77e9), ("qwen2.5-7b", 7.62e9),
                                          ("qwen3-0.6b", 0.596e9), ("smollm2-135m", 0.1345e9)])
def test_preset_num_params_match_hf(name, params):
    assert preset(name).num_params() == pytest.approx(params, rel=0.01)


def test_preset_shapes_match_hf_configs():
    q = preset("qwen3-8b")
    assert (q.family, q.hidden_size, q.intermediate_size, q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim,
            q.vocab_size, q.qk_norm, q.attention_bias, q.tie_word_embeddings, q.rope_theta) == (
        "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, True, False, False, 1e6)
    ll = preset("llama-3.1-8b")
    assert (ll.family, ll.hidden_size, ll.intermediate_size, ll.num_layers, ll.num_heads, ll.num_kv_heads,
            ll.head_dim, ll.vocab_size, ll.rope_theta, ll.rms_norm_eps) == (
        "llama", 4096, 14336, 32, 32, 8, 128, 128256, 500000.0, 1e-5)
    rs = ll.rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
            rs.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
    q25 = preset("qwen2.5-7b")
    assert (q25.family, q25.attention_bias, q25.num_kv_heads, q25.head_dim) == ("qwen2", True, 4, 128)
    assert preset("Qwen3-8B") == q  # case-insensitive
    assert hub_id("qwen3-14b") == "Qwen/Qwen3-14B" and hub_id("tiny-llama") is None


def test_every_preset_builds():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.num_heads % cfg.num_kv_heads == 0
        if name.startswith("tiny-"):
            assert cfg.num_params() < 20e6  # sweepable on a small CPU


def test_unknown_arch_lists_presets(capsys):
    with pytest.raises(ValueError, match="unknown architecture 'gpt-5'.*qwen3-8b.*tiny-llama"):
        preset("gpt-5")
    with pytest.raises(SystemExit):
        bench_cli.main(["ttft", "--arch", "gpt-5", "--out", "/nonexistent"])
    err = capsys.readouterr().err
    assert "argument --arch: unknown architecture 'gpt-5'; known presets:" in err and "llama-3.1-8b" in err


# ------------------------------------------------------------- sweep + CLI
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One CLI run: docs/PERFORMANCE.md's AMD EPYC command (issue #29) at small scale: the PyTorch
    peer in its child process alternated with JAX, the stored roofline, profiles, both plots."""
    out = tmp_path_factory.mktemp("bench")
    epyc = documented_ttft_commands()[0]
    assert {"--torch-peer", "--profile", "--profile-text", "--roofline-json"} <= set(epyc)
    rc = bench_cli.main(at_small_scale(epyc, out))
    assert rc == 0
    return out, json.loads((out / "ttft.json").read_text())


def test_every_issue29_command_runs_at_small_scale(tmp_path):
    """The section's other command (the Intel table's: roofline measured in the run) on one point."""
    commands = documented_ttft_commands()
    assert len(commands) == 2
    argv = at_small_scale(commands[1], tmp_path, {**SMALL, "--ks": "1", "--repeats": "1"})
    assert bench_cli.main(argv) == 0
    data = json.loads((tmp_path / "ttft.json").read_text())
    assert data["metadata"]["roofline"]["matmul_flops_per_s"] > 0
    assert data["rows"][0]["text_vs_peer"] > 0 and data["metadata"]["peer"]["order"] == "interleaved"


def test_sweep_json_has_metadata_and_rows(sweep):
    _, data = sweep
    meta, rows = data["metadata"], data["rows"]
    assert meta["benchmark"] == "ttft" and meta["arch"] == "tiny-llama"
    assert meta["weights"] == "random" and "random" in meta["weights_note"]
    assert meta["dtype"] == "float32"  # auto on CPU
    assert meta["device"]["platform"] and meta["device"]["device_kind"]
    assert meta["versions"]["jax"]
    assert meta["num_params"] == preset("tiny-llama").num_params()
    assert meta["lora"]["rank"] == 16 and meta["mapper_kind"] == "affine_length"
    assert meta["command"].startswith("psynth bench ttft --arch tiny-llama --ks 1,2 --ls 8")
    assert meta["command"].endswith("--peer-order interleaved --torch-peer --profile --profile-text")
    assert [(r["K"], r["L"]) for r in rows] == [(1, 8), (2, 8)]
    assert meta["schema_version"] == 4 and meta["cache_path"] == "view" and meta["partial"] is False
    roof = meta["roofline"]
    assert roof["dtype"] == "float32" and roof["platform"] == meta["device"]["platform"]
    assert roof["matmul_flops_per_s"] > 0 and roof["bandwidth_bytes_per_s"] > 0
    peer = meta["peer"]
    assert peer["dtype"] == "float32" and peer["device"] == "cpu" and peer["attn_implementation"] == "sdpa"
    assert peer["torch"] and peer["transformers"]
    for key in ("cache_floor_ms", "cache_floor_ratio", "text_floor_ms", "text_floor_ratio", "text_mfu",
                "prepare_share", "peer_text_ttft_ms", "peer_cache_ttft_ms", "text_vs_peer"):
        assert key in meta["definitions"], key


def test_sweep_rows_have_positive_times_and_same_run_ratio(sweep):
    _, data = sweep
    for r in data["rows"]:
        for key in TIME_KEYS:
            assert r[key] > 0 and math.isfinite(r[key]), key
        assert r["speedup"] == pytest.approx(r["text_ttft_ms"] / r["cache_ttft_ms"])
        assert r["branch_tokens"] == r["K"] * r["L"]
        assert r["text_tokens"] == r["K"] * r["L"] + r["prompt_tokens"]
        assert r["cache_slots"] == r["text_slots"]  # same decode room: a fair attention width
        assert set(r["first_call_ms"]) == set(r["times_ms"]) == {k[:-3] for k in TIME_KEYS}
        assert all(len(v) == 2 for v in r["times_ms"].values())  # --repeats 2


def test_sweep_rows_have_the_cache_prefill_profile(sweep):
    """--profile: per point, the prefill's op self times by kind (its matmuls among them, one per
    layer for each projection) and the Perfetto trace."""
    out, data = sweep
    layers = preset("tiny-llama").num_layers
    for r in data["rows"]:
        prof = r["cache_profile"]
        assert prof["calls"] == 3 and prof["op_ms"] > 0 and prof["by_kind_ms"]["dot"] > 0
        assert sum(prof["by_kind_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert any(o["kind"] == "dot" and o["count"] == layers for o in prof["top_ops"]), prof["top_ops"]
        assert list((out / "profile" / f"K{r['K']}_L{r['L']}").rglob("*.trace.json.gz"))
        assert r["text_profile"]["by_kind_ms"]["dot"] > 0  # --profile-text
        assert list((out / "profile" / f"text_K{r['K']}_L{r['L']}").rglob("*.trace.json.gz"))
    assert "cache_profile" in data["metadata"]["definitions"]


def test_sweep_rows_roofline_fields_are_quotients_of_stored_fields(sweep):
    from psynth_jax.measure.roofline import Roofline, cache_path_cost, text_path_cost

    _, data = sweep
    roof = Roofline.from_dict(data["metadata"]["roofline"])
    cfg = preset("tiny-llama")
    for r in data["rows"]:
        text = text_path_cost(cfg, r["K"], r["L"], r["prompt_tokens"], nbytes=4)
        cache = cache_path_cost(cfg, r["K"], r["L"], r["prompt_tokens"], nbytes=4, lora_rank=16)
        assert (r["text_flops"], r["text_bytes"], r["cache_flops"], r["cache_bytes"]) == (
            text.flops, text.bytes, cache.flops, cache.bytes)
        assert r["cache_floor_ms"] == pytest.approx(1e3 * max(r["cache_bytes"] / roof.bandwidth_bytes_per_s,
                                                              r["cache_flops"] / roof.matmul_flops_per_s))
        assert r["text_floor_ms"] == pytest.approx(1e3 * max(r["text_bytes"] / roof.bandwidth_bytes_per_s,
                                                             r["text_flops"] / roof.matmul_flops_per_s))
        assert r["cache_floor_ratio"] == pytest.approx(r["cache_ttft_ms"] / r["cache_floor_ms"])
        assert r["text_floor_ratio"] == pytest.approx(r["text_ttft_ms"] / r["text_floor_ms"])
        assert r["text_mfu"] == pytest.approx(r["text_flops"] / (r["text_ttft_ms"] / 1e3) / roof.matmul_flops_per_s)
        assert r["prepare_share"] == pytest.approx(r["cache_prepare_ms"] / r["cache_ttft_ms"])
        assert r["cache_prepare_floor_ms"] > 0
        for key in ("cache_floor_ratio", "text_floor_ratio", "text_mfu", "prepare_share"):
            assert r[key] > 0 and math.isfinite(r[key]), key


def test_sweep_rows_have_the_torch_peer(sweep):
    out, data = sweep
    for r in data["rows"]:
        for key in PEER_KEYS:
            assert r[key] > 0 and math.isfinite(r[key]), key
        assert r["text_vs_peer"] == pytest.approx(r["text_ttft_ms"] / r["peer_text_ttft_ms"])
        assert r["cache_vs_peer"] == pytest.approx(r["cache_ttft_ms"] / r["peer_cache_ttft_ms"])
        best_text = min(r["text_ttft_ms"], r["peer_text_ttft_ms"])
        assert r["speedup_vs_best_text"] == pytest.approx(best_text / r["cache_ttft_ms"])
        assert set(r["peer_times_ms"]) == {k[:-3] for k in PEER_KEYS}
        assert all(len(v) == 2 for v in r["peer_times_ms"].values())
    raw = json.loads((out / "ttft_peer.json").read_text())  # the peer's own JSON is kept
    assert [(r["K"], r["L"]) for r in raw["rows"]] == [(1, 8), (2, 8)]
    assert raw["metadata"]["order"] == data["metadata"]["peer"]["order"] == "interleaved"


def test_peer_order_first_runs_every_peer_point_before_jax(tmp_path):
    """--peer-order first (the GPU scripts': JAX preallocates its memory there): the peer's rows
    come from its child process, run to completion before the sweep, and are merged by (K, L);
    --profile-text profiles the text prefill."""
    argv = ["ttft", "--arch", "tiny-llama", "--ks", "1", "--ls", "8", "--prompt-tokens", "8", "--repeats", "2",
            "--torch-peer", "--peer-order", "first", "--no-roofline", "--no-plot", "--profile-text", "--out",
            str(tmp_path)]
    assert bench_cli.main(argv) == 0
    data = json.loads((tmp_path / "ttft.json").read_text())
    row = data["rows"][0]
    assert data["metadata"]["peer"]["order"] == "first" and "--peer-order first" in data["metadata"]["command"]
    assert row["timing_order"] == ["text_ttft", "cache_ttft", "cache_prepare", "cache_prefill"] * 2
    assert len(row["peer_times_ms"]["peer_text_ttft"]) == 2 and len(row["text_vs_peer_repeats"]) == 2
    # --profile-text alone: the text prefill's op profile (its matmuls among them), no cache profile
    assert row["text_profile"]["by_kind_ms"]["dot"] > 0 and "cache_profile" not in row
    assert list((tmp_path / "profile" / "text_K1_L8").rglob("*.trace.json.gz"))


def test_sweep_alternates_the_peer_and_jax_per_point_and_repeat(sweep):
    """Each repeat is one round: peer text, JAX text, peer cache, JAX cache, then the cache path's
    parts; the labels are those of the calls as they ran."""
    _, data = sweep
    one_round = ["peer_text_ttft", "text_ttft", "peer_cache_ttft", "cache_ttft", "cache_prepare", "cache_prefill"]
    for r in data["rows"]:
        assert r["timing_order"] == one_round * 2
    assert "timing_order" in data["metadata"]["definitions"]


def test_sweep_rows_have_each_ratio_per_repeat_and_its_spread(sweep):
    _, data = sweep
    for r in data["rows"]:
        t, p = r["times_ms"], r["peer_times_ms"]
        assert r["text_vs_peer_repeats"] == pytest.approx([a / b for a, b in zip(t["text_ttft"], p["peer_text_ttft"])])
        assert r["cache_vs_peer_repeats"] == pytest.approx(
            [a / b for a, b in zip(t["cache_ttft"], p["peer_cache_ttft"])])
        assert r["prepare_share_repeats"] == pytest.approx(
            [a / b for a, b in zip(t["cache_prepare"], t["cache_ttft"])])
        assert r["cache_floor_ratio_repeats"] == pytest.approx([a / r["cache_floor_ms"] for a in t["cache_ttft"]])
        for ratio in ("text_vs_peer", "cache_vs_peer", "prepare_share", "cache_floor_ratio", "text_floor_ratio"):
            per = r[f"{ratio}_repeats"]
            assert len(per) == 2 and r[f"{ratio}_spread"] == [min(per), max(per)], ratio


def test_sweep_metadata_names_the_cpu_kind_and_the_load(sweep):
    _, data = sweep
    dev = data["metadata"]["device"]
    assert dev["host_cpu"] == harness.cpu_info()["model"] and dev["host_cpu_vendor"] == harness.cpu_info()["vendor"]
    assert dev["host_cpu_flags"] == harness.cpu_info()["flags"]
    assert dev["host_cpu_threads_per_core"] == harness.cpu_info()["threads_per_core"]
    assert dev["host_cpu_count"] >= dev["host_cpu_usable"] >= 1
    for key in ("host_load_avg_start", "host_load_avg_end"):
        assert len(dev[key]) == 3 and all(x >= 0 for x in dev[key]), key


INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8 sha_ni
processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
"""


def test_cpu_info_keeps_the_model_vendor_and_isa_flags():
    info = harness.cpu_info(INTEL_CPUINFO)
    assert info == {"model": "Intel(R) Xeon(R) Platinum 8488C", "vendor": "GenuineIntel",
                    "flags": ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512bw", "avx512f",
                              "avx_vnni", "fma"], "threads_per_core": 2}


def test_rounds_alternate_calls_and_drop_a_path_that_runs_out_of_memory():
    """`_rounds` calls every function once, then one call each per repeat in ROUND's order; a call
    that runs out of memory drops its whole path (the peer's cache path here) from later rounds."""
    from psynth_jax.measure.timing import OutOfMemory

    log: list[str] = []

    def call(label, fail_at=None):
        def run():
            log.append(label)
            if len([x for x in log if x == label]) == fail_at:
                raise OutOfMemory("RESOURCE_EXHAUSTED")
            return 0.001 * len(log)
        return run

    calls = {x: call(x) for x in ("text_ttft", "peer_text_ttft", "cache_ttft", "cache_prepare")}
    calls["peer_cache_ttft"] = call("peer_cache_ttft", fail_at=2)
    row: dict = {}
    first, times, order = ttft._rounds(calls, 2, row)
    round_ = ["peer_text_ttft", "text_ttft", "peer_cache_ttft", "cache_ttft", "cache_prepare"]
    without = [x for x in round_ if x != "peer_cache_ttft"]
    assert log == round_ + round_ + without
    assert order == without * 2 and "peer_cache_ttft" not in times and set(first) == set(round_)
    assert row == {"peer_cache_error": "out of memory: RESOURCE_EXHAUSTED"}
    assert times["text_ttft"] == pytest.approx([0.007, 0.012])  # the 7th and 12th calls of the log


def test_spreads_pair_the_i_th_calls():
    row = {"times_ms": {"text_ttft": [10.0, 30.0], "cache_ttft": [4.0, 8.0], "cache_prepare": [0.4, 0.2]},
           "peer_times_ms": {"peer_text_ttft": [20.0, 20.0]}, "cache_floor_ms": 2.0}
    out = spread_fields(row)
    assert out["text_vs_peer_repeats"] == [0.5, 1.5] and out["text_vs_peer_spread"] == [0.5, 1.5]
    assert out["prepare_share_repeats"] == [0.1, 0.025] and out["cache_floor_ratio_spread"] == [2.0, 4.0]
    assert "cache_vs_peer_repeats" not in out  # no peer cache call was timed


def test_sweep_writes_png(sweep):
    out, _ = sweep
    for name in ("ttft.png", "ttft_floor.png"):
        png = (out / name).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000, name


def test_plot_is_skipped_without_matplotlib(monkeypatch, tmp_path, sweep):
    _, data = sweep
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_ttft(data["metadata"], data["rows"], tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_table_marks_out_of_memory_paths():
    row = {"K": 4, "L": 4096, "branch_tokens": 16384, "cache_reencode_assemble_ms": 1.0, "cache_mapper_ms": 1.0,
           "cache_prepare_ms": 1.5, "cache_prefill_ms": 10.0, "cache_ttft_ms": 12.0, "text_error": "out of memory"}
    line = ttft.format_row(row)
    assert "OOM" in line and "12.00" in line
    assert len(line) == len(ttft.format_header())
    wide = ttft.table_columns(roofline=True, peer=True)
    row.update(peer_text_error="out of memory", peer_cache_ttft_ms=30.0, cache_floor_ratio=1.25)
    line = ttft.format_row(row, wide)
    assert len(line) == len(ttft.format_header(wide))
    # text TTFT, text/floor, text MFU, torch text, text/torch and its range
    assert line.count("OOM") == 6 and "1.25x" in line and "30.00" in line


@pytest.mark.parametrize("kwargs, match", [
    (dict(ks=[], ls=[8]), "at least one K"),
    (dict(ks=[0], ls=[8]), "positive"),
    (dict(ks=[1], ls=[8], mapper_kind="nope"), "unknown mapper"),
    (dict(ks=[1], ls=[8], cache_path="copy"), "unknown cache path"),
    (dict(ks=[1], ls=[8], cache_path="view", attn_impl="xla_split"), "needs attn_impl='xla'"),
    (dict(ks=[64], ls=[1024]), "exceeds the model's 32768 positions"),
])
def test_sweep_rejects_bad_settings_before_building_a_model(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ttft.run_ttft_sweep(preset("tiny-llama"), verbose=False, **kwargs)


def test_materialised_cache_path_times_its_parts():
    """--cache-path materialised: the reference path, with its preparation's parts timed too; the
    rows so far are handed on after every point (on_row: the CLI rewrites ttft.json each time)."""
    seen = []
    rows = ttft.run_ttft_sweep(preset("tiny-llama"), ks=[2], ls=[8, 4], prompt_tokens=8, new_tokens=8, repeats=1,
                               warmup=False, verbose=False, cache_path="materialised",
                               on_row=lambda done: seen.append([(r["K"], r["L"]) for r in done]))
    assert seen == [[(2, 8)], [(2, 8), (2, 4)]]
    for key in TIME_KEYS + MATERIALISED_KEYS:
        assert rows[0][key] > 0 and math.isfinite(rows[0][key]), key
    assert "view_slots" not in rows[0]


def test_bench_plugs_into_psynth_main(monkeypatch):
    from psynth_jax.cli import main as psynth_main

    monkeypatch.setitem(psynth_main.COMMANDS, "bench", ("bench", "benchmarks"))
    args = psynth_main.build_parser().parse_args(["bench", "ttft", "--arch", "qwen3-8b", "--ks", "1,4",
                                                  "--ls", "512,1024"])
    assert args._module is bench_cli and args._bench is ttft.run
    assert args.ks == [1, 4] and args.ls == [512, 1024] and args.dtype == "auto"
    with pytest.raises(SystemExit):
        psynth_main.build_parser().parse_args(["bench", "ttft", "--ks", "1,x"])
