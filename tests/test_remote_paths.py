"""gs:// run directories through etils.epath (formats/paths.py), against a local stand-in for GCS.

Eval out_dirs, the distillation cache and `train.init_from` accept gs:// paths, so a multi-host
eval or stage 2 needs no shared filesystem: files are objects, rewritten whole where a local file
is appended to. `pathlib.Path` would have turned gs://bucket/run into a local "gs:/bucket/run".
"""

from __future__ import annotations

import json
from pathlib import Path

from gcs_standin import local_gcs  # noqa: F401  (a pytest fixture)
from psynth_jax.config import dump_config, load_config
from psynth_jax.data import distill
from psynth_jax.eval.store import BranchSet, JsonlLog, ModeRecord, RunStore
from psynth_jax.formats.paths import append_text, as_path
from psynth_jax.interop.runs import run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pathlib_loses_the_scheme_and_as_path_keeps_it():
    assert str(Path("gs://bucket/run")) == "gs:/bucket/run"
    assert str(as_path("gs://bucket/run") / "records.jsonl") == "gs://bucket/run/records.jsonl"
    assert isinstance(as_path("runs/x"), Path)


def test_append_and_repair_on_an_object_store(local_gcs):
    log_path = as_path("gs://bucket/eval/records.jsonl")
    append_text(log_path, '{"a": 1}\n')
    append_text(log_path, '{"a": 2}\n{"a": 3')  # a torn last line, as an interrupted writer leaves
    assert (local_gcs / "bucket/eval/records.jsonl").read_text().count("\n") == 2
    assert [r["a"] for r in JsonlLog(log_path).rows] == [1, 2]
    assert (local_gcs / "bucket/eval/records.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'  # repaired


def test_an_eval_store_on_gs_resumes_and_merges_every_process_part(local_gcs):
    meta = {"worker_tokens": 8}
    first = RunStore("gs://bucket/eval", meta, "cfg: 1\n", part=0)
    second = RunStore("gs://bucket/eval", meta, "cfg: 1\n", part=1)
    first.add_branches([BranchSet("gsm8k", "a", 0, [[1, 2]], ["x"])])
    second.add_records([ModeRecord(task="gsm8k", id="b", mode="text", text="4", answer="4", correct=True,
                                   output_tokens=1, prompt_tokens=9, branch_tokens=0, num_branches=3, ttft_s=None,
                                   breakdown={}, device="cpu")])
    resumed = RunStore("gs://bucket/eval", meta, "cfg: 1\n")
    assert ("gsm8k", "a") in resumed.branches and ("gsm8k", "b", "text") in resumed.records
    resumed.merge_parts()
    assert sorted(p.name for p in (local_gcs / "bucket/eval").iterdir()) == [
        "branches.jsonl", "config.yaml", "records.jsonl", "run.json"]
    try:
        RunStore("gs://bucket/eval", {"worker_tokens": 9}, "cfg: 2\n")
    except ValueError as err:
        assert "worker_tokens: stored 8, now 9" in str(err)
    else:
        raise AssertionError("a different config was not refused")


def test_the_distillation_cache_on_gs_resumes_and_merges(local_gcs):
    cache = as_path("gs://bucket/run/distill/gsm8k.jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    append_text(distill.part_path(cache, 0), json.dumps({"id": "distillation/1"}) + "\n")
    append_text(distill.part_path(cache, 1), json.dumps({"id": "distillation/2"}) + "\n")
    assert distill.known_ids(cache) == {"distillation/1", "distillation/2"}
    distill.merge_parts(cache)
    assert distill.done_ids(cache) == {"distillation/1", "distillation/2"}
    assert sorted(p.name for p in (local_gcs / "bucket/run/distill").iterdir()) == ["gsm8k.jsonl"]


def test_init_from_reads_a_run_on_gs(local_gcs):
    cfg = load_config(ROOT / "configs/smollm2_135m_cpu.yaml", ["train.steps=7"])
    (local_gcs / "bucket/stage1/checkpoints").mkdir(parents=True)
    (local_gcs / "bucket/stage1/config.yaml").write_text(dump_config(cfg))
    assert run_config("gs://bucket/stage1").train.steps == 7
