"""Continuous batching: one thread owns the engine's decode state and every device call.

Requests arrive as `Job`s from any thread (`Scheduler.submit`). The loop, each round:
1. drops cancelled jobs (a client that went away frees its slot at once);
2. admits waiting jobs in arrival order while decode slots are free, at most `prefills_per_round`
   per round so that running requests keep decoding: prefill (a chat / worker prompt, a
   synthesizer prompt over stored branches, or a branch given as text, which needs no slot),
   then insert into a free slot; a new request never waits for the others to finish;
3. runs one `generate` step for every live slot and hands each job its token.

A job reports through `emit` (called on this thread; the service forwards to its event loop):
`Token` per generated token (chat and synthesis jobs), then `Done` or `Failed`. A failure (a
dropped branch, an error on the device) fails that job alone: its slot is freed and its branches
unpinned; an error inside a shared step fails the jobs in it and restarts the decode state, and
the server keeps serving. A worker's final token is fed once more before its slot is freed, so the
slot holds its whole output when its kept span is handed to the branch store.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Literal

import jax
import numpy as np

from psynth_jax.serve.engine import DecodeState, Engine, RowSampling, stack_branches
from psynth_jax.serve.store import BranchInfo, BranchKey, BranchStore, Origin
from psynth_jax.synthesis.handoff import Handoff

Kind = Literal["chat", "worker", "cache", "text", "text_branch"]
STREAMED: frozenset[str] = frozenset({"chat", "cache", "text"})


@dataclasses.dataclass(frozen=True)
class Token:
    id: int


@dataclasses.dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    branch: BranchInfo | None = None  # workers and text branches: what was stored


@dataclasses.dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Token | Done | Failed


@dataclasses.dataclass(eq=False)
class Job:
    """One request to the engine.

    kind: "chat" (a prompt, LoRA off), "worker" (a prompt decoded, its KV stored as a branch),
    "cache" (a synthesizer prompt over `branch_ids`, LoRA on), "text" (a text-synthesis prompt,
    LoRA off), "text_branch" (`prompt` + `output` prefilled and stored; no decoding).
    """

    kind: Kind
    prompt: list[int]
    emit: Callable[[Event], None] = lambda event: None  # set by whoever waits for the events
    max_tokens: int = 1
    sampling: RowSampling = RowSampling()
    stop_ids: frozenset[int] = frozenset()
    branch_ids: tuple[str, ...] = ()
    handoff: Handoff | None = None  # workers and text branches
    output: list[int] = dataclasses.field(default_factory=list)  # text branches: the given output tokens
    text: str = ""  # text branches: the given text
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: list[int] = dataclasses.field(default_factory=list)
    final_feed: bool = False  # a finished worker whose last token is still to be written
    finish_reason: str | None = None

    @property
    def lora(self) -> bool:
        return self.kind == "cache"

    def cancel(self) -> None:
        self.cancelled.set()

    def take(self, token: int) -> bool:
        """Record a generated token (emitting it unless it is the stop token); True when finished."""
        self.generated.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
        if self.kind in STREAMED and self.finish_reason != "stop":
            self.emit(Token(token))
        return self.finish_reason is not None


class Scheduler:
    """The engine's one driver thread: admission into decode slots, one shared decode step per round."""

    def __init__(self, engine: Engine, store: BranchStore, origin: Origin, *, prefills_per_round: int = 4):
        self.engine = engine
        self.store = store
        self.origin = origin
        self.prefills_per_round = max(1, prefills_per_round)
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._pending: collections.deque[Job] = collections.deque()
        self._slots: list[Job | None] = [None] * engine.slots
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens = 0
        self.decode_seconds = 0.0

    # ------------------------------------------------------------ other threads
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="psynth-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._inbox.append(job)
            self._cv.notify()

    def wake(self) -> None:
        """Look at the jobs again now (a job was cancelled)."""
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job already submitted, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int | float]:
        with self._cv:
            return {"slots": len(self._slots), "live_slots": sum(j is not None for j in self._slots),
                    "waiting": len(self._pending) + len(self._inbox), "steps": self.steps,
                    "decoded_tokens": self.tokens, "decode_seconds": round(self.decode_seconds, 3)}

    # ------------------------------------------------------------------- thread
    def _run(self) -> None:
        state = self.engine.warm_up(self.engine.init_decode_state())
        while True:
            with self._cv:
                while not (self._inbox or self._pending or self._live() or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._inbox or self._pending or self._live()):
                    return
                self._pending.extend(self._inbox)
                self._inbox.clear()
            self._drop_cancelled()
            admitted = 0
            while self._pending and admitted < self.prefills_per_round:
                job = self._pending[0]
                if job.kind != "text_branch" and None not in self._slots:
                    break
                self._pending.popleft()
                state = self._admit(job, state)
                admitted += 1
            if self._live():
                state = self._step(state)

    def _live(self) -> bool:
        return any(j is not None for j in self._slots)

    def _drop_cancelled(self) -> None:
        self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
        for i, job in enumerate(self._slots):
            if job is not None and job.cancelled.is_set():
                self._slots[i] = None

    def _admit(self, job: Job, state: DecodeState) -> DecodeState:
        """Prefill `job` and insert it into a free slot (a text branch is stored at once)."""
        if job.cancelled.is_set():
            return state
        try:
            if job.kind == "text_branch":
                self._store_text_branch(job)
                return state
            prefix = self._prefill(job)
            if job.take(int(self.engine.fetch(prefix.first)[0])) and job.kind != "worker":
                job.emit(self._done(job))
                return state
            slot = self._slots.index(None)
            state = self.engine.insert(prefix, state, slot, job.sampling, lora=job.lora)
            self._slots[slot] = job
            job.final_feed = job.finish_reason is not None
        except Exception as err:  # noqa: BLE001 - the job fails alone; the server keeps serving
            job.emit(Failed(err))
            if _deleted(state):
                state = self._restart(err)
        return state

    def _prefill(self, job: Job):
        if job.kind != "cache":
            return self.engine.prefill(job.prompt, job.sampling, lora=False)
        lease = self.store.acquire(job.branch_ids, self.origin)
        try:
            return self.engine.prefill_synthesis(job.prompt, stack_branches(lease.caches), job.sampling,
                                                 max_tokens=job.max_tokens)
        finally:
            self.store.release(lease)  # the prefix holds its own copy: the branches may move again

    def _step(self, state: DecodeState) -> DecodeState:
        live = np.asarray([j is not None for j in self._slots])
        t0 = time.perf_counter()
        try:
            state, drawn = self.engine.generate(state, live)
            drawn = self.engine.fetch(drawn)
        except Exception as err:  # noqa: BLE001 - fail the jobs of this step, keep serving
            return self._restart(err)
        self.decode_seconds += time.perf_counter() - t0
        self.steps += 1
        self.tokens += int(live.sum())
        for i, job in enumerate(self._slots):
            if job is None:
                continue
            if job.final_feed:
                self._slots[i] = None
                self._finish_worker(job, state, i)
            elif job.take(int(drawn[i])):
                if job.kind == "worker":
                    job.final_feed = True
                else:
                    self._slots[i] = None
                    job.emit(self._done(job))
        return state

    def _restart(self, err: BaseException) -> DecodeState:
        """Fail every job in a slot and start from an empty decode state."""
        for i, job in enumerate(self._slots):
            if job is not None:
                job.emit(Failed(err))
                self._slots[i] = None
        return self.engine.init_decode_state()

    # ------------------------------------------------------------------ branches
    def _finish_worker(self, job: Job, state: DecodeState, slot: int) -> None:
        try:
            stopped = job.finish_reason == "stop"
            output = job.generated[:-1] if stopped else list(job.generated)
            if not output:
                raise ValueError("the worker stopped at its first token: an empty branch is not stored")
            key = BranchKey(self._origin(job.handoff), tuple(job.prompt), tuple(output), stopped)
            info = self.store.add(
                key, lambda: self.engine.hand_over(state, slot, len(job.prompt), len(output), stopped, job.handoff),
                kept=kept_tokens(job.handoff, len(job.prompt), len(output), stopped),
                text=self.engine.synth.tok.decode(output), finish_reason=job.finish_reason)
            job.emit(self._done(job, info))
        except Exception as err:  # noqa: BLE001
            job.emit(Failed(err))

    def _store_text_branch(self, job: Job) -> None:
        key = BranchKey(self._origin(job.handoff), tuple(job.prompt), tuple(job.output), True)
        info = self.store.add(key, lambda: self.engine.branch_from_tokens(job.prompt, job.output, job.handoff),
                              kept=kept_tokens(job.handoff, len(job.prompt), len(job.output), True), text=job.text,
                              finish_reason="stop")
        job.emit(Done("stop", len(job.prompt), 0, info))

    def _origin(self, handoff: Handoff) -> Origin:
        return dataclasses.replace(self.origin, handoff=handoff)

    @staticmethod
    def _done(job: Job, branch: BranchInfo | None = None) -> Done:
        return Done(job.finish_reason or "length", len(job.prompt), len(job.generated), branch)


def _deleted(state: DecodeState) -> bool:
    """Whether a failed call had already consumed (donated) the decode state."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def kept_tokens(handoff: Handoff, prompt_len: int, output_len: int, stopped: bool) -> int:
    """KV entries a branch hands the synthesizer under `handoff` (its kept span's length)."""
    _, kept = handoff.kept_span(np.asarray([prompt_len]), np.asarray([output_len]), np.asarray([stopped]))
    return int(kept[0])
