"""The README's serving commands, run as documented at small scale, and SIGTERM's drain.

`psynth serve` starts in a child process exactly as the README writes it, with flags appended that
make it small (a tiny random model with SmolLM2's tokenizer, named as the README's model; a free
port; 2 decode slots). The README's curl command and its `openai` snippet then run against it,
with only the port changed. Last, a streamed request is in flight when the server gets SIGTERM: it
finishes whole, and the process exits (by the signal, after draining) within the timeout.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tiny_smol import make_tiny_smol

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TIMEOUT_S = 180
SMALL = ["--served-model-name", "smollm2-135m", "--slots", "2", "--max-context", "512"]


def section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start: README.index("\n## ", start + 1)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_smol(tmp_path_factory.mktemp("serve") / "tiny")
    start, *_ = blocks(section("Serving: `psynth serve`"), "bash")
    assert start.strip() == "psynth serve"
    port = free_port()
    psynth = Path(sys.executable).with_name("psynth")
    argv = [str(psynth), *start.split()[1:], "--model", str(model), "--port", str(port), *SMALL]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "psynth serve did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_the_documented_curl_and_openai_calls_work(server):
    proc, port = server
    _, curl = blocks(section("Serving: `psynth serve`"), "bash")
    (snippet,) = blocks(section("Serving: `psynth serve`"), "python")
    local = lambda text: text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")  # noqa: E731
    out = subprocess.run(["bash", "-c", local(curl)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0 and '"chat.completion"' in out.stdout, out.stdout + out.stderr
    run = subprocess.run([sys.executable, "-c", local(snippet)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CompletionUsage(" in run.stdout and "cached_tokens=" in run.stdout


def test_sigterm_drains_the_requests_in_flight_then_exits(server):
    proc, port = server
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(TIMEOUT_S)
    proc.send_signal(signal.SIGTERM)
    reader.join(TIMEOUT_S)
    assert not reader.is_alive()
    assert len(lines) > 150 and lines[-1] == "data: [DONE]" and any('"finish_reason": "length"' in line for line in lines)
    assert proc.wait(timeout=TIMEOUT_S) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after draining
