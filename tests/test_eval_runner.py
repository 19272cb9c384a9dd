"""`psynth eval` end to end, offline, on a tiny random backbone with the real SmolLM2 tokenizer.

The backbone has SmolLM2's vocabulary, chat template and stop token but 2 small layers of random
weights, so every mode runs through the real pipeline (worker decode, branch KV rebuilt from
stored tokens, cache / text / single paths, scoring with the code sandbox) in seconds. Answers
are gibberish; what is checked is the machinery: files written, numbers consistent, resume
without recomputation, identical results after an interruption, config errors before any load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from psynth_jax.config.eval_schema import ConfigError, EvalConfig, dump_eval_config, fingerprint, load_eval_config
from psynth_jax.eval import runner as runner_mod
from psynth_jax.eval.report import RESULTS_MD
from psynth_jax.eval.store import BRANCHES, KL, RECORDS, JsonlLog, RunStore
from psynth_jax.interop import loader
from psynth_jax.model.loaded import random_model
from psynth_jax.synthesis.pipeline import ParallelSynthesis

from gcs_standin import local_gcs  # noqa: F401  (a pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("humaneval", "marble_db")  # a code task (sandbox scoring) and MARBLE (K = expert profiles)
CACHE_MODES = ("naive_cache", "mapper_only", "lora_only", "psynth")


@pytest.fixture(scope="module")
def tiny_model():
    """SmolLM2's tokenizer (vocabulary, chat template, stop token) around a 2-layer random decoder
    with a LoRA attached (B = 0)."""
    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer
    from psynth_jax.model.config import ModelConfig
    from psynth_jax.model.transformer import LoRAConfig

    tokenizer = load_tokenizer(default_gguf_path())
    cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                      eos_token_ids=(tokenizer.eos_token_id,))
    model = random_model(cfg, lora=LoRAConfig(rank=4, alpha=8.0), seed=0)
    return dataclasses.replace(model, tokenizer=tokenizer)


def make_config(out_dir: Path, **changes) -> EvalConfig:
    text = "\n".join([
        "tasks:", *(f"  - {{name: {t}, limit: 2}}" for t in TASKS),
        "worker_tokens: 8", "max_new_tokens: 8", "timing_repeats: 1", "batch_size: 2", "num_workers: 3",
        f"out_dir: {out_dir}",
    ])
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(text)
    return load_eval_config(path, [f"{k}={v}" for k, v in changes.items()])


# the ParallelSynthesis methods a request goes through -> the path they are counted as: the worker
# stage, and each path's steps (what the runner answers with, and times)
ENTRY_POINTS = {"run_workers": "run_workers", "single_steps": "single_agent", "text_steps": "text_path",
                "cache_steps": "cache_path"}


class Counter:
    """Records every ParallelSynthesis request (monkeypatched in): (path, requests, max_new_tokens)."""

    def __init__(self, monkeypatch, fail_on_cache_call: int | None = None):
        self.calls: list[tuple[str, int, int | None]] = []
        for method, name in ENTRY_POINTS.items():
            original = getattr(ParallelSynthesis, method)
            monkeypatch.setattr(ParallelSynthesis, method, self._wrap(name, original, fail_on_cache_call))

    def _wrap(self, name, original, fail_on):
        def wrapped(synth, *args, **kwargs):
            self.calls.append((name, len(args[0]), kwargs.get("max_new_tokens")))
            if name == "cache_path" and sum(c[0] == "cache_path" for c in self.calls) == fail_on:
                raise KeyboardInterrupt("simulated interruption")
            return original(synth, *args, **kwargs)

        return wrapped

    def requests(self, *names: str, max_new_tokens: int | None = None) -> int:
        return sum(n for name, n, budget in self.calls
                   if name in names and (max_new_tokens is None or budget == max_new_tokens))


def stable(results: dict) -> dict:
    """results.json without what legitimately changes between sessions (timings, wall time)."""
    out = json.loads(json.dumps(results))
    out.pop("session")
    out["config"].pop("out_dir")
    for scope in [*out["tasks"].values(), out["overall"]]:
        for m in scope.values():
            m.pop("ttft_ms")
            m.pop("speedup_vs_text")
    return out


def answers(run_dir: Path) -> dict:
    rows = JsonlLog(run_dir / RECORDS).rows
    return {(r["task"], r["id"], r["mode"]): (r["text"], r["correct"]) for r in rows}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One uninterrupted eval of 2 examples x 2 tasks x 6 modes, batched 2 requests per call."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return runner_mod.run_eval(make_config(out), model=tiny_model, quiet=True)


def test_end_to_end_files_and_consistent_numbers(reference):
    d, res = reference.run_dir, reference.results
    for name in ("results.json", "results.md", "accuracy.png", "ttft_vs_branch_tokens.png", "branches.jsonl"):
        assert (d / name).is_file(), name
    assert json.loads((d / "results.json").read_text()) == res
    assert res["complete"] and res["n_examples"] == {t: 2 for t in TASKS}
    for task in TASKS:
        for mode, m in res["tasks"][task].items():
            assert m["n"] == 2 and m["accuracy"] == m["correct"] / m["n"]
            lo, hi = m["ci95"]
            assert 0 <= lo <= m["accuracy"] <= hi <= 1
            if mode != "text":
                assert 0 <= m["agreement_with_text"] <= 1
            assert m["ttft_ms"]["n"] == 2 and 0 < m["ttft_ms"]["median"] <= m["ttft_ms"]["p90"]
    assert res["overall"]["text"]["n"] == 4
    # the K branches: 3 workers per example, one per expert profile (5) for MARBLE
    branches = JsonlLog(d / "branches.jsonl").rows
    assert sorted(len(b["tokens"]) for b in branches) == [3, 3, 5, 5]
    # without an adapter the trained-weight modes are flagged, and really equal naive_cache
    assert set(res["untrained"]) == {"mapper_only", "lora_only", "psynth"}
    assert "UNTRAINED" in (d / "results.md").read_text()
    model = json.loads((d / "weights.json").read_text())["model"]  # names, not this machine's paths
    assert "/" not in model["source"] and "/" not in model["checkpoint"] and model["family"] == "llama"
    got = answers(d)
    for task, ex_id, mode in got:
        if mode in CACHE_MODES:
            assert got[(task, ex_id, mode)] == got[(task, ex_id, "naive_cache")]
    # every mode saw the same branches; the text path prefills them, the cache path does not
    recs = {(r["task"], r["id"], r["mode"]): r for r in JsonlLog(d / RECORDS).rows}
    for b in branches:
        total = sum(len(t) for t in b["tokens"])
        rec = {mode: recs[(b["task"], b["id"], mode)] for mode in ("text", *CACHE_MODES)}
        assert all(r["branch_tokens"] == total for r in rec.values())
        assert rec["text"]["prompt_tokens"] > rec["psynth"]["prompt_tokens"]
    assert "batch size 1" in res["timing"]["method"]
    assert reference.computed == {"worker_calls": 2, "worker_examples": 4, "mode_calls": 12, "records": 24}


def test_resume_after_interruption_recomputes_nothing_finished(tiny_model, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_config(out)
    first = Counter(monkeypatch, fail_on_cache_call=1)  # dies at the first cache mode (humaneval)
    with pytest.raises(KeyboardInterrupt):
        runner_mod.run_eval(cfg, model=tiny_model, quiet=True)
    done_before = answers(out)
    stored = len(JsonlLog(out / "branches.jsonl").rows)
    assert len(done_before) == 4 and first.requests("run_workers") == stored == 2  # single + text done
    with (out / RECORDS).open("a") as f:  # a line torn by the interruption
        f.write('{"task": "humaneval", "id": "HumanEval/1", "mo')

    monkeypatch.undo()
    second = Counter(monkeypatch)
    outcome = runner_mod.run_eval(cfg, model=tiny_model, quiet=True)
    assert outcome.computed["records"] == 24 - len(done_before)
    assert second.requests("run_workers") == 4 - stored  # stored branches reused, missing ones decoded
    paths = ("single_agent", "text_path", "cache_path")
    assert second.requests(*paths, max_new_tokens=8) == 24 - len(done_before)  # answers, batched by 2
    assert second.requests(*paths, max_new_tokens=1) == 24 - len(done_before)  # TTFT, one request a call
    assert {n for name, n, budget in second.calls if budget == 1} == {1}
    assert {n for name, n, budget in second.calls if budget == 8} == {2}
    rows = JsonlLog(out / RECORDS).rows
    assert len(rows) == 24 and len({(r["task"], r["id"], r["mode"]) for r in rows}) == 24
    assert all(answers(out)[k] == v for k, v in done_before.items())  # finished answers untouched
    assert answers(out) == answers(reference.run_dir)  # same as never interrupted
    assert stable(outcome.results) == stable(reference.results)
    assert json.loads((out / "branches.jsonl").read_text().splitlines()[0]) == \
        json.loads((reference.run_dir / "branches.jsonl").read_text().splitlines()[0])


def test_timing_examples_times_only_each_tasks_first_examples(tiny_model, tmp_path, monkeypatch):
    calls = Counter(monkeypatch)
    outcome = runner_mod.run_eval(make_config(tmp_path / "run", timing_examples=1), model=tiny_model, quiet=True)
    rows = JsonlLog(tmp_path / "run" / RECORDS).rows
    first = {t: next(r["id"] for r in rows if r["task"] == t) for t in TASKS}  # records follow source order
    assert calls.requests("single_agent", "text_path", "cache_path", max_new_tokens=1) == len(TASKS) * 6
    for r in rows:
        assert (r["ttft_s"] is not None) == (r["id"] == first[r["task"]]), (r["task"], r["id"], r["mode"])
    assert all(m["ttft_ms"]["n"] == 1 for scope in outcome.results["tasks"].values() for m in scope.values())
    assert "first 1 examples" in outcome.results["timing"]["method"]


def test_finished_run_reports_without_loading_a_model(reference, monkeypatch):
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("model loaded for a finished run"))
    cfg = make_config(reference.run_dir)
    again = runner_mod.run_eval(cfg, quiet=True)
    assert again.computed == {} and stable(again.results) == stable(reference.results)


def test_changed_result_defining_config_is_refused(reference):
    with pytest.raises(ValueError, match="worker_tokens: stored 8, now 9"):
        runner_mod.run_eval(make_config(reference.run_dir, worker_tokens=9), quiet=True)


@pytest.mark.parametrize("override, field", [
    ("tasks[1].name=humaneva", "tasks[1].name"),
    ("modes=[text, psynth, cache]", "modes[2]"),
    ("batch_size=0", "batch_size"),
])
def test_bad_config_names_the_field_before_any_load(tmp_path, monkeypatch, override, field):
    from psynth_jax.cli import eval as eval_cli

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad config"))
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):  # task names: checked where tasks load
        runner_mod.load_examples(make_config(tmp_path / "run", **dict([override.split("=", 1)])))
    args = argparse.Namespace(config=str(ROOT / "configs/eval_smoke.yaml"), overrides=[override], quiet=True)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        eval_cli.run(args)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("eval_*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_configs_load_and_round_trip(path, tmp_path):
    cfg = load_eval_config(path)
    recipe = {"arc_challenge", "marble_db", "multihop_qa", "tool_calls"}  # the recipe's evidence tasks
    every = {"gsm8k", "math500", "humaneval", "mbpp", "arc_challenge", "marble_db"}
    study26 = recipe - {"tool_calls"}  # issue #26: the tasks above the floor, 100 examples each
    expected = {"eval_recipe_smollm2_cpu.yaml": recipe, "eval_study26_smollm2_cpu.yaml": study26}.get(path.name, every)
    assert {t.name for t in cfg.tasks} == expected
    if path.name == "eval_study26_smollm2_cpu.yaml":
        assert {t.limit for t in cfg.tasks} == {100} and cfg.timing_repeats == 0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_eval_config(cfg))
    assert load_eval_config(dumped) == cfg


def test_eval_plugs_into_psynth_main(monkeypatch):
    from psynth_jax.cli import eval as eval_cli
    from psynth_jax.cli import main as psynth_main

    monkeypatch.setitem(psynth_main.COMMANDS, "eval", ("eval", "evaluate"))
    args = psynth_main.build_parser().parse_args(["eval", "--config", "c.yaml", "tasks[0].limit=5", "out_dir=x"])
    assert args._module is eval_cli and args.config == "c.yaml"
    assert args.overrides == ["tasks[0].limit=5", "out_dir=x"] and not args.quiet and args.retime is None
    args = psynth_main.build_parser().parse_args(["eval", "--config", "c.yaml", "--retime", "gsm8k,mbpp"])
    assert args.retime == "gsm8k,mbpp"
    assert psynth_main.build_parser().parse_args(["eval", "--config", "c.yaml", "--retime"]).retime == ""


def test_retime_measures_again_without_answering(tiny_model, reference, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference.run_dir, out)
    before = _records(out)
    calls = Counter(monkeypatch)
    outcome = runner_mod.run_eval(make_config(out), model=tiny_model, quiet=True, retime=["marble_db"])
    # one batch-1, one-token call per (marble example, mode); no worker decoding, no answering
    assert calls.requests("run_workers") == 0
    assert calls.requests("single_agent", "text_path", "cache_path", max_new_tokens=1) == 2 * 6
    assert calls.requests("single_agent", "text_path", "cache_path", max_new_tokens=8) == 0
    assert outcome.computed == {"retimed": 12}
    after = _records(out)
    assert len(JsonlLog(out / RECORDS).rows) == 24 + 12  # appended, nothing rewritten
    for key, old in before.items():
        new = after[key]
        assert (new["text"], new["correct"], new["answer"]) == (old["text"], old["correct"], old["answer"])
        retimed = key[0] == "marble_db"
        assert (new["ttft_s"] != old["ttft_s"]) == retimed, key  # a fresh measurement, only where asked
        assert new["ttft_s"] > 0
    assert stable(outcome.results) == stable(reference.results)  # accuracy etc. unchanged
    new_ttfts = [r["ttft_s"] for k, r in after.items() if k[0] == "marble_db" and k[2] == "psynth"]
    assert outcome.results["tasks"]["marble_db"]["psynth"]["ttft_ms"]["median"] == \
        pytest.approx(1e3 * statistics.median(new_ttfts), rel=1e-9)  # the report reads the new timings


def test_retime_refuses_unknown_tasks_and_unfinished_runs(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"cannot retime \['gsm8k'\]"):
        runner_mod.run_eval(make_config(tmp_path / "run"), model=tiny_model, quiet=True, retime=["gsm8k"])
    with pytest.raises(ValueError, match="not recorded yet"):
        runner_mod.run_eval(make_config(tmp_path / "run"), model=tiny_model, quiet=True, retime=[])
    assert not (tmp_path / "run" / RECORDS).exists() or not JsonlLog(tmp_path / "run" / RECORDS).rows


def _records(run_dir: Path) -> dict:
    """The current record per key (a later line supersedes an earlier one)."""
    return {(r["task"], r["id"], r["mode"]): r for r in JsonlLog(run_dir / RECORDS).rows}


def _kl(run_dir: Path) -> dict:
    """kl.jsonl's current value per key."""
    return {(r["task"], r["id"], r["mode"]): r["kl_from_text"] for r in JsonlLog(run_dir / KL).rows}


def test_kl_pass_needs_no_cache_mode_answers(tiny_model, reference, tmp_path, monkeypatch):
    """A weight set measured from a reference's branches and text answers alone (how issue #26
    measures every sweep point without decoding): each cache mode's KL equals the value measured
    in a run where that mode had answered; the report counts them though the modes never answered;
    a legacy record carrying its KL (runs made before kl.jsonl) still reads as a KL value."""
    import shutil

    full = tmp_path / "full"
    shutil.copytree(reference.run_dir, full)
    runner_mod.run_eval(make_config(full), model=tiny_model, quiet=True, kl=[])
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(full / BRANCHES, only / BRANCHES)
    text_rows = [r for r in JsonlLog(full / RECORDS).rows if r["mode"] == "text"]
    (only / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in text_rows))
    calls = Counter(monkeypatch)
    outcome = runner_mod.run_eval(make_config(only), model=tiny_model, quiet=True, kl=[])
    assert calls.requests("run_workers", "single_agent", "text_path", "cache_path") == 0
    assert set(_records(only)) == {(r["task"], r["id"], "text") for r in text_rows}  # nothing answered
    want, got = _kl(full), _kl(only)
    assert set(got) == set(want) and len(got) == 2 * 2 * len(CACHE_MODES)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert outcome.results["kl_from_text"]["all"]["lora_only"]["n"] == 4
    assert not outcome.results["complete"]
    banner = next(line for line in (only / RESULTS_MD).read_text().splitlines() if "Incomplete" in line)
    assert "of 4 examples: single 0, text 4, naive_cache 0," in banner and ", psynth 0;" in banner, banner
    # a record line of an older run, its KL inside: read as that key's KL value
    key = next(iter(want))
    legacy = {**next(r for r in JsonlLog(full / RECORDS).rows if (r["task"], r["id"], r["mode"]) == key),
              "kl_from_text": 0.125}
    (full / KL).unlink()
    with (full / RECORDS).open("a") as f:
        f.write(json.dumps(legacy) + "\n")
    store = RunStore(full, fingerprint(make_config(full)), "")
    assert store.kl == {key: 0.125} and key in store.records


def test_kl_pass_measures_each_cache_mode_on_the_text_answer(tiny_model, reference, tmp_path, monkeypatch):
    """`--kl`: every cache mode gains KL(text || mode) >= 0 in kl.jsonl, answers untouched, no
    decoding; the value is the mean over the answer's tokens (checked against a longer sequence:
    causal logits at the answer's positions cannot see what follows); a rerun measures nothing."""
    import shutil

    import numpy as np

    out = tmp_path / "run"
    shutil.copytree(reference.run_dir, out)
    records_before = (out / RECORDS).read_bytes()
    calls = Counter(monkeypatch)
    outcome = runner_mod.run_eval(make_config(out), model=tiny_model, quiet=True, kl=[])
    assert calls.requests("run_workers", "single_agent", "text_path", "cache_path") == 0
    assert outcome.computed == {"kl_measured": 2 * 2 * len(CACHE_MODES)}
    assert (out / RECORDS).read_bytes() == records_before
    measured = _kl(out)
    assert set(measured) == {(t, i, m) for (t, i, m) in _records(out) if m in CACHE_MODES}
    assert all(v >= -1e-6 for v in measured.values())
    kl = outcome.results["kl_from_text"]
    assert set(kl["all"]) == set(CACHE_MODES) and kl["all"]["psynth"]["n"] == 4
    assert kl["all"]["psynth"]["mean"] == pytest.approx(
        statistics.fmean(v for k, v in measured.items() if k[2] == "psynth"), abs=1e-12)
    assert "Teacher-forced KL(text || mode)" in (out / "results.md").read_text()
    after = _records(out)
    # the positions: the same KL from an answer followed by extra tokens, scored on the answer only
    runner = runner_mod.EvalRunner(make_config(out), model=tiny_model, quiet=True)
    runner._ensure_synth()
    ex = runner.examples["marble_db"][0]
    synth = runner._variant(ex.family, trained_mapper=False)  # naive_cache: the identity mapper
    answer = synth.tok.encode(after[("marble_db", ex.id, "text")]["text"], add_special_tokens=False)
    texts = [runner._branch_set(ex).texts[j] for j in runner._branch_set(ex).usable()]
    branches = runner._branch_caches([ex])
    (got,) = synth.teacher_forced_kl([ex.question], branches, [texts], [answer], lora=False)
    assert got == pytest.approx(measured[("marble_db", ex.id, "naive_cache")], abs=1e-5)
    # the first answer token is predicted at each prompt's last position: the logits the paths sample
    # their first token from (an independent reading of the alignment)
    (first,) = synth.teacher_forced_kl([ex.question], branches, [texts], [answer[:1]], lora=False)
    t = synth.text_path([ex.question], [texts], max_new_tokens=1).first_logits[0]
    c = synth.cache_path([ex.question], branches, max_new_tokens=1, lora=False).first_logits[0]
    lt, lc = t - np.logaddexp.reduce(t), c - np.logaddexp.reduce(c)
    assert first == pytest.approx(float(np.sum(np.exp(lt) * (lt - lc))), abs=1e-5)
    again = runner_mod.run_eval(make_config(out), model=tiny_model, quiet=True, kl=[])
    assert again.computed == {}


def test_an_eval_writes_its_run_to_a_gs_out_dir(tiny_model, local_gcs, tmp_path):
    """out_dir=gs://bucket/eval (a multi-host eval with no shared filesystem): records, branches, the
    report and its plots are objects there (a local stand-in for GCS here), and a rerun resumes."""
    config = tmp_path / "gs.yaml"
    config.write_text("\n".join(["tasks: [{name: humaneval, limit: 2}]", "modes: [single, text, psynth]",
                                 "worker_tokens: 8", "max_new_tokens: 8", "timing_repeats: 0", "batch_size: 2",
                                 "out_dir: gs://bucket/eval"]))
    outcome = runner_mod.run_eval(load_eval_config(config), model=tiny_model, quiet=True)
    assert str(outcome.run_dir) == "gs://bucket/eval"
    written = {p.name for p in (local_gcs / "bucket/eval").iterdir()}
    assert {"results.json", "results.md", "records.jsonl", "branches.jsonl", "accuracy.png", "run.json"} <= written
    assert len(JsonlLog(local_gcs / "bucket/eval" / RECORDS).rows) == 2 * 3
    again = runner_mod.run_eval(load_eval_config(config), model=tiny_model, quiet=True)
    assert sum(again.computed.values()) == 0 and again.results["tasks"] == outcome.results["tasks"]
