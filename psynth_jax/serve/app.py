"""The HTTP layer of `psynth serve` (FastAPI): OpenAI's chat completions and models, branch handles,
/v1/parallel, and the guards around them.

    GET    /v1/models                  the served model
    POST   /v1/chat/completions        a chat completion, streamed (SSE) or not; with `branches`, a
                                       synthesis over stored branches (`synthesis`: "cache" | "text")
    POST   /v1/branches                a worker decoded from `messages`, or a branch given as `text`
    GET    /v1/branches/{id}           a stored branch
    DELETE /v1/branches/{id}           drop it (using it afterwards is a 404)
    POST   /v1/parallel                K workers on a question + one synthesis, every branch returned
    GET    /v1/stats                   decode slots, waiting jobs, store bytes and pins
    GET    /health                     200 when serving

Guards: a bearer key when the server has one (compared in constant time), a request body size
limit (413), every refusal in the OpenAI error shape with a message naming the field or id; a
client that disconnects cancels its request (its decode slot is freed at the next step).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from psynth_jax.serve.protocol import BranchRequest, ChatCompletionRequest, ParallelRequest
from psynth_jax.serve.scheduler import Done, Failed, Job, Token
from psynth_jax.serve.service import Answer, ApiError, Service, as_api_error
from psynth_jax.serve.store import BranchInfo
from psynth_jax.synthesis import prompts

DISCONNECT_POLL_S = 0.2


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               lifespan: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """The FastAPI app around `service`. lifespan: starts and stops the scheduler (cli/serve.py)."""
    app = FastAPI(title="psynth serve", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(err.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "psynth"}]}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return service.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        service.check_model(body.model)
        messages = [m.plain() for m in body.messages]
        sampling = service.sampling(body.temperature, body.top_p, body.seed)
        cached = 0
        if body.branches is not None:
            job, cached = service.synthesis_job(messages, body.branches, body.synthesis, max_tokens=body.budget,
                                                sampling=sampling, family=body.family)
        else:
            job = service.chat_job(messages, max_tokens=body.budget, sampling=sampling)
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        extra = _synthesis_field(body, cached)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(service, job, request, completion_id, cached, extra, include_usage)
        answer = await _unless_gone(request, service.run(job))
        if answer is None:
            return Response(status_code=499)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": service.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": _usage(answer.prompt_tokens, len(job.generated), cached), **extra})

    @app.post("/v1/branches")
    async def create_branch(body: BranchRequest, request: Request) -> Response:
        service.check_model(body.model)
        handoff = service.handoff(body.handoff.model_dump() if body.handoff else None)
        messages = [m.plain() for m in body.messages] if body.messages else None
        if body.text is not None:
            job = service.text_branch_job(body.text, messages, handoff)
        elif messages:
            job = service.worker_job(messages, max_tokens=body.budget, handoff=handoff,
                                     sampling=service.sampling(body.temperature, body.top_p, body.seed))
        else:
            raise ApiError(400, "give `messages` (a worker for the server to decode) or `text` (a branch to "
                                "prefill)", param="messages")
        answer = await _unless_gone(request, service.run(job))
        if answer is None:
            return Response(status_code=499)
        return JSONResponse(_branch_object(answer.branch, service.model_id), status_code=200)

    @app.get("/v1/branches/{branch_id}")
    async def get_branch(branch_id: str) -> dict[str, Any]:
        return _branch_object(_info(service, branch_id), service.model_id)

    @app.delete("/v1/branches/{branch_id}")
    async def delete_branch(branch_id: str) -> dict[str, Any]:
        info = _info(service, branch_id, delete=True)
        return {"id": info.id, "object": "branch", "deleted": True}

    @app.post("/v1/parallel")
    async def parallel(body: ParallelRequest, request: Request) -> Response:
        service.check_model(body.model)
        family = service.family_of(body.family)
        base = service.sampling(body.temperature, body.top_p, body.seed, default_temperature=0.7)
        jobs = [service.worker_job(prompts.worker_messages(body.question, family), max_tokens=body.budget,
                                   handoff=service.origin.handoff,
                                   sampling=type(base)(base.temperature, base.top_p, base.seed + i))
                for i in range(body.k)]
        result = await _unless_gone(request, _parallel(service, body, jobs, family))
        return Response(status_code=499) if result is None else JSONResponse(result)

    return app


async def _parallel(service: Service, body: ParallelRequest, jobs: list[Job], family: str) -> dict[str, Any]:
    """The workers side by side (they share decode steps), then the synthesis over their branches."""
    tasks = [asyncio.ensure_future(service.run(j)) for j in jobs]
    try:
        workers: list[Answer] = list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    ids = [w.branch.id for w in workers]
    try:
        job, cached = service.synthesis_job(
            [{"role": "user", "content": body.question}], ids, body.synthesis, max_tokens=body.synthesis_max_tokens,
            sampling=service.sampling(0.0, None, body.seed), family=family)
        answer = await service.run(job)
    finally:
        if not body.keep_branches:
            for i in ids:
                with contextlib.suppress(KeyError):
                    service.store.delete(i)
    completion = sum(len(w.tokens) for w in workers) + len(job.generated)
    return {"id": "par-" + uuid.uuid4().hex, "object": "parallel", "created": int(time.time()),
            "model": service.model_id, "synthesis": body.synthesis, "k": body.k,
            "branches": [_branch_object(w.branch, service.model_id) | {"kept": body.keep_branches} for w in workers],
            "answer": {"content": answer.text, "finish_reason": answer.finish_reason},
            "usage": {"prompt_tokens": sum(w.prompt_tokens for w in workers) + answer.prompt_tokens,
                      "completion_tokens": completion,
                      "total_tokens": sum(w.prompt_tokens for w in workers) + answer.prompt_tokens + completion,
                      "prompt_tokens_details": {"cached_tokens": cached}}}


# ------------------------------------------------------------------------------ streaming
async def _stream(service: Service, job: Job, request: Request, completion_id: str, cached: int,
                  extra: dict[str, Any], include_usage: bool) -> Response:
    """Server-sent events as the openai client reads them. The first event is awaited before the
    response starts, so a request that fails at once still gets its HTTP error status."""
    events = service.events(job)
    first = await events.__anext__()
    if isinstance(first, Failed):
        await events.aclose()
        raise as_api_error(first.error)
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": service.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                        "logprobs": None}], **more}
        return f"data: {json.dumps(body)}\n\n"

    async def body() -> AsyncIterator[str]:
        text = _Detokenizer(service)
        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if isinstance(event, Token):
                    piece = text.add(event.id)
                    if piece:
                        yield chunk({"content": piece})
                elif isinstance(event, Done):
                    rest = text.flush()
                    if rest:
                        yield chunk({"content": rest})
                    yield chunk({}, event.finish_reason, **extra)
                    if include_usage:
                        usage = _usage(event.prompt_tokens, event.completion_tokens, cached)
                        yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': service.model_id, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:  # Failed mid-stream: an error object, as OpenAI streams send one
                    yield f"data: {json.dumps(as_api_error(event.error).body())}\n\n"
                    return
                event = await events.__anext__()
        finally:
            await events.aclose()  # cancels the job when the client went away

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Detokenizer:
    """Text deltas from tokens: the decoded text grows; a trailing partial UTF-8 character waits."""

    def __init__(self, service: Service):
        self.tok, self.ids, self.sent = service.tok, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


# ------------------------------------------------------------------------------ helpers
async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None (and `work` cancelled, its job with it) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                return None
    except asyncio.CancelledError:
        task.cancel()
        raise


def _info(service: Service, branch_id: str, delete: bool = False) -> BranchInfo:
    try:
        return service.store.delete(branch_id) if delete else service.store.info(branch_id)
    except KeyError as err:
        raise as_api_error(err) from None


def _branch_object(info: BranchInfo, model_id: str) -> dict[str, Any]:
    return {"id": info.id, "object": "branch", "created": info.created, "model": model_id,
            "adapter": info.origin.adapter, "handoff": info.origin.handoff.as_dict(), "tokens": info.tokens,
            "kept_tokens": info.kept_tokens, "prompt_tokens": info.prompt_tokens, "text": info.text,
            "finish_reason": info.finish_reason, "reused": info.reused, "location": info.location,
            "bytes": info.nbytes}


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _synthesis_field(body: ChatCompletionRequest, cached: int) -> dict[str, Any]:
    if body.branches is None:
        return {}
    return {"synthesis": {"mode": body.synthesis, "branches": list(body.branches), "branch_tokens": cached}}


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's errors as one message naming each field (malformed JSON said so)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return ApiError(400, "; ".join(parts) or "invalid request body", param=param, code="invalid_request")


class _Guard:
    """ASGI middleware: the bearer key (when set) and the request body size limit, before any route."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope.get("path") != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                return await _send_error(send, ApiError(401, "missing or wrong API key: send `Authorization: Bearer "
                                                             "<key>`", code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, _too_large(self.limit))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, _too_large(self.limit))


class _BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read (FastAPI re-raises HTTP exceptions from its body parsing)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large(limit).message)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds this server's limit of {limit} bytes", code="body_too_large")


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
