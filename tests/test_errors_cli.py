"""Bad input through `psynth`: one line naming the file (and line), the field or the flag; exit 2
for input errors, 1 for failures while running; nothing saved changed; checks before any model load.

Each case runs the real command line in-process (`psynth_jax.cli.main.main`) on a tiny random
Llama with SmolLM2's tokenizer, and checks the exact place the message points at, that no
traceback is printed, that the input files and any output directory are as they were (a failed
start leaves no empty run or out dir), and, where the check must come first, that no model was
loaded (load_model patched to fail) or no worker decoded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from psynth_jax.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, main
from psynth_jax.interop import loader
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from tiny_smol import make_tiny_smol

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/train.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_smol(tmp_path_factory.mktemp("tiny_smol"))


def psynth(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `psynth ARGV`; argparse's own errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def the_error(err: str, command: str) -> str:
    """The one error line of a failed command (progress lines may precede it; no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"psynth {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command loads a model."""
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def no_workers(monkeypatch):
    monkeypatch.setattr(ParallelSynthesis, "run_workers", lambda *a, **k: pytest.fail("workers were decoded"))


def gsm8k_lines(n: int) -> list[str]:
    with open(GSM8K, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def train_config(tmp: Path, model: Path, data: Path, run: Path, extra: str = "") -> Path:
    path = tmp / "train.yaml"
    path.write_text(f"""base: {REPO / 'configs/base.yaml'}
model: {{source: {model}, dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
data:
  train:
    - {{path: {data}, builder: aggregation}}
  buckets: [256, 512, 768]
  max_total_tokens: 768
  max_live_tokens: 256
  max_cache_tokens: 512
train: {{steps: 2, lr: 1.0e-2, compute_dtype: float32}}
checkpoint: {{dir: {run}, every_steps: 1}}
tensorboard: false
{extra}""")
    return path


def eval_config(tmp: Path, model: Path, out: Path, task_path: str | None = None) -> Path:
    path = tmp / "eval.yaml"
    task = f"{{name: gsm8k, limit: 2, path: {task_path}}}" if task_path else "{name: gsm8k, limit: 2}"
    path.write_text(f"""model: {{source: {model}, dtype: float32}}
tasks:
  - {task}
modes: [single, text]
worker_tokens: 4
max_new_tokens: 4
timing_repeats: 0
out_dir: {out}
""")
    return path


# ------------------------------------------------------------------------------- YAML and text
def test_yaml_syntax_error_in_a_train_config(tmp_path, capsys, tiny, no_model):
    cfg = train_config(tmp_path, tiny, GSM8K, tmp_path / "run", extra="mesh: {data: [1, 2}\n")
    line = cfg.read_text().splitlines().index("mesh: {data: [1, 2}") + 1
    before = snapshot(tmp_path)
    code, err = psynth(capsys, "train", "--config", cfg)
    msg = the_error(err, "train")
    assert code == EXIT_USAGE
    assert f"{cfg}:{line}:" in msg and "YAML syntax error" in msg, msg
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_yaml_syntax_error_in_an_eval_config(tmp_path, capsys, tiny, no_model):
    cfg = eval_config(tmp_path, tiny, tmp_path / "out")
    cfg.write_text(cfg.read_text().replace("modes: [single, text]", "modes: [single, text"))
    code, err = psynth(capsys, "eval", "--config", cfg)
    msg = the_error(err, "eval")
    assert code == EXIT_USAGE and f"{cfg}:" in msg and "YAML syntax error" in msg, msg
    assert not (tmp_path / "out").exists()


def test_non_utf8_config_names_file_line_and_column(tmp_path, capsys, tiny, no_model):
    cfg = train_config(tmp_path, tiny, GSM8K, tmp_path / "run")
    cfg.write_bytes(cfg.read_bytes().replace(b"tensorboard: false", b"tensorboard: false # caf\xe9"))
    line = cfg.read_bytes().split(b"\n").index(b"tensorboard: false # caf\xe9") + 1
    code, err = psynth(capsys, "train", "--config", cfg)
    msg = the_error(err, "train")
    assert code == EXIT_USAGE and f"{cfg}:{line}:25: not UTF-8 text (byte 0xe9)" in msg, msg
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_file(tmp_path, capsys):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(("\n".join(gsm8k_lines(1)) + "\n").encode() + '{"question": "caf\xe9", "answer": "#### 1"}\n'
                    .encode("latin-1"))
    code, err = psynth(capsys, "build-data", "--source", src, "--builder", "aggregation", "--out", tmp_path / "o.jsonl")
    msg = the_error(err, "build-data")
    assert code == EXIT_USAGE and f"{src}:2:18: not UTF-8 text (byte 0xe9)" in msg, msg
    assert not (tmp_path / "o.jsonl").exists()


def test_malformed_jsonl_line_is_the_files_own_line(tmp_path, capsys):
    src = tmp_path / "broken.jsonl"
    src.write_text("\n".join([*gsm8k_lines(3), '{"question": "x", "answer": "#### 1" oops}']) + "\n")
    code, err = psynth(capsys, "build-data", "--source", src, "--builder", "aggregation", "--out", tmp_path / "o.jsonl")
    msg = the_error(err, "build-data")
    assert code == EXIT_USAGE and f"{src}:4:38: not valid JSON (Expecting ',' delimiter)" in msg, msg
    assert not (tmp_path / "o.jsonl").exists()


def test_json_file_holding_a_list_of_numbers(tmp_path, capsys):
    src = tmp_path / "numbers.json"
    src.write_text("[1, 2, 3]\n")
    code, err = psynth(capsys, "build-data", "--source", src, "--builder", "aggregation", "--out", tmp_path / "o.jsonl")
    msg = the_error(err, "build-data")
    assert code == EXIT_USAGE
    assert f"{src}: item 0: expected a JSON object with named fields, found a number" in msg, msg


def test_malformed_config_json_of_a_model_dir(tmp_path, capsys, tiny):
    broken = tmp_path / "model"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
    code, err = psynth(capsys, "generate", "hi", "--model", broken, "--max-new-tokens", "2")
    msg = the_error(err, "generate")
    assert code == EXIT_USAGE and f"{broken / 'config.json'}:2:21: not valid JSON" in msg, msg


# --------------------------------------------------------------------------- rows and tasks
def test_training_row_lacking_a_field_names_file_and_line(tmp_path, capsys, tiny):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join([*gsm8k_lines(2), '{"question": "no answer here"}']) + "\n")
    code, err = psynth(capsys, "build-data", "--source", src, "--builder", "aggregation", "--out", tmp_path / "o.jsonl")
    msg = the_error(err, "build-data")
    assert code == EXIT_USAGE and f"{src}:3: the row is in neither the GSM8K schema" in msg, msg
    assert "fields ['question']" in msg
    # the same rows as a training source: the same message, and the failed run leaves no run dir
    run = tmp_path / "run"
    code, err = psynth(capsys, "train", "--config", train_config(tmp_path, tiny, src, run), "--quiet")
    msg = the_error(err, "train")
    assert code == EXIT_USAGE and f"{src}:3: the row is in neither the GSM8K schema" in msg, msg
    assert not run.exists()


def test_eval_row_lacking_a_field_leaves_no_out_dir(tmp_path, capsys, tiny, no_model):
    src = tmp_path / "task.jsonl"
    src.write_text("\n".join([*gsm8k_lines(1), '{"question": "no answer"}']) + "\n")
    out = tmp_path / "out"
    code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out, str(src)))
    msg = the_error(err, "eval")
    assert code == EXIT_USAGE and f"{src}:2: gsm8k: none of the fields ['answer']" in msg, msg
    assert not out.exists()


def test_empty_eval_task_is_an_error_not_a_report_of_nothing(tmp_path, capsys, tiny, no_model):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    out = tmp_path / "out"
    code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out, str(src)))
    msg = the_error(err, "eval")
    assert code == EXIT_USAGE and f"tasks[0] (gsm8k): no examples in {src}" in msg, msg
    assert not out.exists()


def test_eval_task_path_that_is_neither_a_file_nor_a_reachable_hub_id(tmp_path, tiny):
    """`mydata/gsm8k` does not exist here and the hub cannot be reached: one line saying both."""
    cfg = eval_config(tmp_path, tiny, tmp_path / "out", "mydata/gsm8k")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "eval", "--config", str(cfg), "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    msg = the_error(out.stderr, "eval")
    assert out.returncode == EXIT_USAGE
    assert "'mydata/gsm8k' is not a local file or folder" in msg and "as a hub dataset id it could not be loaded" in msg
    assert "./mydata/gsm8k" in msg, msg
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    from psynth_jax.interop.export import export_adapter
    from psynth_jax.interop.loader import load_model
    from psynth_jax.model.transformer import LoRAConfig
    from psynth_jax.synthesis.mapper import make_mapper

    model = load_model(tiny, lora=LoRAConfig(rank=4, alpha=8.0), with_tokenizer=False)
    out = tmp_path_factory.mktemp("adapter")
    export_adapter(model, make_mapper("affine_length", model.cfg.num_kv_heads), out)
    return out


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "mapper.safetensors"])
def test_truncated_adapter_or_mapper_safetensors(tmp_path, capsys, tiny, adapter, no_workers, name):
    damaged = tmp_path / "adapter"
    damaged.mkdir()
    for f in adapter.iterdir():
        data = f.read_bytes()
        (damaged / f.name).write_bytes(data[: len(data) // 2] if f.name == name else data)
    before = snapshot(damaged)
    code, err = psynth(capsys, "demo", "--model", tiny, "--adapter", damaged, "--k", "2", "--worker-tokens", "4",
                       "--max-new-tokens", "4")
    msg = the_error(err, "demo")
    assert code == EXIT_USAGE and f"cannot read {damaged / name} (truncated or corrupt" in msg, msg
    assert snapshot(damaged) == before


# ---------------------------------------------------------------------- flags and outputs
def test_out_that_is_a_file(tmp_path, capsys, tiny, no_model):
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    code, err = psynth(capsys, "demo", "--model", tiny, "--out", a_file / "result.json")
    assert code == EXIT_USAGE and f"--out {a_file / 'result.json'}: {a_file} is a file" in the_error(err, "demo")
    code, err = psynth(capsys, "bench", "roofline", "--out", a_file)
    assert code == EXIT_USAGE and f"--out {a_file} is a file, not a directory" in the_error(err, "bench")
    code, err = psynth(capsys, "build-data", "--source", GSM8K, "--builder", "exposure", "--out", tmp_path)
    assert code == EXIT_USAGE and f"--out {tmp_path} is a directory" in the_error(err, "build-data")
    assert a_file.read_text() == "keep me"


def test_build_data_negative_limit(tmp_path, capsys):
    code, err = psynth(capsys, "build-data", "--source", GSM8K, "--builder", "exposure", "--out",
                       tmp_path / "o.jsonl", "--limit", "-2")
    assert code == EXIT_USAGE and "argument --limit: expected an integer >= 1, got '-2'" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_bench_repeats_zero(tmp_path, capsys):
    code, err = psynth(capsys, "bench", "ttft", "--repeats", "0", "--out", tmp_path / "b")
    assert code == EXIT_USAGE and "--repeats must be at least 1" in the_error(err, "bench")
    assert not (tmp_path / "b").exists()


def test_empty_question(capsys, tiny, no_model):
    code, err = psynth(capsys, "generate", "  ", "--model", tiny)
    assert code == EXIT_USAGE and "the question is empty" in the_error(err, "generate")


def test_worker_tokens_zero_names_the_flag(tmp_path, capsys, tiny, no_model):
    code, err = psynth(capsys, "demo", "--model", tiny, "--worker-tokens", "0")
    assert code == EXIT_USAGE and "argument --worker-tokens: expected an integer >= 1, got '0'" in err
    assert "max_new_tokens" not in err


def test_demo_k_beyond_the_models_positions_is_refused_before_any_decoding(capsys, tiny, no_workers):
    code, err = psynth(capsys, "demo", "--model", tiny, "--k", "400", "--worker-tokens", "8", "--max-new-tokens", "4")
    msg = the_error(err, "demo")
    assert code == EXIT_USAGE and "--k 400 x --worker-tokens 8 does not fit" in msg and "the model has 2048" in msg


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this machine may have cuDNN")
def test_cudnn_without_cudnn_is_refused_before_the_model_loads(tmp_path, capsys, tiny, no_model):
    code, err = psynth(capsys, "generate", "hi", "--model", tiny, "--attn-impl", "cudnn")
    msg = the_error(err, "generate")
    assert code == EXIT_USAGE and "--attn-impl cudnn needs an NVIDIA GPU with cuDNN" in msg, msg
    out = tmp_path / "out"
    code, err = psynth(capsys, "eval", "--config", eval_config(tmp_path, tiny, out), "model.attn_impl=cudnn")
    assert code == EXIT_USAGE and "model.attn_impl cudnn needs an NVIDIA GPU" in the_error(err, "eval")
    assert not out.exists()


# ---------------------------------------------------------------------------- exit codes
def test_one_exit_code_per_kind_and_debug_shows_the_traceback(monkeypatch, capsys):
    from psynth_jax.cli import generate

    def boom(message: str, kind: type[BaseException]):
        def run(args):
            raise kind(message)
        monkeypatch.setattr(generate, "run", run)

    boom("device lost\nsecond line", RuntimeError)
    code, err = psynth(capsys, "generate", "q")
    assert code == EXIT_FAILURE
    assert the_error(err, "generate") == ("psynth generate: error: RuntimeError: device lost; second line "
                                          "(--debug shows the traceback)")
    for argv in (["generate", "q", "--debug"], ["--debug", "generate", "q"]):  # the traceback, the same code
        code, err = psynth(capsys, *argv)
        assert code == EXIT_FAILURE and "Traceback" in err and "RuntimeError: device lost" in err
    monkeypatch.setenv("PSYNTH_DEBUG", "1")
    code, err = psynth(capsys, "generate", "q")
    assert code == EXIT_FAILURE and "Traceback" in err
    boom("no such file x", FileNotFoundError)  # an input error under --debug: still exit 2
    code, err = psynth(capsys, "generate", "q")
    assert code == EXIT_USAGE and "Traceback" in err and "psynth generate: error: no such file x" in err
    monkeypatch.delenv("PSYNTH_DEBUG")
    boom("a usage message", SystemExit)  # a command's own usage error: same code as the others
    assert psynth(capsys, "generate", "q")[0] == EXIT_USAGE
    boom("no such file x", FileNotFoundError)
    assert psynth(capsys, "generate", "q")[0] == EXIT_USAGE
    boom("", KeyboardInterrupt)
    code, err = psynth(capsys, "generate", "q")
    assert code == EXIT_INTERRUPTED and "interrupted" in err


def test_ctrl_c_inside_a_callback_of_jax_is_still_an_interrupt(monkeypatch, capsys):
    """Ctrl-C that lands in a pytree's metadata `__eq__` while jax compares two tree structures (a
    jit cache lookup does) comes out of jax as a ValueError caused by the KeyboardInterrupt: still
    "interrupted", exit 130, not an input error (exit 2, as CI once saw from an eval)."""
    import dataclasses

    from psynth_jax.cli import generate

    class Meta:
        def __eq__(self, other):
            raise KeyboardInterrupt

        def __hash__(self):
            return 0

    @dataclasses.dataclass
    class Tree:
        x: jax.Array
        meta: Meta

    jax.tree_util.register_dataclass(Tree, data_fields=["x"], meta_fields=["meta"])

    def run(args):
        return jax.tree.structure(Tree(jnp.ones(2), Meta())) == jax.tree.structure(Tree(jnp.ones(2), Meta()))

    monkeypatch.setattr(generate, "run", run)
    with pytest.raises(ValueError) as raised:  # what jax itself raises, so the test takes the real path
        run(None)
    assert isinstance(raised.value.__cause__, KeyboardInterrupt)
    code, err = psynth(capsys, "generate", "q")
    assert code == EXIT_INTERRUPTED and err.strip() == "psynth generate: interrupted", err


def test_help_documents_the_exit_codes():
    out = subprocess.run([sys.executable, "-m", "psynth_jax.cli.main", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "exit codes:" in out and "--debug" in out
    for code in ("0", "1", "2", "130", "143"):
        assert f"\n  {code} " in out, out
    readme = (REPO / "README.md").read_text()
    assert "| 2 | usage, config or input error" in readme and "| 1 | runtime failure" in readme
