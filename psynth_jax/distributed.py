"""Many processes, one program: the multi-host setup and the host-level helpers every command uses.

A TPU pod slice is many hosts, one JAX process each; a GPU cluster is many nodes. Every process
runs the same command. `initialize()` joins them into one JAX runtime:

- `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: an
  explicit launch (GPU nodes over ssh, `launch/local_pod.sh` on one machine). On CPU the
  processes talk through gloo collectives; `JAX_NUM_CPU_DEVICES` sets each one's devices.
- `TPU_WORKER_HOSTNAMES` with several hosts: a Cloud TPU pod; JAX finds everything itself.
- neither: one process, nothing to do.

A process that cannot reach the coordinator fails with a clear error after `timeout_s`, rather
than hanging or aborting inside the runtime (which JAX does on a registration timeout).

Then: `is_main()` says who writes logs, reports and progress bars; `process_share(items)` gives
each process a disjoint share whose union is every item; `barrier(name)` waits for all;
`allgather_objects` / `broadcast_object` exchange small JSON-able values; `preemption_agreed(step)`
is True on every process at the same step once any of them received SIGTERM (JAX's preemption
sync point); `fetch(tree)` brings device arrays to every host, whichever devices hold them;
`place(x, sharding)` builds a global array from a host value every process holds whole, and
`put(tree, shardings)` places arrays that each process holds on its own devices onto a mesh that
spans processes.

Host-level coordination (barriers, object exchange) goes through the coordination service's
key-value store and barriers, with their own timeout (`PSYNTH_BARRIER_TIMEOUT`, default 24 h), not
through device collectives: processes reach the end of unequal shares of work (eval chunks,
distillation batches) minutes or hours apart, and a device collective (gloo on CPU) gives up on a
late peer after its own fixed timeout. A process that dies makes the others' wait fail at once
(the service notices the missing heartbeat), never hang.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from typing import Any, Sequence, TypeVar

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the state jax.distributed.initialize() sets up
from jax.experimental import multihost_utils

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600
_KV_CHUNK = 1 << 20  # bytes per key-value entry (the service's messages stay small)
_calls = itertools.count()  # every process makes the same coordination calls in the same order


class DistributedSetupError(ValueError):
    """The processes could not be joined (unreachable coordinator, inconsistent settings): a setup
    error the CLI reports in one line."""


def explicit_launch() -> tuple[str, int, int] | None:
    """(coordinator address, process count, this process id) from the environment, or None."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    try:
        count = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
        index = int(os.environ.get("JAX_PROCESS_ID", "0"))
    except ValueError as err:
        raise DistributedSetupError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {err}") from None
    if count < 1 or not 0 <= index < count:
        raise DistributedSetupError(f"JAX_PROCESS_ID={index} is outside 0..{count - 1} (JAX_NUM_PROCESSES={count})")
    return address, count, index


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until a TCP connection to `address` succeeds; DistributedSetupError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"cannot reach the coordinator (process 0) at {address} after {timeout_s:.0f} s ({err}); "
                    "is process 0 running, and JAX_COORDINATOR_ADDRESS its reachable host:port?") from None
            time.sleep(0.5)


def initialize(timeout_s: float | None = None) -> None:
    """Join this process to the others (a no-op for a single process or when already joined).

    timeout_s: how long to wait for the coordinator and for every process to register
    (default $PSYNTH_DISTRIBUTED_TIMEOUT or 300 s).
    """
    if jax.distributed.is_initialized():
        return
    timeout_s = float(timeout_s if timeout_s is not None else os.environ.get("PSYNTH_DISTRIBUTED_TIMEOUT",
                                                                              DEFAULT_TIMEOUT_S))
    launch = explicit_launch()
    if launch is not None:
        address, count, index = launch
        if count == 1:
            return
        # CPU devices talk through gloo (it only concerns the CPU backend: harmless on GPU / TPU)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if index != 0:
            wait_for_coordinator(address, timeout_s)
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   initialization_timeout=int(timeout_s))
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(initialization_timeout=int(timeout_s))


def is_main() -> bool:
    """Process 0: the one that writes logs, metrics, reports and progress bars."""
    return jax.process_index() == 0


def process_share(items: Sequence[T], index: int | None = None, count: int | None = None) -> list[T]:
    """This process's disjoint share of `items` (every count-th, from its index); the shares of all
    processes together are `items`, each exactly once."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return list(items[index::count])


def barrier_timeout_s() -> float:
    """How long a process waits for the others at a barrier or exchange ($PSYNTH_BARRIER_TIMEOUT)."""
    return float(os.environ.get("PSYNTH_BARRIER_TIMEOUT", DEFAULT_BARRIER_TIMEOUT_S))


def _client():
    client = jax_distributed.global_state.client  # the coordination service client jax.distributed started
    if client is None:
        raise RuntimeError("several JAX processes but no coordination service client: call distributed.initialize()")
    return client


def _unique(name: str) -> str:
    return f"psynth/{next(_calls)}/{name}"


def barrier(name: str) -> None:
    """Wait until every process reaches the same named point (a no-op for one process)."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(_unique(name), int(barrier_timeout_s() * 1000))


def _put_bytes(key: str, data: bytes) -> None:
    client = _client()
    chunks = [data[i : i + _KV_CHUNK] for i in range(0, len(data), _KV_CHUNK)] or [b""]
    for i, c in enumerate(chunks):
        client.key_value_set_bytes(f"{key}/{i}", c)
    client.key_value_set(f"{key}/n", str(len(chunks)))


def _get_bytes(key: str) -> bytes:
    client, ms = _client(), int(barrier_timeout_s() * 1000)
    n = int(client.blocking_key_value_get(f"{key}/n", ms))
    return b"".join(client.blocking_key_value_get_bytes(f"{key}/{i}", ms) for i in range(n))


def allgather_objects(value: Any) -> list[Any]:
    """[value of process 0, of process 1, ...] for a JSON-able value (one per process)."""
    if jax.process_count() == 1:
        return [value]
    key = _unique("allgather")
    _put_bytes(f"{key}/{jax.process_index()}", json.dumps(value).encode())
    out = [json.loads(_get_bytes(f"{key}/{i}")) for i in range(jax.process_count())]
    barrier("allgather_read")  # every process has read: the entries can go
    _client().key_value_delete(f"{key}/{jax.process_index()}")
    return out


def broadcast_object(value: Any) -> Any:
    """Process 0's `value` on every process (a JSON-able value; the others' arguments are ignored)."""
    if jax.process_count() == 1:
        return value
    key = _unique("broadcast")
    if is_main():
        _put_bytes(key, json.dumps(value).encode())
    got = json.loads(_get_bytes(key))
    barrier("broadcast_read")
    if is_main():
        _client().key_value_delete(key)
    return got


def fetch(tree: Any) -> Any:
    """Numpy copies of the arrays of `tree` on this host, whole, whichever devices hold them.

    A global array that spans other processes' devices (a mesh over a pod) is gathered from every
    process: every process must call this at the same point with arrays of the same program, as
    for any collective."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False) for x in leaves):
        return jax.device_get(tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array laid out by `sharding` from a host value that every process holds whole.

    On a mesh over several processes each process builds only its own devices' shards (no equality
    collective, as `jax.device_put` makes, so processes that hold the same value never talk here)."""
    x = np.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`, also where a target spans other processes' devices and a
    leaf lives on this process's devices only (a value every process holds the same: a restored
    checkpoint, a seeded initialisation): the backends have no device-to-device transfer between
    hosts, so such a leaf goes through the host (`place`)."""

    def one(x: Any, sharding: jax.sharding.Sharding) -> Any:
        local = not isinstance(x, jax.Array) or x.is_fully_addressable
        if sharding.is_fully_addressable or not local:
            return jax.device_put(x, sharding)
        return place(np.asarray(x), sharding)

    return jax.tree.map(one, tree, shardings)


def spans_processes(mesh: Any) -> bool:
    """Whether `mesh` holds devices of several processes (a program on it runs on every one)."""
    return mesh is not None and bool(getattr(mesh, "is_multi_process", False))


def preemption_agreed(step: int) -> bool:
    """True on every process at the same `step` once any process got SIGTERM (multi-process only)."""
    if jax.process_count() == 1:
        return False
    return bool(multihost_utils.reached_preemption_sync_point(step))
