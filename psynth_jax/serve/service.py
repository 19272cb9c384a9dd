"""What the server does, without HTTP: requests checked and turned into scheduler jobs, their events
awaited on the caller's asyncio loop.

Every check that can fail a request runs before it is queued (the model named, the messages, the
branch ids and their origin, the token budget of a decode slot), so a bad request costs no device
time and gets an `ApiError` naming the problem (an HTTP status and the OpenAI error fields). The
HTTP layer (app.py) only parses bodies and formats answers.

Synthesis prompts are the library's (synthesis/prompts.py), built around the conversation's last
user message exactly as `ParallelSynthesis` builds them, so the cache path answers here as it does
there: `cache_synth_messages(question, K, family)` over the branch caches, or
`text_synth_messages(question, branch texts, family)` for the text path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Any, AsyncIterator, Sequence

from psynth_jax.inference.generator import bucket
from psynth_jax.serve.engine import Engine, RowSampling
from psynth_jax.serve.scheduler import Done, Event, Failed, Job, Scheduler, Token
from psynth_jax.serve.store import BranchInfo, BranchMismatch, BranchNotFound, BranchStore, Origin
from psynth_jax.synthesis import prompts
from psynth_jax.synthesis.handoff import Handoff

Messages = list[dict[str, str]]
DEFAULT_BRANCH_SYSTEM = prompts.CHAT.worker_system  # the worker prompt of a branch given as bare text


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """The OpenAI error shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def as_api_error(err: BaseException) -> ApiError:
    """Any failure of a request as an ApiError: store problems are 404 / 400, the rest 500."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, BranchNotFound):
        return ApiError(404, str(err), param="branches", code="branch_not_found")
    if isinstance(err, BranchMismatch):
        return ApiError(400, str(err), param="branches", code="branch_mismatch")
    return ApiError(500, f"the request failed on the server: {type(err).__name__}: {err}", kind="server_error")


@dataclasses.dataclass(frozen=True)
class Answer:
    """A finished generation: its text, tokens and why it ended."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    branch: BranchInfo | None = None


class Service:
    """The server's operations over one engine, its branch store and scheduler."""

    def __init__(self, engine: Engine, store: BranchStore, scheduler: Scheduler, *, model_id: str,
                 family: str = "math", default_max_tokens: int = 256):
        prompts.task_prompts(family)
        self.engine, self.store, self.scheduler = engine, store, scheduler
        self.model_id = model_id
        self.family = family
        self.default_max_tokens = default_max_tokens
        self.tok = engine.synth.tok
        self.chat_stops = frozenset(engine.synth.gen.stop_ids)

    @property
    def origin(self) -> Origin:
        return self.scheduler.origin

    # --------------------------------------------------------------- checks
    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def handoff(self, given: dict[str, str] | None) -> Handoff:
        if not given:
            return self.origin.handoff
        try:
            return Handoff.from_config(convention=given.get("convention"), stop_tokens=given.get("stop_tokens"),
                                       base=self.origin.handoff)
        except (TypeError, ValueError) as err:
            raise ApiError(400, f"handoff: {err}", param="handoff") from None

    def family_of(self, given: str | None) -> str:
        family = given or self.family
        if family not in prompts.TASK_PROMPTS:
            raise ApiError(400, f"unknown family {family!r}; known: {sorted(prompts.TASK_PROMPTS)}", param="family")
        return family

    def chat_tokens(self, messages: Messages, param: str = "messages") -> list[int]:
        if not messages:
            raise ApiError(400, "messages is empty: give at least one message", param=param)
        try:
            return self.engine.synth.gen.chat_tokens(messages)
        except Exception as err:  # noqa: BLE001 - a template that refuses these messages
            raise ApiError(400, f"{param}: the chat template refused them: {err}", param=param) from None

    def max_tokens(self, given: int | None, used: int, what: str) -> int:
        """The completion budget: as given (it must fit the decode slot), else what fits up to the default."""
        room = self.engine.max_context - used
        if given is None:
            given = min(self.default_max_tokens, room)
        if given < 1 or given > room:
            raise ApiError(400, f"{what} takes {used} of a decode slot's {self.engine.max_context} cache slots; "
                                f"max_tokens {given} does not fit (at most {max(room, 0)} here)",
                           param="max_tokens", code="context_length_exceeded")
        return given

    @staticmethod
    def sampling(temperature: float | None, top_p: float | None, seed: int | None, default_temperature: float = 1.0
                 ) -> RowSampling:
        return RowSampling(temperature=default_temperature if temperature is None else float(temperature),
                           top_p=1.0 if top_p is None else float(top_p),
                           seed=secrets.randbits(31) if seed is None else int(seed))

    # ------------------------------------------------------------ operations
    def chat_job(self, messages: Messages, *, max_tokens: int | None, sampling: RowSampling) -> Job:
        prompt = self.chat_tokens(messages)
        budget = self.max_tokens(max_tokens, len(prompt), f"the prompt of {len(prompt)} tokens")
        return Job("chat", prompt, max_tokens=budget, sampling=sampling, stop_ids=self.chat_stops)

    def synthesis_job(self, messages: Messages, branch_ids: Sequence[str], mode: str, *, max_tokens: int | None,
                      sampling: RowSampling, family: str | None = None) -> tuple[Job, int]:
        """(a synthesis over stored branches, the branch tokens it reads): the cache path ("cache":
        the mapped branch KV, LoRA on) or the text path ("text": the branches' texts, LoRA off)."""
        if mode not in ("cache", "text"):
            raise ApiError(400, f"synthesis must be 'cache' or 'text', got {mode!r}", param="synthesis")
        if not branch_ids:
            raise ApiError(400, "branches is empty: synthesis needs at least one branch id (K >= 1)",
                           param="branches")
        family = self.family_of(family)
        question = last_user_message(messages)
        infos = self._branches(branch_ids)
        if mode == "text":
            texts = [i.text for i in infos]
            prompt = self.chat_tokens(prompts.text_synth_messages(question, texts, family))
            budget = self.max_tokens(max_tokens, len(prompt), f"the text-synthesis prompt of {len(prompt)} tokens")
            job = Job("text", prompt, max_tokens=budget, sampling=sampling, stop_ids=self.chat_stops)
            return job, sum(i.tokens for i in infos)
        prompt = self.chat_tokens(prompts.cache_synth_messages(question, len(infos), family))
        longest = max(i.kept_tokens for i in infos)
        fixed = len(infos) * bucket(max(longest, 1))
        budget = self._synthesis_budget(max_tokens, fixed, len(prompt), longest, len(infos))
        job = Job("cache", prompt, max_tokens=budget, sampling=sampling, stop_ids=self.chat_stops,
                  branch_ids=tuple(branch_ids))
        return job, sum(i.kept_tokens for i in infos)

    def worker_job(self, messages: Messages, *, max_tokens: int | None, sampling: RowSampling,
                   handoff: Handoff) -> Job:
        prompt = self.chat_tokens(messages)
        budget = self.max_tokens(max_tokens, len(prompt), f"the worker prompt of {len(prompt)} tokens")
        return Job("worker", prompt, max_tokens=budget, sampling=sampling, handoff=handoff,
                   stop_ids=frozenset(handoff.stop_ids(self.tok, self.engine.cfg.eos_token_ids)))

    def text_branch_job(self, text: str, messages: Messages | None, handoff: Handoff) -> Job:
        """A branch given as text: prefilled after its worker prompt (`messages`, default a one-line
        system prompt) as if a worker had written it."""
        if not text:
            raise ApiError(400, "text is empty: a branch needs at least one token", param="text")
        prompt = self.chat_tokens(messages or [{"role": "system", "content": DEFAULT_BRANCH_SYSTEM}])
        output = self.tok.encode(text, add_special_tokens=False)
        if not output:
            raise ApiError(400, "text has no tokens: a branch needs at least one", param="text")
        if len(prompt) + len(output) > self.engine.max_context:
            raise ApiError(400, f"the branch's worker prompt ({len(prompt)} tokens) + text ({len(output)} tokens) "
                                f"exceed a decode slot's {self.engine.max_context} cache slots",
                           param="text", code="context_length_exceeded")
        return Job("text_branch", prompt, handoff=handoff, output=output, text=text)

    async def events(self, job: Job) -> AsyncIterator[Event]:
        """Queue `job` and yield its events until Done or Failed; leaving early (a client gone,
        a cancelled task) cancels the job, which frees its slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody waits any more
                job.cancel()

        job.emit = emit
        try:
            self.scheduler.submit(job)
        except RuntimeError as err:
            raise ApiError(503, str(err), kind="server_error") from None
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            job.cancel()
            self.scheduler.wake()

    async def run(self, job: Job) -> Answer:
        """Run a job to its end: its answer, or its failure as an ApiError."""
        done: Done | None = None
        async for event in self.events(job):
            if isinstance(event, Failed):
                raise as_api_error(event.error)
            if isinstance(event, Done):
                done = event
        assert done is not None
        output = job.generated[:-1] if done.finish_reason == "stop" else job.generated
        return Answer(self.tok.decode(output) if job.kind != "text_branch" else job.text, list(output),
                      done.finish_reason, done.prompt_tokens, done.branch)

    def stats(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.stats(), "store": self.store.stats()}

    # --------------------------------------------------------------- helpers
    def _branches(self, ids: Sequence[str]) -> list[BranchInfo]:
        try:
            return self.store.check(ids, self.origin)
        except (BranchNotFound, BranchMismatch) as err:
            raise as_api_error(err) from None

    def _synthesis_budget(self, given: int | None, branch_slots: int, prompt_len: int, longest: int, k: int) -> int:
        """max_tokens of a cache synthesis: its prefix (K padded branches + the prompt's bucket with
        room for the answer) must fit a decode slot, and its positions the model."""
        room = self.engine.max_context - branch_slots - bucket(prompt_len)
        positions = self.engine.cfg.max_position_embeddings - longest - prompt_len
        limit = min(room, positions)
        want = min(self.default_max_tokens, limit) if given is None else given
        if want < 1 or want > limit or self.engine.synthesis_slots(branch_slots // k, k, prompt_len, want) > \
                self.engine.max_context:
            raise ApiError(400, f"{k} branches ({branch_slots} cache slots padded) + the synthesizer prompt of "
                                f"{prompt_len} tokens leave no room for max_tokens {want} in a decode slot of "
                                f"{self.engine.max_context} cache slots", param="max_tokens",
                           code="context_length_exceeded")
        return want


def last_user_message(messages: Messages) -> str:
    """The question a synthesis answers: the conversation's last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content", "")
    raise ApiError(400, "a synthesis needs a user message (the question) in messages", param="messages")
