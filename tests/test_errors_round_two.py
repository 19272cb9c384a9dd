"""Issue #28, "nothing lost, nothing silent, round two": each case the issue lists, through the real
command line (in-process `main`, or a subprocess where the process's own exit matters), on the
tiny random Llama with SmolLM2's tokenizer. Output-file cases: tests/test_output_policy.py;
generated inputs: tests/test_properties.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import psynth_jax.eval.runner  # noqa: F401 - bound to the real load_model before a test patches it
import psynth_jax.train.trainer  # noqa: F401 - the same
from psynth_jax.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from psynth_jax.interop import loader
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from test_errors_cli import GSM8K, REPO, eval_config, gsm8k_lines, psynth, snapshot, the_error, train_config
from tiny_smol import make_tiny_smol

pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_smol"))


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


# --------------------------------------------------------------------------- silent before
def test_training_stops_at_the_first_non_finite_step_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, tiny):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(gsm8k_lines(8)) + "\n")
    run = tmp_path / "run"
    cfg = train_config(tmp_path, tiny, data, run)
    code, err = psynth(capsys, "train", "--config", cfg, "--quiet", "train.lr=1e30", "train.steps=5")
    msg = the_error(err, "train")
    assert code == EXIT_FAILURE and "NonFiniteTraining: step " in msg and "nan" in msg, msg
    bad = int(msg.split("NonFiniteTraining: step ")[1].split(":")[0])
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad, (saved, bad)  # nothing of the bad step or after it
    assert f"the last checkpoint (step {max(saved)}) kept" in msg
    assert not (run / "summary.json").exists()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in logged for k, v in r.items() if k in ("loss", "grad_norm"))


@pytest.mark.parametrize("argv, flag", [
    (["generate", "q", "--temperature", "nan"], "--temperature"),
    (["generate", "q", "--temperature", "-1"], "--temperature"),
    (["generate", "q", "--top-p", "nan"], "--top-p"),
    (["demo", "--temperature", "inf"], "--temperature"),
    (["build-data", "--source", "x.jsonl", "--builder", "exposure", "--out", "o.jsonl", "--top-p", "1.5"], "--top-p"),
    (["bench", "roofline", "--mib", "-5"], "--mib"),
    (["bench", "roofline", "--mib", "0"], "--mib"),
    (["bench", "roofline", "--mib", "nan"], "--mib"),
    (["bench", "train", "--lr", "-1"], "--lr"),
    (["plan", "--config", "x.yaml", "--accelerator", "v5e-8", "--branches", "0"], "--branches"),
])
def test_numeric_flags_are_finite_and_in_range(capsys, no_model, argv, flag):
    code, err = psynth(capsys, *argv)
    assert code == EXIT_USAGE and f"argument {flag}: expected " in err and "Traceback" not in err, err


def test_yaml_duplicate_key_and_unclosed_brackets(tmp_path, capsys, tiny, no_model):
    out = tmp_path / "out"
    cfg = eval_config(tmp_path, tiny, out)
    text = cfg.read_text()
    cfg.write_text(text + "max_new_tokens: 8\n")  # the same key twice
    dup_line = len(text.splitlines()) + 1
    code, err = psynth(capsys, "eval", "--config", cfg)
    assert code == EXIT_USAGE and f"{cfg}:{dup_line}:1: YAML syntax error: duplicate key 'max_new_tokens'" in the_error(err, "eval")
    for opener, broken in (("{", "model: {source: x, dtype: float32\n"), ("[", "modes: [single, text\n")):
        lines = text.splitlines(keepends=True)
        index = next(i for i, line in enumerate(lines) if line.startswith(broken.split(":")[0] + ":"))
        lines[index] = broken
        cfg.write_text("".join(lines))
        code, err = psynth(capsys, "eval", "--config", cfg)
        msg = the_error(err, "eval")
        assert code == EXIT_USAGE and f"{cfg}:{index + 1}:" in msg and f"this {opener} is not closed" in msg, msg
    assert not out.exists()


def test_eval_kl_on_an_out_dir_without_answers(tmp_path, capsys, tiny, no_model):
    out = tmp_path / "out"
    code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out), "--kl")
    assert code == EXIT_USAGE and "holds no recorded answers" in the_error(err, "eval")
    assert not out.exists()
    # an override written after the flag would be read as its task list
    for flag in ("--kl", "--retime"):
        code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out), flag, "tasks[0].limit=4")
        assert code == EXIT_USAGE and "put key=value overrides before the flag" in err, err
    assert not out.exists()


@pytest.mark.parametrize("row, field", [
    ({"question": 123, "answer": "6 * 2 = 12\n#### 12"}, "question"),
    ({"question": ["What is 6 * 2?"], "answer": "6 * 2 = 12\n#### 12"}, "question"),
    ({"question": "What is 6 * 2?", "answer": ["x"]}, "answer"),
])
def test_data_rows_are_checked_by_type(tmp_path, capsys, row, field):
    src = tmp_path / "rows.jsonl"
    good = json.loads(gsm8k_lines(1)[0])
    src.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out.jsonl"
    code, err = psynth(capsys, "build-data", "--source", src, "--builder", "aggregation", "--out", out)
    msg = the_error(err, "build-data")
    assert code == EXIT_USAGE and f"{src}:2" in msg and f"field '{field}' must be text" in msg, msg
    assert not out.exists()


def test_eval_token_budget_beyond_the_model_is_refused_before_answering(tmp_path, capsys, tiny):
    out = tmp_path / "out"
    cfg = eval_config(tmp_path, tiny, out)
    code, err = psynth(capsys, "eval", "--config", cfg, "worker_tokens=100000")
    assert code == EXIT_USAGE and "more than the model's 2048" in the_error(err, "eval")
    assert not out.exists()  # nothing left to refuse the corrected config
    code, err = psynth(capsys, "eval", "--config", cfg, "max_new_tokens=100000000", "modes=single")
    assert code == EXIT_USAGE and "max_new_tokens 100000000" in the_error(err, "eval") and not out.exists()


def test_lora_rank_beyond_the_width_and_a_batch_beyond_the_data(tmp_path, capsys, tiny):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(gsm8k_lines(6)) + "\n")
    run = tmp_path / "run"
    cfg = train_config(tmp_path, tiny, data, run)
    code, err = psynth(capsys, "train", "--config", cfg, "--quiet", "lora.rank=100000")
    assert code == EXIT_USAGE and "lora.rank 100000 exceeds the model's width (hidden_size 32" in the_error(err, "train")
    code, err = psynth(capsys, "train", "--config", cfg, "--quiet", "data.batch_size=1000")
    msg = the_error(err, "train")
    assert code == EXIT_USAGE and "data.batch_size=1000" in msg and "padding rows" in msg, msg
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# ------------------------------------------------------------------------ crash / exit codes
def test_eval_with_no_correct_answer_writes_the_report_and_plots(tmp_path, capsys, tiny):
    out = tmp_path / "out"
    code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out), "--quiet", "modes=single")
    assert code == 0, err
    single = json.loads((out / "results.json").read_text())["tasks"]["gsm8k"]["single"]
    assert single["correct"] == 0 and single["accuracy"] == 0.0 and single["ci95"][0] == 0.0
    assert "gsm8k" in (out / "results.md").read_text() and (out / "accuracy.png").stat().st_size > 0


def test_demo_with_a_worker_that_decodes_nothing(capsys, tiny, monkeypatch):
    real = ParallelSynthesis.run_workers

    def with_empty(which):
        def run_workers(self, *a, **k):
            out = real(self, *a, **k)
            for j in which:
                out.tokens[0][j], out.texts[0][j] = [], ""
            return out
        return run_workers

    monkeypatch.setattr(ParallelSynthesis, "run_workers", with_empty([1]))
    argv = ["demo", "--model", tiny, "--k", "3", "--worker-tokens", "4", "--max-new-tokens", "2"]
    code, err = psynth(capsys, *argv)
    assert code == 0 and "branch 2 decoded 0 tokens" in err and "from branch 1, 3" in err, err
    monkeypatch.setattr(ParallelSynthesis, "run_workers", with_empty([0, 1, 2]))
    code, err = psynth(capsys, *argv)
    msg = the_error(err, "demo")
    assert code == EXIT_FAILURE and "every worker branch (1, 2, 3) decoded 0 tokens" in msg, msg


# SIGINT at ten moments of an eval, spanning loading, compiling and answering: every other one in
# CI, all ten with `pytest -m slow`
CTRL_C_DELAYS = [1.5, 4.5, 7.5, 10.5, 13.5] + [pytest.param(d, marks=pytest.mark.slow) for d in (3, 6, 9, 12, 15)]


@pytest.mark.parametrize("delay", CTRL_C_DELAYS)
def test_ctrl_c_in_eval_exits_130(tmp_path, tiny, delay):
    """SIGINT `delay` seconds into an eval: "interrupted", exit 130, never a crash (it was a
    Segmentation fault, 139) and never lost (an interrupt that landed in jax's gc callback was
    printed as "Exception ignored" and the run went on)."""
    cfg = eval_config(tmp_path, tiny, tmp_path / "out")
    # 400 examples: far more than any delay covers (40 finished inside 7.5 s on a faster CPU)
    cfg.write_text(cfg.read_text().replace("limit: 2", "limit: 400").replace("modes: [single, text]",
                                                                          "modes: [single, text, psynth]"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    # Ctrl-C is restored to its default by the child itself before it execs the CLI (a background
    # pytest ignores SIGINT, and children inherit that), not by a preexec_fn: Python code run
    # between fork and exec in this multithreaded process (JAX's threads) can deadlock, and did in
    # CI: the child never reached the CLI and stayed silent past the signal
    with_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    proc = subprocess.Popen([sys.executable, "-c", with_sigint, "-m", "psynth_jax.cli.main", "eval",
                             "--config", str(cfg), "--quiet"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1].decode() + "\n(still running 60 s after Ctrl-C)"
    assert proc.returncode == EXIT_INTERRUPTED and "psynth eval: interrupted" in err, (delay, proc.returncode, err[-2000:])


# -------------------------------------------------------------------------------- messages
def test_unknown_model_name(capsys, monkeypatch):
    from psynth_jax.interop import sources

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")  # what httpx's ConnectError wraps
    monkeypatch.setattr(sources, "snapshot_download", offline)
    code, err = psynth(capsys, "generate", "hi", "--model", "no-such-model")
    msg = the_error(err, "generate")
    assert code == EXIT_USAGE and "'no-such-model' (--model / model.source) is not a built-in name (smollm2-135m), " \
                                  "a local path or a reachable hub id" in msg, msg


def test_config_json_field_of_the_wrong_type_and_a_folder_without_tokenizer(tmp_path, capsys, tiny):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, num_hidden_layers="two")))
    code, err = psynth(capsys, "generate", "hi", "--model", bad)
    assert code == EXIT_USAGE and (f"{bad / 'config.json'}: field 'num_hidden_layers' must be a positive integer, "
                                   "got 'two'") in the_error(err, "generate")
    (bad / "config.json").write_text(json.dumps(config))
    for f in bad.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            f.unlink()
    code, err = psynth(capsys, "generate", "hi", "--model", bad)
    assert code == EXIT_USAGE and f"{bad} has no tokenizer files" in the_error(err, "generate")


def test_a_folder_of_non_data_files_and_a_corrupt_parquet_are_named(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "image.png").write_bytes(b"\x89PNG")
    corrupt = tmp_path / "rows.parquet"
    corrupt.write_bytes(b"PAR1" + bytes(range(200)))
    for source, named in ((folder, f"{folder}: a folder with no data files"), (corrupt, f"{corrupt}: cannot be read")):
        code, err = psynth(capsys, "build-data", "--source", source, "--builder", "exposure", "--out", tmp_path / "o.jsonl")
        assert code == EXIT_USAGE and named in the_error(err, "build-data"), err


def test_non_utf8_question_argument(capsys, tiny, no_model):
    question = os.fsdecode(b"what is 2+2? \xff")  # as Python hands over an undecodable argv
    code, err = psynth(capsys, "generate", question, "--model", tiny)
    assert code == EXIT_USAGE and "the question is not UTF-8 text (byte 0xff" in the_error(err, "generate")


def test_demo_names_an_empty_data_file_and_a_row_too_long_for_the_model(tmp_path, capsys, tiny, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    code, err = psynth(capsys, "demo", "--model", tiny, "--data", empty)
    assert code == EXIT_USAGE and f"--data {empty} holds no GSM8K rows" in the_error(err, "demo")
    monkeypatch.setattr(ParallelSynthesis, "run_workers", lambda *a, **k: pytest.fail("workers were decoded"))
    long = tmp_path / "long.jsonl"
    row = json.loads(gsm8k_lines(1)[0])
    long.write_text(json.dumps(dict(row, question="How many apples? " * 1500)) + "\n")  # > 2048 positions
    code, err = psynth(capsys, "demo", "--model", tiny, "--data", long, "--k", "1", "--worker-tokens", "1")
    msg = the_error(err, "demo")
    assert code == EXIT_USAGE and "GSM8K test #0" in msg and "is too long" in msg and "--k" not in msg, msg


def test_debug_keeps_the_exit_code_of_an_input_error(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    code, err = psynth(capsys, "--debug", "eval", "--config", missing)
    assert code == EXIT_USAGE and "Traceback" in err and f"psynth eval: error: config file not found: {missing}" in err
    before = snapshot(tmp_path)
    code, err = psynth(capsys, "build-data", "--debug", "--source", tmp_path / "nope.jsonl", "--builder", "exposure",
                       "--out", tmp_path / "o.jsonl")
    assert code == EXIT_USAGE and "Traceback" in err and snapshot(tmp_path) == before
