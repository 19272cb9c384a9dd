"""The branch store: branch caches by id, within a byte budget on the device, spilling to host memory.

A branch is the KV a worker hands the synthesizer (`BranchCaches` of one branch, its keys still at
the worker's positions). Its content is keyed by everything that determines those arrays: the
model, the adapter, the handoff convention and the tokens (worker prompt, output, whether it
stopped). Storing a branch whose key is already held reuses the held arrays; each store call still
gets its own id, so deleting one id never takes a branch from another client.

Budget: the device holds at most `device_budget` bytes of branches; the least recently used
unpinned ones move to host memory (numpy) and come back when a synthesis needs them. Past
`host_budget` bytes on the host, the least recently used unpinned branches are dropped; their ids
then answer "evicted". A synthesis pins its branches from the moment it takes them (`acquire`)
until its prefill has copied them into its decode slot (`release`), so a pinned branch is never
moved. Deleted and evicted ids are remembered (up to `GONE_REMEMBERED`) to say which happened.

Thread-safe (one lock): the scheduler's thread stores, acquires and releases; HTTP handlers read
and delete.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from psynth_jax.model.kv_cache import BranchCaches
from psynth_jax.synthesis.handoff import Handoff

GONE_REMEMBERED = 100_000


@dataclasses.dataclass(frozen=True)
class Origin:
    """Who made a branch: the model and adapter that computed its KV, and the handoff convention
    that chose its span. A synthesizer reads only branches of its own origin."""

    model: str
    adapter: str
    handoff: Handoff

    def describe(self) -> str:
        return f"model {self.model!r}, adapter {self.adapter!r}, handoff {self.handoff.convention}/{self.handoff.stop_tokens}"


@dataclasses.dataclass(frozen=True)
class BranchKey:
    """What determines a branch's arrays: its origin and its tokens."""

    origin: Origin
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    stopped: bool


@dataclasses.dataclass(frozen=True)
class BranchInfo:
    """What the API says about one branch id."""

    id: str
    origin: Origin
    prompt_tokens: int
    tokens: int  # output tokens (a final stop token excluded)
    kept_tokens: int  # KV entries the synthesizer receives
    text: str
    finish_reason: str
    location: str  # "device" | "host"
    reused: bool
    created: int
    nbytes: int


class BranchNotFound(KeyError):
    """An id the store does not hold (never issued, deleted, or evicted); the message says which."""

    def __str__(self) -> str:
        return str(self.args[0])


class BranchMismatch(ValueError):
    """A branch made under another model, adapter or handoff convention than the synthesizer's."""


@dataclasses.dataclass(eq=False)
class _Content:
    key: BranchKey
    kept: int
    text: str
    finish_reason: str
    nbytes: int
    device: BranchCaches | None
    host: BranchCaches | None = None
    pins: int = 0
    ids: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class _Handle:
    content: _Content
    created: int
    reused: bool


@dataclasses.dataclass(frozen=True)
class Lease:
    """Branches a synthesis holds pinned: their arrays on the device, in the order asked for."""

    caches: tuple[BranchCaches, ...]
    contents: tuple[_Content, ...]


class BranchStore:
    """Branches by id under a device byte budget (LRU spill to host, and from host past its budget).

    place: how a host copy goes back to the device (the engine's layout)."""

    def __init__(self, *, device_budget: int, host_budget: int | None = None,
                 place: Callable[[BranchCaches], BranchCaches] = jax.device_put):
        if device_budget < 0 or (host_budget is not None and host_budget < 0):
            raise ValueError("branch store budgets must be >= 0 bytes")
        self.device_budget = device_budget
        self.host_budget = host_budget
        self._place = place
        self._lock = threading.RLock()
        self._contents: collections.OrderedDict[BranchKey, _Content] = collections.OrderedDict()  # LRU first
        self._ids: dict[str, _Handle] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ---------------------------------------------------------------- adding
    def add(self, key: BranchKey, make: Callable[[], BranchCaches], *, kept: int, text: str, finish_reason: str
            ) -> BranchInfo:
        """A new id for the branch `key`: the held arrays when the key is already stored (`reused`),
        else `make()`'s (computed now, on the device)."""
        with self._lock:
            content = self._contents.get(key)
            reused = content is not None
            if content is None:
                caches = make()
                content = _Content(key, kept, text, finish_reason, _nbytes(caches), caches)
                self._contents[key] = content
                self._fit(0)
            else:
                self._contents.move_to_end(key)
            branch_id = "br-" + secrets.token_hex(12)
            content.ids.add(branch_id)
            self._ids[branch_id] = _Handle(content, int(time.time()), reused)
            return self._info(branch_id)

    # ---------------------------------------------------------------- reading
    def info(self, branch_id: str) -> BranchInfo:
        with self._lock:
            return self._info(branch_id)

    def delete(self, branch_id: str) -> BranchInfo:
        """Drop an id; the arrays go when no id holds them (not while a synthesis has them pinned)."""
        with self._lock:
            info = self._info(branch_id)
            content = self._ids.pop(branch_id).content
            content.ids.discard(branch_id)
            self._forget(branch_id, "deleted")
            if not content.ids and content.pins == 0:
                self._drop(content)
            return info

    def texts(self, ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [self._handle(i).content.text for i in ids]

    def check(self, ids: Sequence[str], origin: Origin) -> list[BranchInfo]:
        """Each id's info, or the first problem: an unknown / dropped id, a branch of another origin."""
        with self._lock:
            infos = [self._info(i) for i in ids]
            for info in infos:
                if info.origin != origin:
                    raise BranchMismatch(f"branch {info.id!r} was made under {info.origin.describe()}; this "
                                         f"synthesizer reads branches of {origin.describe()}")
            return infos

    # ---------------------------------------------------------------- synthesis
    def acquire(self, ids: Sequence[str], origin: Origin) -> "Lease":
        """The branches' arrays on the device, pinned until `release(lease)` (checked as `check`)."""
        with self._lock:
            self.check(ids, origin)
            contents = [self._handle(i).content for i in ids]
            for c in contents:
                c.pins += 1
            try:
                for c in contents:
                    self._contents.move_to_end(c.key)
                    if c.device is None:
                        self._fit(c.nbytes)
                        c.device, c.host = self._place(c.host), None
                return Lease(tuple(c.device for c in contents), tuple(contents))
            except BaseException:
                self._unpin(contents)
                raise

    def release(self, lease: "Lease") -> None:
        """Unpin what `acquire` pinned (a branch deleted meanwhile goes now)."""
        with self._lock:
            self._unpin(lease.contents)

    def stats(self) -> dict[str, int]:
        with self._lock:
            on_device = [c for c in self._contents.values() if c.device is not None]
            return {"ids": len(self._ids), "branches": len(self._contents), "device_branches": len(on_device),
                    "device_bytes": sum(c.nbytes for c in on_device),
                    "host_bytes": sum(c.nbytes for c in self._contents.values() if c.device is None),
                    "pins": sum(c.pins for c in self._contents.values()),
                    "device_budget": self.device_budget, "host_budget": -1 if self.host_budget is None else self.host_budget}

    # ---------------------------------------------------------------- internals
    def _handle(self, branch_id: str) -> _Handle:
        handle = self._ids.get(branch_id)
        if handle is None:
            why = self._gone.get(branch_id)
            if why is None:
                raise BranchNotFound(f"no branch {branch_id!r} in this server's store")
            raise BranchNotFound(f"branch {branch_id!r} was {why} and is no longer available")
        return handle

    def _info(self, branch_id: str) -> BranchInfo:
        h = self._handle(branch_id)
        c = h.content
        return BranchInfo(id=branch_id, origin=c.key.origin, prompt_tokens=len(c.key.prompt),
                          tokens=len(c.key.output), kept_tokens=c.kept, text=c.text, finish_reason=c.finish_reason,
                          location="device" if c.device is not None else "host", reused=h.reused, created=h.created,
                          nbytes=c.nbytes)

    def _unpin(self, contents: Sequence[_Content]) -> None:
        for c in contents:
            c.pins = max(c.pins - 1, 0)
            if c.pins == 0 and not c.ids:
                self._drop(c)
        self._fit(0)

    def _fit(self, incoming: int) -> None:
        """Spill least recently used unpinned device branches to host until `incoming` more bytes fit;
        then drop least recently used unpinned host branches past the host budget."""
        on_device = sum(c.nbytes for c in self._contents.values() if c.device is not None)
        for c in list(self._contents.values()):
            if on_device + incoming <= self.device_budget:
                break
            if c.device is not None and c.pins == 0:
                c.host = jax.tree.map(np.asarray, jax.device_get(c.device))
                for leaf in jax.tree.leaves(c.device):
                    leaf.delete()
                c.device = None
                on_device -= c.nbytes
        if self.host_budget is None:
            return
        on_host = sum(c.nbytes for c in self._contents.values() if c.device is None)
        for c in list(self._contents.values()):
            if on_host <= self.host_budget:
                break
            if c.device is None and c.pins == 0:
                on_host -= c.nbytes
                for i in list(c.ids):
                    self._ids.pop(i, None)
                    self._forget(i, "evicted from the branch store (its host memory budget)")
                self._drop(c)

    def _drop(self, content: _Content) -> None:
        self._contents.pop(content.key, None)
        if content.device is not None:
            for leaf in jax.tree.leaves(content.device):
                leaf.delete()
        content.device = content.host = None

    def _forget(self, branch_id: str, why: str) -> None:
        self._gone[branch_id] = why
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)


def _nbytes(caches: BranchCaches) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(caches)))
