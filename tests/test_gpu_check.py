"""launch/gpu_check.sh: its DRY_RUN commands parse with psynth's own parsers, its CPU smoke run writes
the results folder with every step, a step past its cap is killed while the next still runs, and
the docs updater edits exactly the cells it maps.

The smoke run (one module-scoped fixture, ~1-3 min on the shared 2-core VM) runs the script the
way the GPU machine does, with the packages that machine lacks (grain, datasets, ...) hidden
from every process, so a step importing them would fail here too.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check, gpu_docs, gpu_figures, kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"
HIDDEN = ("grain", "datasets", "gguf", "tensorboardX", "matplotlib", "math_verify")  # not on the GPU machine

HIDER = textwrap.dedent(f"""
    # every import finder wrapped: the hidden packages are "not installed" (find_spec -> None)
    import sys
    HIDDEN = {HIDDEN!r}

    class _Hide:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            find = getattr(self._inner, "find_spec", None)
            return None if find is None else find(name, path, target)

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


def script_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": sys.executable, **extra}


def plus_lines(stderr: str) -> list[list[str]]:
    """argv of every "+ ..." line, without a leading `env VAR=value ...`."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("+ "):
            continue
        argv = shlex.split(line[2:])
        if argv[0] == "env":
            argv = argv[1:]
            while "=" in argv[0]:
                argv = argv[1:]
        out.append(argv)
    return out


def env_of(stderr: str, marker: str) -> dict[str, str]:
    """The `env VAR=value` assignments of the "+ ..." line containing `marker`."""
    line = next(l for l in stderr.splitlines() if l.startswith("+ ") and marker in l)
    words = shlex.split(line[2:])
    return dict(w.split("=", 1) for w in words[1:] if words[0] == "env" and "=" in w and not w.startswith("-"))


def dry_run(**extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    proc = subprocess.run(["bash", str(SCRIPT)], env=script_env(DRY_RUN="1", OUT="/tmp/out", WORK="/tmp/work", **extra),
                          capture_output=True, text=True, timeout=60, cwd="/")
    return proc, plus_lines(proc.stderr)


# ------------------------------------------------------------------ DRY_RUN
def test_dry_run_prints_every_step_with_flags_psynth_accepts():
    from psynth_jax.cli import main as psynth_main

    proc, commands = dry_run()
    assert proc.returncode == 0, proc.stderr
    driver, install, *steps = commands
    assert driver[1:3] == ["-m", "benchmarks.gpu_check"]
    args = argparse_of_driver().parse_args(driver[3:])
    assert (args.out, args.work, args.dry_run, args.smoke) == ("/tmp/out", "/tmp/work", True, False)
    assert install[1:] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e",
                           str(ROOT)]

    parser = psynth_main.build_parser()
    names = [s.name for s in gpu_check.STEPS if s.benchmark != "pip"]
    assert [c[4] for c in steps] == [s.benchmark for s in gpu_check.STEPS if s.benchmark != "pip"]
    for name, argv in zip(names, steps):
        assert argv[0] == sys.executable and argv[1:4] == ["-m", "psynth_jax.cli.main", "bench"]
        parsed = parser.parse_args(argv[3:])  # argparse exits on any flag psynth does not know
        assert parsed.out == f"/tmp/work/{name}"
        if getattr(parsed, "attn_impl", None) is not None:  # cuDNN everywhere but the zero-copy step (XLA's)
            assert parsed.attn_impl == ("xla" if name == "zerocopy14b" else "cudnn") and parsed.dtype == "bfloat16"
        step = next(s for s in gpu_check.STEPS if s.name == name)
        if step.roofline:
            assert parsed.roofline_json == "/tmp/work/roofline/roofline.json"
    by_name = {n: parser.parse_args(a[3:]) for n, a in zip(names, steps)}
    assert by_name["kernels"].impl == "cudnn" and by_name["kernels"].dtypes == ["bfloat16", "float32"]
    assert (by_name["ttft7b"].ks, by_name["ttft7b"].ls, by_name["ttft7b"].arch) == ([2, 8], [1024, 2048], "qwen2.5-7b")
    assert (by_name["ttft14b"].ks, by_name["ttft14b"].ls, by_name["ttft14b"].arch) == ([3], [4096], "qwen3-14b")
    assert (by_name["zerocopy14b"].cache_path, by_name["zerocopy14b"].ks) == ("view", [3])
    assert (by_name["peer7b"].ks, by_name["peer7b"].ls) == ([8], [2048])
    assert (by_name["peer14b"].ks, by_name["peer14b"].ls) == ([3], [4096])
    assert by_name["decode"].cache_tokens == [16384]
    assert (by_name["train"].arch, by_name["train"].remat) == ("qwen3-14b", "on")
    assert by_name["batch"].bs == [1, 8]
    assert env_of(proc.stderr, "bench peer")["JAX_PLATFORMS"] == "cpu"  # the peer never starts a JAX backend
    assert "total" in proc.stderr and "(budget 480 s)" in proc.stderr


def argparse_of_driver():
    import argparse

    p = argparse.ArgumentParser()
    gpu_check.add_arguments(p)
    return p


def test_smoke_dry_run_uses_tiny_shapes_and_xla():
    from psynth_jax.cli import main as psynth_main

    proc, commands = dry_run(SMOKE="1")
    assert proc.returncode == 0, proc.stderr
    parser = psynth_main.build_parser()
    steps = commands[1:]
    assert not any("pip" in c for c in steps)  # a smoke run installs nothing
    assert len(steps) == len(gpu_check.STEPS) - 1
    for argv in steps:
        parsed = parser.parse_args(argv[3:])
        if getattr(parsed, "attn_impl", None) is not None:
            assert parsed.attn_impl == "xla" and parsed.dtype == "float32"
        assert not str(getattr(parsed, "arch", "tiny")).startswith(("qwen", "llama"))
    kernels_args = parser.parse_args(steps[0][3:])
    assert kernels_args.impl == "xla_split"
    assert "xla_backend_optimization_level=0" in env_of(proc.stderr, "bench ttft")["XLA_FLAGS"]


def test_caps_fit_the_budget_and_every_step_has_figures():
    assert sum(s.cap_s for s in gpu_check.STEPS) <= gpu_check.BUDGET_S == 480
    assert [s.name for s in gpu_check.STEPS][:3] == ["install", "kernels", "roofline"]  # correctness first
    assert len({s.name for s in gpu_check.STEPS}) == len(gpu_check.STEPS)
    for step in gpu_check.STEPS:
        assert step.benchmark == "pip" or step.benchmark in gpu_figures.READERS, step.name
        for flag in ("--ks", "--ls", "--cache-tokens", "--bs"):  # smoke keeps the full run's number of points
            full, smoke = gpu_figures._ints(step.full, flag), gpu_figures._ints(step.smoke, flag)
            assert len(full) == len(smoke), (step.name, flag)


def test_the_docs_budget_table_is_the_code_s():
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    section = text[text.index("## The GPU check"):]
    section = section[:section.index("\n## ", 10)]
    caps = {}
    for line in section.splitlines():
        cells = gpu_docs._cells(line)
        if line.startswith("| ") and len(cells) == 4 and cells[2].isdigit():
            caps[cells[0]] = float(cells[2])
    assert caps == {**{s.name: s.cap_s for s in gpu_check.STEPS}, "total": sum(s.cap_s for s in gpu_check.STEPS)}


def test_device_line_names_the_gpu_and_the_versions():
    results = {
        "environment": {"gpus": [{"name": "NVIDIA H200", "memory": "143771 MiB", "driver": "570.1"}],
                        "driver_cuda_version": "12.8", "packages": {"flax": "0.12.10", "torch": "2.9.0"}},
        "steps": {"kernels": {"result": {"metadata": {
            "device": {"platform": "gpu", "device_kind": "NVIDIA H200"},
            "versions": {"jax": "0.11.2", "jaxlib": "0.11.2", "cuda_runtime": "12080", "cudnn": "91000"}}}}},
    }
    name, versions = gpu_figures.device_line(results)
    assert name == "NVIDIA H200 [gpu]"
    assert versions.startswith("jax 0.11.2, jaxlib 0.11.2, CUDA runtime 12.8, cuDNN 9.10.0, driver 570.1 (CUDA 12.8)")


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="unknown step 'ttft'"):
        gpu_check.select_steps(["ttft"], [])
    with pytest.raises(ValueError, match="--cap takes STEP=SECONDS.*'ttft7b=soon'"):
        gpu_check.parse_caps(["ttft7b=soon"])
    assert [s.name for s in gpu_check.select_steps(None, ["install", "peer14b"])][:2] == ["kernels", "roofline"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--only", "nope"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "gpu_check: error: unknown step 'nope'" in proc.stderr


# ------------------------------------------------------------------ caps
def _sleepy_steps(pidfile: Path):
    """A step that starts a grandchild and hangs, then a quick step (commands substituted below)."""
    # the pid file appears whole (written aside, then renamed): a test that waits for it to exist
    # may signal at once, and a step killed between creating and writing the file left it empty
    hang = ("import os, subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pidfile) + '.part'!r}, 'w').write(str(p.pid)); "
            f"os.replace({str(pidfile) + '.part'!r}, {str(pidfile)!r}); print('hanging', flush=True); time.sleep(120)")
    commands = {"sleepy": [sys.executable, "-c", hang], "quick": [sys.executable, "-c", "print('quick ran')"]}
    steps = [gpu_check.Step(name, f"{name} step", "roofline", full=(), smoke=(), cap_s=60, estimate="test",
                            result="roofline.json") for name in commands]
    return steps, commands


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_a_step_past_its_cap_is_killed_with_its_children_and_the_next_step_runs(tmp_path, monkeypatch, capsys):
    steps, commands = _sleepy_steps(tmp_path / "grandchild.pid")
    monkeypatch.setattr(gpu_check, "step_command", lambda step, **kw: commands[step.name])
    t0 = time.monotonic()
    code = gpu_check.run_all(steps, out=tmp_path / "out", work=tmp_path / "work", smoke=True,
                             cap_overrides={"sleepy": 3.0}, command="test")
    assert time.monotonic() - t0 < 40
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    sleepy, quick = results["steps"]["sleepy"], results["steps"]["quick"]
    assert sleepy["status"] == "timeout" and 3.0 <= sleepy["wall_s"] < 20 and sleepy["cap_s"] == 3.0
    assert "hanging" in sleepy["log_tail"]
    assert quick["status"] == "ok" and quick["returncode"] == 0
    assert not _alive(int((tmp_path / "grandchild.pid").read_text()))  # the whole process group went
    assert code == 1 and results["failures"] == ["step sleepy: timeout (killed after its cap of 3 s)"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "killed after its cap of 3 s" in log and "quick ran" in log
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| sleepy | timeout |" in summary and "| quick | ok |" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(gpu_check.RESULT_FILES)


def test_sigterm_stops_the_step_and_keeps_the_results(tmp_path, monkeypatch):
    steps, commands = _sleepy_steps(tmp_path / "grandchild.pid")
    monkeypatch.setattr(gpu_check, "step_command", lambda step, **kw: commands[step.name])
    pid, pidfile = os.getpid(), tmp_path / "grandchild.pid"

    def terminate_once_the_step_runs():  # the driver's handler is in place by then
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)

    threading.Thread(target=terminate_once_the_step_runs, daemon=True).start()
    code = gpu_check.run_all(steps, out=tmp_path / "out", work=tmp_path / "work", smoke=True, cap_overrides={},
                             command="test")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 130 and results["finished"]
    assert results["steps"]["sleepy"]["status"] == "interrupted"
    assert results["steps"]["quick"]["status"] == "not run (interrupted)"
    assert not _alive(int(pidfile.read_text()))


# ------------------------------------------------------------------ the smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """SMOKE=1 launch/gpu_check.sh, as on the GPU machine but on the CPU: (results dir, process, seconds)."""
    base = tmp_path_factory.mktemp("gpu_check")
    hider = base / "hide"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(HIDER)
    out = base / "results"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, cwd="/",
                          env=script_env(SMOKE="1", OUT=str(out), WORK=str(base / "work"), PYTHONPATH=str(hider)))
    return out, proc, time.monotonic() - t0


def test_smoke_run_writes_the_results_folder_with_every_step(smoke):
    out, proc, seconds = smoke
    print(f"smoke run: {seconds:.1f} s")
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.RESULT_FILES)  # <= 8 files come back
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "smoke" and results["finished"]
    statuses = {name: e["status"] for name, e in results["steps"].items()}
    assert list(statuses) == [s.name for s in gpu_check.STEPS]
    assert statuses.pop("install") == "skipped"
    kernels_entry = results["steps"]["kernels"]
    checks_failed = bool(kernels_entry["result"]["metadata"]["failures"])
    assert statuses.pop("kernels") == ("failed" if checks_failed else "ok")  # exit 1 = some check failed
    assert set(statuses.values()) == {"ok"}, (statuses, proc.stderr[-3000:])
    for name, entry in results["steps"].items():
        if name != "install":
            assert entry["result"], name  # each step's own JSON, copied in
    assert proc.returncode == int(checks_failed), proc.stderr[-3000:]
    figure_steps = {f["step"] for f in results["figures"]}
    assert figure_steps == {s.name for s in gpu_check.STEPS if s.benchmark != "pip"}


def test_smoke_summary_puts_correctness_first_and_has_every_step(smoke):
    out, _, _ = smoke
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check: cpu [cpu] (SMOKE RUN")
    assert summary.index("## Correctness") < summary.index("## Steps") < summary.index("## Figures")
    for step in gpu_check.STEPS:
        assert f"| {step.name} |" in summary
    results = json.loads((out / "results.json").read_text())
    for line in results["steps"]["kernels"]["result"]["metadata"]["failures"]:
        assert f"- FAILED: {line}" in summary
    assert "| 1 | cache TTFT / floor, tiny-qwen2 K=8 L=2048 (measured at K=8 L=32) |" in summary
    assert "versions: jax " in summary


def test_smoke_kernels_check_every_layout_and_the_greedy_path(smoke):
    out, _, _ = smoke
    rows = json.loads((out / "results.json").read_text())["steps"]["kernels"]["result"]["rows"]
    layouts = {r["layout"] for r in rows if r["check"] == "attention"}
    assert layouts == {"prefill", "extend", "decode", "extend_grad"}
    for r in rows:
        if r["check"] == "attention" and r["layout"] != "extend_grad":
            assert r["ok"] and r["err"] <= r["tol"], r  # the split algebra's forward pass is exact
        assert r["xla_err"] <= 1e-5 if "xla_err" in r else True
    (greedy,) = [r for r in rows if r["check"] == "greedy"]
    assert greedy["ok"] and greedy["tokens_equal"] and greedy["family"] == "qwen3" and greedy["head_dim"] == 128


def table_cells(text: str) -> dict[tuple[str, int, int], str]:
    """Every table cell of a markdown file: (section heading, line offset in the table, column) -> text."""
    cells, section, row = {}, "", 0
    for line in text.splitlines():
        if line.startswith("## "):
            section, row = line, 0
        if line.startswith("|"):
            for j, c in enumerate(gpu_docs._cells(line)):
                cells[(section, row, j)] = c
            row += 1
        else:
            row = 0 if line.strip() == "" else row
    return cells


def outside_block(text: str) -> list[str]:
    lines = text.splitlines()
    b, e = lines.index(gpu_docs.BLOCK_BEGIN), lines.index(gpu_docs.BLOCK_END)
    return lines[:b] + lines[e:]


def test_docs_updater_fills_exactly_the_mapped_cells(smoke, tmp_path):
    out, _, _ = smoke
    docs = tmp_path / "PERFORMANCE.md"
    before = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    docs.write_text(before)
    with pytest.raises(ValueError, match="holds a smoke run on cpu.*--force"):
        gpu_docs.update_docs(out, docs)
    assert docs.read_text() == before  # refused: nothing written

    changes = gpu_docs.update_docs(out, docs, force=True)
    after = docs.read_text()
    old, new = table_cells("\n".join(outside_block(before))), table_cells("\n".join(outside_block(after)))
    assert old.keys() == new.keys()
    changed = {k for k in old if old[k] != new[k]}
    lines = before.splitlines()
    expected = set()
    for cell in gpu_docs.CELLS:
        i, col = gpu_docs.locate(lines, cell)
        start = max(j for j in range(i + 1) if lines[j].startswith("## "))
        header = next(j for j in range(start, i + 1) if lines[j].startswith("|"))
        expected.add((lines[start], i - header, col))
    assert changed == expected and len(changes) == len(gpu_docs.CELLS)
    for key in changed:
        assert old[key].endswith("open") and "open" not in new[key], (key, new[key])
    changed_lines = [a for a, b in zip(outside_block(before), outside_block(after)) if a != b]
    assert len(changed_lines) == len({(k[0], k[1]) for k in changed})  # no other line moved or changed
    results = json.loads((out / "results.json").read_text())
    speedup = next(f for f in results["figures"] if f["id"] == "ttft7b/K8xL2048/speedup")
    t3 = next(k[0] for k in changed if k[0].startswith("## Target 3"))
    assert new[(t3, 2, 2)].endswith(f"({speedup['text']})")  # Qwen2.5-7B | 8 x 2048 | JAX text / cache (speedup)
    block = after.splitlines()[after.splitlines().index(gpu_docs.BLOCK_BEGIN) + 1]
    assert block.startswith("SMOKE RUN (tiny shapes on cpu [cpu]") and f"{len(gpu_docs.CELLS)} cells" in block

    assert gpu_docs.update_docs(out, docs, force=True) == []  # idempotent
    assert docs.read_text() == after


# ------------------------------------------------------------------ the greedy check's tie rule
class _Case:
    """Stands in for kernels.GreedyCase: fixed teacher-forced reference logits."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def reference_logits(self, tokens, upto):
        return self.logits


def _run(first, tokens):
    return kernels.CachePathRun(np.asarray(first, np.float32), np.asarray(tokens))


def test_greedy_divergence_at_a_near_tie_is_not_a_failure():
    first = np.linspace(-1.0, 1.0, 16)[None].repeat(2, 0)
    ref, got = _run(first, [[3, 4, 5], [6, 7, 8]]), _run(first, [[3, 9, 5], [6, 7, 8]])
    logits = np.linspace(-2.0, 2.0, 16)[None].repeat(2, 0).astype(np.float32)
    logits[0, 4], logits[0, 9] = 3.0, 2.99  # the reference rates the two tokens 0.01 apart: a tie
    tol = kernels.TOLERANCE["bfloat16"]
    out = kernels.compare_greedy(_Case(logits), got, ref, tol)
    assert out["tokens_equal"] is False and out["logits_err"] == 0.0 and out["tokens_compared"] == 6
    (d,) = out["divergences"]
    assert (d["request"], d["position"], d["ref_token"], d["token"]) == (0, 1, 4, 9)
    assert d["tie"] and d["ref_gap"] == pytest.approx(0.01 / logits[0].std(), rel=1e-3)
    logits[0, 9] = 1.0  # now far below the reference's token: a real difference
    (d,) = kernels.compare_greedy(_Case(logits), got, ref, tol)["divergences"]
    assert not d["tie"] and d["ref_gap"] == pytest.approx(2.0 / logits[0].std(), rel=1e-3)
    assert kernels.compare_greedy(_Case(logits), ref, ref, tol) == {
        "logits_err": 0.0, "tokens_equal": True, "divergences": [], "tokens_compared": 6}
