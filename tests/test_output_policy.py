"""One policy for every file a command writes for the user (formats/output_files.py): never the
command's own input, never an existing unrelated file without --force, never a path under a
regular file (refused before anything is loaded or compiled), and a temporary file renamed over
the target, so a failed write leaves the previous file as it was (issue #28)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psynth_jax.cli.main import EXIT_USAGE, main
from psynth_jax.data.examples import read_examples
from psynth_jax.formats.output_files import replace_atomically

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/test.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")


def psynth(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def gsm8k_copy(path: Path, n: int = 20) -> Path:
    with open(GSM8K, encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return path


@pytest.mark.parametrize("builder", ["exposure", "aggregation"])
def test_build_data_never_overwrites_its_own_source(tmp_path, capsys, builder):
    src = gsm8k_copy(tmp_path / "rows.jsonl")
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "rows.jsonl"):  # the same file, however it is spelled
        code, err = psynth(capsys, "build-data", "--source", src, "--builder", builder, "--out", out, "--force")
        assert code == EXIT_USAGE and "is the input" in err and "Traceback" not in err
    assert src.read_bytes() == before
    glob = str(tmp_path / "*.jsonl")  # a glob source that matches the output
    code, err = psynth(capsys, "build-data", "--source", glob, "--builder", builder, "--out", src, "--force")
    assert code == EXIT_USAGE and "is the input" in err and src.read_bytes() == before


@pytest.mark.parametrize("builder", ["exposure", "aggregation"])
def test_build_data_refuses_an_unrelated_file_unless_forced(tmp_path, capsys, builder):
    other = gsm8k_copy(tmp_path / "other.jsonl", 30)  # 30 lines of someone's data
    before = other.read_bytes()
    code, err = psynth(capsys, "build-data", "--source", GSM8K, "--builder", builder, "--out", other, "--limit", "3")
    assert code == EXIT_USAGE and "exists and was not written by this command" in err and "--force" in err
    assert other.read_bytes() == before
    # a file this builder wrote is rewritten without --force; another builder's is someone else's
    assert psynth(capsys, "build-data", "--source", GSM8K, "--builder", builder, "--out", other, "--limit", "3",
                  "--force")[0] == 0
    assert len(read_examples(other)) == 3
    assert psynth(capsys, "build-data", "--source", GSM8K, "--builder", builder, "--out", other, "--limit", "2")[0] == 0
    assert len(read_examples(other)) == 2
    theirs = "aggregation" if builder == "exposure" else "exposure"
    code, err = psynth(capsys, "build-data", "--source", GSM8K, "--builder", theirs, "--out", other, "--limit", "2")
    assert code == EXIT_USAGE and len(read_examples(other)) == 2
    assert not [p for p in tmp_path.iterdir() if "psynth-tmp" in p.name]  # no temporary file left


def test_an_empty_existing_file_is_simply_written(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.touch()
    assert psynth(capsys, "build-data", "--source", GSM8K, "--builder", "exposure", "--out", out, "--limit", "2")[0] == 0
    assert len(read_examples(out)) == 2


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("previous\n")
    with pytest.raises(RuntimeError):
        with replace_atomically(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_plan_json_is_checked_before_compiling(tmp_path, capsys, monkeypatch):
    from psynth_jax.train import plan

    monkeypatch.setattr(plan, "run_plan", lambda *a, **k: pytest.fail("compiled before checking --json"))
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    config = REPO / "configs/smollm2_135m_cpu.yaml"
    code, err = psynth(capsys, "plan", "--config", config, "--accelerator", "v5litepod-8", "--json", a_file / "p.json")
    assert code == EXIT_USAGE and f"--json {a_file / 'p.json'}: {a_file} is a file" in err
    code, err = psynth(capsys, "plan", "--config", config, "--accelerator", "v5litepod-8", "--json", a_file)
    assert code == EXIT_USAGE and "exists and was not written by this command" in err
    code, err = psynth(capsys, "plan", "--config", config, "--accelerator", "v5litepod-8", "--json", config)
    assert code == EXIT_USAGE and "is the input" in err
    assert a_file.read_text() == "keep me"


def test_export_under_a_regular_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from psynth_jax.interop import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"base: {REPO / 'configs/smollm2_135m_cpu.yaml'}\n")
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    code, err = psynth(capsys, "export", "--run", run, "--out", a_file / "export")
    assert code == EXIT_USAGE and f"--out {a_file / 'export'}: {a_file} is a file" in err
    assert a_file.read_text() == "keep me"
