"""`psynth serve` driven by the real `openai` client and raw HTTP (httpx), on a tiny lively model.

One server (4 decode slots of 512 cache slots) serves most tests; the budget, eviction and API-key
tests get their own small ones. Every wait has a timeout. What is proven:
- chat completions as the openai client reads them (usage, finish_reason, SSE chunks equal to the
  non-streamed answer);
- batched decoding equals one-at-a-time decoding token for token (greedy and sampled);
- the cache-path answer through the server equals `ParallelSynthesis`'s greedy answer for the same
  branches, and the text path's equals its text path's;
- branch handles: create (worker or text), reuse of an identical branch, get, delete, 404 after;
- /v1/parallel; every bad request of the issue gets a 4xx in the OpenAI shape and the server keeps
  serving; eviction to host and back, dropping past the host budget; disconnects free the slot;
- a load of 16 concurrent clients x 64 requests loses none and leaves no slot or pin behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import openai
import pytest

from fast_compile import xla_flags
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.serve.service import DEFAULT_BRANCH_SYSTEM
from psynth_jax.synthesis.pipeline import ParallelSynthesis
from serve_fixtures import MODEL_ID, lively_model, make_service, running_server

TIMEOUT_S = 120
QUESTION = "What is 17 + 25?"
TEXTS = ("Seventeen plus twenty-five: 17 + 25 = 42.", "Add the tens, 10 + 20 = 30, then 7 + 5 = 12, so 42.")


@pytest.fixture(scope="module")
def synth():
    return ParallelSynthesis(lively_model())


@pytest.fixture(scope="module")
def served(synth):
    service = make_service(synth)
    with running_server(service) as url:
        yield service, url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=TIMEOUT_S, **kwargs)


def chat(client, content: str, **kwargs):
    kwargs.setdefault("max_tokens", 10)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], **kwargs)


def text_branch(url: str, text: str, **extra) -> dict:
    r = post(url, "/v1/branches", json={"model": MODEL_ID, "text": text, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(url: str) -> dict:
    """/v1/stats once no slot is live and nothing waits (or fail after TIMEOUT_S)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        stats = httpx.get(url + "/v1/stats", timeout=TIMEOUT_S).json()
        if stats["scheduler"]["live_slots"] == 0 and stats["scheduler"]["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the server never went idle: {stats}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- chat
def test_models_chat_and_streaming_as_the_openai_client_reads_them(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    full = chat(client, "Say something.", max_tokens=12)
    assert full.object == "chat.completion" and full.model == MODEL_ID
    assert full.choices[0].finish_reason == "length" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(chat(client, "Say something.", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_batched_decoding_equals_one_at_a_time(client, served):
    prompts = [f"Question {i}: name a number bigger than {i}." for i in range(6)]  # more requests than slots
    settings = [dict(temperature=0), dict(temperature=0.9, top_p=0.8, seed=7)]
    for s in settings:
        alone = [chat(client, p, max_tokens=14, **s).choices[0].message.content for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: chat(client, p, max_tokens=14, **s).choices[0].message.content,
                                     prompts))
        assert together == alone, s
    assert len(set(alone)) > 1  # the model is lively: the comparison means something


# ------------------------------------------------------------------------- synthesis
def test_cache_and_text_synthesis_equal_parallel_synthesis(client, served, synth):
    service, url = served
    ids = [text_branch(url, t)["id"] for t in TEXTS]
    prefix = service.chat_tokens([{"role": "system", "content": DEFAULT_BRANCH_SYSTEM}])
    outputs = [synth.tok.encode(t, add_special_tokens=False) for t in TEXTS]
    branches = synth.branches_from_tokens([[prefix] * 2], [outputs])
    for mode, steps in (("cache", synth.cache_steps([QUESTION], branches, max_new_tokens=16)),
                        ("text", synth.text_steps([QUESTION], [list(TEXTS)], max_new_tokens=16))):
        expected = synth.answer(steps)
        got = chat(client, QUESTION, max_tokens=16, extra_body={"branches": ids, "synthesis": mode})
        assert got.choices[0].message.content == expected.texts[0], mode
        assert got.usage.prompt_tokens == expected.prompt_tokens[0]
        assert got.model_extra["synthesis"]["mode"] == mode
    streamed = chat(client, QUESTION, max_tokens=16, stream=True, extra_body={"branches": ids})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == synth.answer(
        synth.cache_steps([QUESTION], branches, max_new_tokens=16)).texts[0]


def test_branch_handles_reuse_and_delete(client, served):
    service, url = served
    first = text_branch(url, "A branch that is stored once.")
    second = text_branch(url, "A branch that is stored once.")
    assert (first["reused"], second["reused"]) == (False, True) and first["id"] != second["id"]
    assert first["tokens"] > 0 and first["kept_tokens"] == first["tokens"] and first["location"] == "device"
    got = httpx.get(f"{url}/v1/branches/{first['id']}", timeout=TIMEOUT_S).json()
    assert got["text"] == "A branch that is stored once." and got["id"] == first["id"]

    assert httpx.delete(f"{url}/v1/branches/{first['id']}", timeout=TIMEOUT_S).json()["deleted"] is True
    gone = httpx.get(f"{url}/v1/branches/{first['id']}", timeout=TIMEOUT_S)
    assert gone.status_code == 404 and "was deleted" in gone.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="was deleted"):
        chat(client, QUESTION, extra_body={"branches": [first["id"]]})
    chat(client, QUESTION, extra_body={"branches": [second["id"]]})  # the other id still holds the arrays

    worker = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Think about 6 x 7."}], "max_tokens": 9,
              "temperature": 0, "seed": 1}
    a, b = post(url, "/v1/branches", json=worker).json(), post(url, "/v1/branches", json=worker).json()
    assert a["tokens"] == 9 and a["finish_reason"] == "length" and a["prompt_tokens"] > 0
    assert (a["reused"], b["reused"], a["text"]) == (False, True, b["text"])


def test_parallel_runs_workers_and_the_synthesis(served):
    service, url = served
    r = post(url, "/v1/parallel", json={"model": MODEL_ID, "question": QUESTION, "K": 3, "max_tokens": 8,
                                        "synthesis_max_tokens": 6, "seed": 3, "keep_branches": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["branches"]) == 3 and all(b["tokens"] == 8 for b in body["branches"])
    assert len({b["text"] for b in body["branches"]}) > 1  # sampled workers, one seed each
    assert body["answer"]["finish_reason"] == "length" and body["answer"]["content"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 24
    assert all(httpx.get(f"{url}/v1/branches/{b['id']}").status_code == 404 for b in body["branches"])


# ------------------------------------------------------------------------ bad requests
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(client, served):
    service, url = served
    good = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    release = text_branch(url, "Made under the release convention.", handoff={"convention": "release"})
    cases = [  # (path, body or raw bytes, status, words the message must hold)
        ("/v1/chat/completions", b'{"model": "tiny-smol", "messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", {**good, "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/chat/completions", {**good, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {**good, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {**good, "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
        ("/v1/chat/completions", {**good, "max_tokens": 100_000}, 400, "does not fit"),
        ("/v1/chat/completions", {**good, "n": 2}, 400, "n:"),
        ("/v1/chat/completions", {**good, "stop": ["\n"]}, 400, "stop sequences"),
        ("/v1/chat/completions", {**good, "branches": ["br-nope"]}, 404, "no branch 'br-nope'"),
        ("/v1/chat/completions", {**good, "branches": []}, 400, "K >= 1"),
        ("/v1/chat/completions", {**good, "branches": [release["id"]]}, 400, "handoff release"),
        ("/v1/chat/completions", {**good, "branches": [release["id"]], "synthesis": "telepathy"}, 400, "synthesis"),
        ("/v1/branches", {"model": MODEL_ID}, 400, "give `messages`"),
        ("/v1/branches", {"model": MODEL_ID, "text": " ".join(map(str, range(600)))}, 400, "exceed"),
        ("/v1/parallel", {"model": MODEL_ID, "question": "q", "K": 0}, 400, "K: Input should be greater"),
        ("/v1/parallel", {"model": MODEL_ID, "question": "q", "K": "three"}, 400, "K:"),
        ("/v1/chat/completions", b"{" + b" " * (2 << 20) + b"}", 413, "exceeds this server's limit"),
    ]
    for path, body, status, words in cases:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
            {"json": body}
        r = post(url, path, **kwargs)
        assert r.status_code == status, (path, body if isinstance(body, dict) else body[:40], r.text)
        error = r.json()["error"]
        assert words in error["message"], (words, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/branches/br-nope", timeout=TIMEOUT_S).status_code == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "hi", max_tokens=10_000)
    assert chat(client, "still serving?", max_tokens=3).choices[0].finish_reason == "length"
    assert wait_idle(url)["store"]["pins"] == 0


def test_api_key_is_required_when_set(synth):
    with running_server(make_service(synth, slots=1), api_key="s3cret") as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=TIMEOUT_S, max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL_ID]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


# --------------------------------------------------------------------------- the store
def test_eviction_to_host_and_back_and_drop_past_the_host_budget(synth):
    one_branch = 32_776  # bytes of one stored branch of this model (<= 64 kept tokens)
    service = make_service(synth, slots=2, device_budget=one_branch, host_budget=2 * one_branch)
    with running_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)
        a = text_branch(url, TEXTS[0])
        answer = chat(client, QUESTION, max_tokens=8, extra_body={"branches": [a["id"]]}).choices[0].message.content
        b = text_branch(url, TEXTS[1])
        assert a["bytes"] == one_branch
        assert httpx.get(f"{url}/v1/branches/{a['id']}").json()["location"] == "host"
        again = chat(client, QUESTION, max_tokens=8, extra_body={"branches": [a["id"]]}).choices[0].message.content
        assert again == answer  # brought back from host memory: the same arrays
        assert httpx.get(f"{url}/v1/branches/{a['id']}").json()["location"] == "device"
        assert httpx.get(f"{url}/v1/branches/{b['id']}").json()["location"] == "host"
        stats = wait_idle(url)["store"]
        assert stats["device_bytes"] <= one_branch and stats["pins"] == 0
        text_branch(url, "A third branch.")
        text_branch(url, "A fourth branch.")  # the host holds two: the least recently used goes
        gone = httpx.get(f"{url}/v1/branches/{b['id']}")
        assert gone.status_code == 404 and "evicted" in gone.json()["error"]["message"]


# ------------------------------------------------------------------------ disconnects
def test_a_client_that_disconnects_frees_its_slot(served):
    service, url = served
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            for _ in range(4):  # the role chunk, then tokens: the request decodes in a slot
                assert next(lines).startswith("data: ")
            assert service.scheduler.stats()["live_slots"] == 1
    stats = wait_idle(url)  # the stream closed: the slot is freed long before 400 tokens
    assert stats["scheduler"]["live_slots"] == 0


def test_a_non_streamed_client_that_disconnects_frees_its_slot(synth):
    """A non-streamed request whose client closes its connection once the request decodes: the
    server stops it long before its 1,900 tokens (it looks every DISCONNECT_POLL_S)."""
    import json
    import socket

    with running_server(make_service(synth, slots=1, max_context=2048)) as url:
        raw = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "Go on forever."}],
                          "max_tokens": 1900, "temperature": 0}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            deadline = time.monotonic() + TIMEOUT_S
            while httpx.get(url + "/v1/stats").json()["scheduler"]["live_slots"] == 0:
                assert time.monotonic() < deadline, "the request never reached a decode slot"
                time.sleep(0.005)
        stats = wait_idle(url)  # the connection closed while the request decoded
        assert stats["scheduler"]["live_slots"] == 0 and 0 < stats["scheduler"]["decoded_tokens"] < 1800


# --------------------------------------------------------------------------- load
def test_load_loses_no_request_and_leaves_no_slot_or_pin(served):
    service, url = served
    ids = [text_branch(url, t)["id"] for t in TEXTS]
    clients, requests = 16, 64

    def body(i: int) -> dict:
        kind = i % 3
        extra = {} if kind == 0 else {"branches": ids, "synthesis": "cache" if kind == 1 else "text"}
        return {"model": MODEL_ID, "messages": [{"role": "user", "content": f"Request {i}: {QUESTION}"}],
                "max_tokens": 4 + i % 5, "temperature": 0, "stream": i % 2 == 0, **extra}

    async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> int:
        async with gate:
            r = await http.post("/v1/chat/completions", json=body(i))
            assert r.status_code == 200, r.text
            if body(i)["stream"]:
                assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in r.text
                return 1
            return r.json()["usage"]["completion_tokens"]

    async def load() -> list[int]:
        gate = asyncio.Semaphore(clients)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, gate, i) for i in range(requests))), TIMEOUT_S)

    t0 = time.perf_counter()
    counts = asyncio.run(load())
    elapsed = time.perf_counter() - t0
    print(f"load: {requests} requests from {clients} clients in {elapsed:.1f} s ({requests / elapsed:.1f} req/s)")
    assert len(counts) == requests
    assert all(c >= 1 for c in counts)
    stats = wait_idle(url)
    assert stats["scheduler"]["live_slots"] == 0 and stats["scheduler"]["waiting"] == 0
    assert stats["store"]["pins"] == 0


# ------------------------------------------------------------------ the engine's step
def test_a_step_over_the_first_slots_equals_the_step_over_all(synth):
    """`Engine.step_rows` narrows a step to the power-of-two prefix of slots holding the live ones,
    `Engine.step_cols` to the cache width holding their context: the same tokens, and the same
    cache where it is valid, as a step over all N slots x C cache slots."""
    import jax.numpy as jnp
    import numpy as np

    from psynth_jax.serve.engine import Engine, RowSampling, generate

    engine, m = Engine(synth, slots=4, max_context=128), synth.model
    assert [engine.step_rows(np.arange(4) == i) for i in range(4)] == [1, 2, None, None]
    assert engine.col_buckets() == [64, 128]
    live = np.array([True, True, False, False])
    ends = np.array([10, 63, 127, 127])  # the free slots' stale ends do not count
    assert engine.step_cols(ends, live) == 64 and engine.step_cols(ends + 1, live) is None

    def run(rows, cols=None):
        state = engine.init_decode_state()
        for slot in range(2):
            sampling = RowSampling(temperature=0.8, seed=slot)
            prompt = synth.gen.chat_tokens([{"role": "user", "content": f"Count to {slot + 3}."}])
            state = engine.insert(engine.prefill(prompt, sampling), state, slot, sampling, lora=slot == 1)
        drawn = []
        for _ in range(6):
            if cols is not None:
                assert engine.step_cols(np.asarray(state.cache.end), live) == cols
            state, tokens = generate(m.graphdef, m.state, state, jnp.asarray(live), rows=rows, cols=cols)
            drawn.append(np.asarray(tokens).tolist())
        return drawn, state

    full, b = run(None)
    assert len({t for row in full for t in row[:2]}) > 2
    valid = np.asarray(b.cache.valid)
    for rows, cols in ((2, None), (None, 64), (2, 64)):
        narrow, a = run(rows, cols)
        assert narrow == full, (rows, cols)
        assert (np.asarray(a.cache.valid) == valid).all() and (np.asarray(a.steps) == np.asarray(b.steps)).all()
        assert (np.asarray(a.cache.end) == np.asarray(b.cache.end)).all()
        for x, y in ((a.cache.k, b.cache.k), (a.cache.v, b.cache.v)):
            np.testing.assert_allclose(np.asarray(x)[:, valid], np.asarray(y)[:, valid], atol=1e-5)


# --------------------------------------------------------------------------- a mesh
def test_the_engine_on_a_mesh_decodes_as_on_one_device():
    """Decode slots split over `data` on 2 fake CPU devices (a child process): the same tokens and the
    same handed-over worker keys as one device."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags()  # the suite's, no forced device count
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_mesh_check.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert facts["devices"] == 2 and facts["two"] == facts["one"] and len({t for row in facts["one"] for t in row}) > 2
    assert abs(facts["keys_two"] - facts["keys_one"]) <= 1e-4 * abs(facts["keys_one"])
