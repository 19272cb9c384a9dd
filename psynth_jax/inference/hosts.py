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
`preemption_agreed(step)` is True on every process at the same step once any of them received
SIGTERM (Orbax's / JAX's preemption sync point); `allgather_objects` collects small JSON-able
values from every process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Sequence, TypeVar

import jax
import numpy as np

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300


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


def barrier(name: str) -> None:
    """Wait until every process reaches the same named point (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def preemption_agreed(step: int) -> bool:
    """True on every process at the same `step` once any process got SIGTERM (multi-process only)."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(step))


def allgather_objects(value: Any) -> list[Any]:
    """[value of process 0, of process 1, ...] for a small JSON-able value (one per process)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    width = int(np.max(sizes))
    padded = np.zeros((width,), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[: int(n)]).decode()) for r, n in zip(np.asarray(rows), np.asarray(sizes).reshape(-1))]
