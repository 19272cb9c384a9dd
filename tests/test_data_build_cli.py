"""`psynth build-data`: model-free builders to jsonl / parquet, a clear error for a missing
source, and resumable distillation on the embedded SmolLM2 (tiny settings, about a minute)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from psynth_jax.cli.main import main
from psynth_jax.data.examples import read_examples
from psynth_jax.interop import loader

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def _run(*argv: str) -> int:
    """`psynth build-data ARGV` through the CLI's one error path (exit code, one-line message)."""
    return main(["build-data", *argv])


@pytest.mark.parametrize("builder", ["exposure", "aggregation"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_model_free_builders_write_jsonl_and_parquet(tmp_path, builder, suffix, capsys):
    out = tmp_path / f"{builder}{suffix}"
    assert _run("--source", str(GSM8K_TEST), "--builder", builder, "--out", str(out), "--limit", "6", "--k", "3") == 0
    examples = read_examples(out)
    assert len(examples) == 6 and all(e.num_branches == 3 for e in examples)
    assert all(e.id.startswith(f"{builder}/gsm8k/test/") for e in examples)
    assert f"wrote 6 {builder} examples" in capsys.readouterr().out


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "gsm8k.jsonl"
    assert _run("--source", str(missing), "--builder", "exposure", "--out", str(tmp_path / "x.jsonl")) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(missing) in err
    assert not (tmp_path / "x.jsonl").exists()


def test_distillation_resumes_and_only_generates_new_ids(tmp_path, monkeypatch):
    # one model load for both runs (the CLI loads it through psynth_jax.interop.loader)
    monkeypatch.setattr(loader, "load_model", functools.cache(loader.load_model))
    out = tmp_path / "distill.jsonl"
    tiny = ["--source", str(GSM8K_TEST), "--builder", "distillation", "--out", str(out), "--k", "2",
            "--worker-tokens", "4", "--max-new-tokens", "4", "--batch-size", "2"]
    assert _run(*tiny, "--limit", "2") == 0
    first = out.read_text().splitlines()
    assert len(first) == 2
    # an interrupted write leaves a torn last line: it is dropped and redone
    out.write_text(out.read_text() + first[1][:25])
    assert _run(*tiny, "--limit", "4") == 0
    lines = out.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [f"distillation/gsm8k/test/{i}" for i in range(4)]
    for r in rows:
        assert len(r["branches"]) == 2 and all(b["prefix"] == "" for b in r["branches"])
        assert r["meta"]["answer"] and isinstance(r["target"], str)
    # nothing left to do: no model call, file unchanged
    assert _run(*tiny, "--limit", "4") == 0
    assert out.read_text().splitlines() == lines


def test_any_role_and_row_format_as_training_would_build_it(tmp_path, capsys):
    from psynth_jax.formats import splits
    from psynth_jax.formats.records import read_records

    src = GSM8K_TEST.parents[1] / "multihop_evidence" / "hotpotqa_200_migres.jsonl"
    out = tmp_path / "evidence.jsonl"
    assert _run("--source", str(src), "--builder", "aggregation", "--variant", "reasoned", "--out", str(out),
                "--limit", "12", "--max-k", "5") == 0
    held = sum(splits.is_heldout(splits.MULTIHOP, r["_id"]) for r in read_records(src)[:12])
    examples = read_examples(out)
    assert len(examples) == 12 - held and all(e.family == "qa" and e.num_branches <= 5 for e in examples)
    assert all(e.target.endswith("}.") and e.id.startswith("evidence-reasoned/") for e in examples)
    assert f"'held out for evaluation': {held}" in capsys.readouterr().out
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"what": "unknown layout"}) + "\n")
    assert _run("--source", str(odd), "--builder", "exposure", "--out", str(tmp_path / "x.jsonl")) == 2
    assert 'cannot recognise the row format of its first row: {"what": "unknown layout"}' in capsys.readouterr().err
