"""Property-based checks of the error contract (issue #28): for generated config overrides, flag
values and data rows, `psynth` never shows a traceback, an input it refuses exits 2 with one
`psynth CMD: error:` line, and nothing outside the output is written or changed.

Every case stops before a model is loaded (load_model is replaced by a stub that raises
`Reached`: an input that gets that far was accepted), so the whole file runs in well under a
minute. The examples are derandomized: CI runs the same ones each time.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import psynth_jax.eval.runner  # noqa: F401 - imported (bound to loader.load_model) before the patch
import psynth_jax.train.trainer  # noqa: F401 - the same
from psynth_jax.cli.main import EXIT_USAGE, main
from psynth_jax.interop import loader

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/test.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")
CHECKS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Reached(Exception):
    """Raised by the load_model stub: the input passed every check made before loading."""


@pytest.fixture(autouse=True)
def stub_model(monkeypatch):
    def load_model(*a, **k):
        raise Reached("the input was accepted")
    for module in (loader, psynth_jax.eval.runner, psynth_jax.train.trainer):
        monkeypatch.setattr(module, "load_model", load_model)


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def check_contract(code: int, err: str, command: str) -> None:
    """Accepted (reached the model load: exit 1 naming Reached) or refused with exit 2 and one line."""
    assert "Traceback" not in err, err
    event("accepted" if code == 1 else f"refused (exit {code})")  # --hypothesis-show-statistics
    if code == 1:
        assert "Reached: the input was accepted" in err, err
        return
    assert code == EXIT_USAGE, (code, err)
    lines = [line for line in err.splitlines() if line.startswith((f"psynth {command}: error:", "psynth: error:",
                                                                  f"psynth {command}: error"))
             or ": error: argument" in line]
    assert len(lines) == 1, err


# Values a user may type: numbers of every kind (nan, inf, huge, negative), words, lists, empties.
NUMBERS = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e30", "1e-30", "0", "-0", "1e309", "0x10", "1_000"]),
)
VALUES = st.one_of(NUMBERS, st.text(max_size=12), st.sampled_from(["[1, 2]", "{a: 1}", "null", "true", "[", "{"]))

EVAL_CONFIG = """model: {{source: {model}, dtype: float32}}
tasks:
  - {{name: gsm8k, limit: 2, path: {data}}}
modes: [single, text]
worker_tokens: 4
max_new_tokens: 4
timing_repeats: 0
out_dir: {out}
"""
EVAL_KEYS = ["worker_tokens", "max_new_tokens", "num_workers", "timing_repeats", "worker_temperature",
             "worker_top_p", "synth_temperature", "batch_size", "seed", "score_workers", "code_timeout_s",
             "tasks[0].limit", "mesh.data", "mesh.fsdp", "model.dtype", "modes", "timing_examples"]


@CHECKS
@given(overrides=st.lists(st.tuples(st.sampled_from(EVAL_KEYS), VALUES), min_size=1, max_size=3))
def test_eval_config_overrides(capsys, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = root / "eval.yaml"
        cfg.write_text(EVAL_CONFIG.format(model=root / "model", data=GSM8K, out=root / "out"))
        before = snapshot(root)
        code, err = run(capsys, ["eval", "--config", cfg, *[f"{k}={v}" for k, v in overrides]])
        check_contract(code, err, "eval")
        assert snapshot(root) == before  # no out_dir left behind, the config untouched


TRAIN_KEYS = ["train.lr", "train.steps", "train.warmup_steps", "train.weight_decay", "train.clip_norm",
              "train.grad_accum", "lora.rank", "lora.alpha", "data.batch_size", "data.num_branches",
              "data.min_branches", "data.max_branches", "data.max_total_tokens", "data.max_live_tokens",
              "checkpoint.every_steps", "checkpoint.keep", "log_every", "eval_every", "mesh.tensor",
              "train.loss.kl_weight", "train.loss.kl_temperature", "data.train[0].limit", "data.train[0].weight"]


@CHECKS
@given(overrides=st.lists(st.tuples(st.sampled_from(TRAIN_KEYS), VALUES), min_size=1, max_size=3))
def test_train_config_overrides(capsys, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = root / "train.yaml"
        cfg.write_text(f"base: {REPO / 'configs/smollm2_135m_cpu.yaml'}\ncheckpoint: {{dir: {root / 'run'}}}\n"
                       f"data: {{train: [{{path: {GSM8K}, builder: aggregation}}]}}\n")
        before = snapshot(root)
        code, err = run(capsys, ["train", "--config", cfg, "--quiet", *[f"{k}={v}" for k, v in overrides]])
        check_contract(code, err, "train")
        assert snapshot(root) == before


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A flag value: in range half the time (so accepted inputs are generated too), anything else otherwise."""
    return st.one_of(valid.map(repr), VALUES)


@CHECKS
@given(question=st.text(min_size=0, max_size=40), temperature=mostly(st.floats(0, 2)),
       top_p=mostly(st.floats(0.01, 1)), tokens=mostly(st.integers(1, 64)), seed=mostly(st.integers(0, 2**31)))
def test_generate_flags(capsys, question, temperature, top_p, tokens, seed):
    code, err = run(capsys, ["generate", question, "--temperature", temperature, "--top-p", top_p,
                             "--max-new-tokens", tokens, "--seed", seed])
    check_contract(code, err, "generate")
    if code == 1:  # accepted: every number finite and in range
        assert math.isfinite(float(temperature)) and float(temperature) >= 0
        assert 0 < float(top_p) <= 1 and int(tokens) >= 1


# A field's value: text (a GSM8K answer shape among them), or every other JSON type.
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=20)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=6)
FIELD = st.one_of(JSON_VALUES, st.builds(lambda a, b: f"{a}\n#### {b}", st.text(max_size=20), st.integers(0, 99)))
GSM8K_ROWS = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:10]] if GSM8K.is_file() else [{}]
RANDOM_ROW = st.dictionaries(st.sampled_from(["question", "answer", "problem", "solution", "id"]), FIELD,
                             min_size=1, max_size=4)
MUTATED_ROW = st.builds(lambda row, key, value: {**row, key: value}, st.sampled_from(GSM8K_ROWS),
                        st.sampled_from(["question", "answer", "id"]), FIELD)
ROWS = st.lists(st.one_of(st.sampled_from(GSM8K_ROWS), MUTATED_ROW, RANDOM_ROW), min_size=1, max_size=4)


@CHECKS
@given(rows=ROWS, builder=st.sampled_from(["exposure", "aggregation"]), suffix=st.sampled_from([".jsonl", ".json"]))
def test_data_rows(capsys, rows, builder, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / f"rows{suffix}"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows))
        before = snapshot(root)
        out = root / "out.jsonl"
        code, err = run(capsys, ["build-data", "--source", src, "--builder", builder, "--out", out])
        assert "Traceback" not in err, err
        assert code in (0, EXIT_USAGE), (code, err)
        event(f"exit {code}")
        after = snapshot(root)
        if code == 0:
            assert set(after) == set(before) | {"out.jsonl"}  # only the output, no temporary file left
            after.pop("out.jsonl")
        else:
            assert len([line for line in err.splitlines() if line.startswith("psynth build-data: error:")]) == 1, err
        assert after == before  # the source untouched
