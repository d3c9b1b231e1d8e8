"""One run over several processes (hosts), on JAX's own distributed runtime.

`jaxbp train CONFIG --coordinator HOST:PORT --num-processes P --process-id I` starts
`jax.distributed.initialize` in each of the P processes before anything touches JAX's
backend. Process 0 serves the coordinator on PORT; the others connect to HOST:PORT. After
that `jax.devices()` lists every process's devices, the data mesh spans them all
(`jaxbp.app.parallel`), and XLA's collectives cross the processes (on the CPU through gloo,
JAX's default `jax_cpu_collectives_implementation`).

JAX aborts a process (a C++ fatal error, no Python exception) when its coordinator cannot be
reached in time, so `start` looks first: a malformed or partial set of flags, an unresolvable
host, a coordinator port already in use on process 0, or (on the others) no coordinator
answering within the timeout is a one-line `RunError`. What JAX still handles alone, after
the same timeout: a coordinator that answers while some process never joins, and a process
that dies mid-run (the others stop at the next collective or at exit).

Every process runs the same program on the same run folder (orbax's multi-process
checkpoints need a folder they all see). Process 0 alone prints and writes the reports; the
others print only errors (on stderr). The steps before training can fail in one process
only (its data, its disk): `agree` runs such a step everywhere and stops every process when
any failed, instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxbp.app.experiment import RunError

DEFAULT_TIMEOUT_S = 300  # JAX's own initialization and shutdown timeouts
_POLL_S = 0.5


class Cluster(NamedTuple):
    """This process's place in a multi-process run: `coordinator` is "HOST:PORT"."""
    coordinator: str
    num_processes: int
    process_id: int
    timeout_s: int = DEFAULT_TIMEOUT_S


def host_port(coordinator: str) -> tuple[str, int]:
    """("HOST", PORT) of "HOST:PORT" ("[::1]:PORT" for an IPv6 host).

    Raises:
      RunError: not of that form, or a port outside 1..65535.
    """
    host, _, port = coordinator.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"--coordinator takes HOST:PORT (e.g. 10.0.0.1:1234), got {coordinator!r}")
    return host, int(port)


def cluster(coordinator: Optional[str], num_processes: Optional[int],
            process_id: Optional[int], timeout_s: int = DEFAULT_TIMEOUT_S
            ) -> Optional[Cluster]:
    """The checked command-line flags: None when none of the three is given.

    Raises:
      RunError: some of the three given without the others, or values out of range.
    """
    flags = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    missing = [name for name, value in flags.items() if value is None]
    if len(missing) == len(flags):
        return None
    if missing:
        raise RunError(f"--coordinator, --num-processes and --process-id go together; "
                       f"missing: {', '.join(missing)}")
    host_port(coordinator)
    if num_processes < 1:
        raise RunError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise RunError(f"--process-id must be in 0..{num_processes - 1} "
                       f"(--num-processes {num_processes}), got {process_id}")
    if timeout_s < 1:
        raise RunError(f"--coordinator-timeout must be at least 1 second, got {timeout_s}")
    return Cluster(coordinator, num_processes, process_id, timeout_s)


def _addresses(host: str, port: int) -> list:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RunError(f"cannot resolve the coordinator host {host!r}: {exc.strerror}") from None


def check_port_free(port: int) -> None:
    """Raises RunError when something on this host already listens on `port` (the
    coordinator binds every address on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            sock.bind(("", port))
        except OSError as exc:
            raise RunError(f"process 0 cannot serve the coordinator on port {port}: "
                           f"{exc.strerror} (another run's coordinator?)") from None


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Returns once a TCP connection to host:port opens; RunError after `timeout_s`."""
    addresses = _addresses(host, port)
    deadline = time.monotonic() + timeout_s
    while True:
        for family, kind, proto, _, address in addresses:
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.settimeout(max(_POLL_S, min(5.0, deadline - time.monotonic())))
                    sock.connect(address)
                    return
            except OSError:
                pass
        if time.monotonic() >= deadline:
            raise RunError(f"no coordinator answered at {host}:{port} within {timeout_s:g} s; "
                           f"start process 0 with the same --coordinator (its host's address)")
        time.sleep(_POLL_S)


def start(c: Cluster) -> None:
    """Checks that the coordinator can be served (process 0) or reached (the others), then
    `jax.distributed.initialize`. Call it before any JAX computation.

    Raises:
      RunError: see the module docstring; also when JAX's backend already started.
    """
    host, port = host_port(c.coordinator)
    _addresses(host, port)
    if c.process_id == 0:
        check_port_free(port)
    else:
        wait_for_coordinator(host, port, c.timeout_s)
    try:
        jax.distributed.initialize(c.coordinator, c.num_processes, c.process_id,
                                   initialization_timeout=c.timeout_s,
                                   shutdown_timeout_seconds=c.timeout_s)
    except RuntimeError as exc:  # called after the backend started, or a second time
        raise RunError(f"cannot start jax.distributed: {str(exc).splitlines()[0]}") from None
    silence_native_stdout()


def silence_native_stdout() -> None:
    """Points file descriptor 1 at /dev/null, keeping `sys.stdout` on a duplicate of the
    original: gloo's C++ prints "[Gloo] Rank r is connected to n peer ranks" there for every
    group of devices it connects, in every process; jaxbp's own lines (process 0's) and
    everything on stderr still show."""
    sys.stdout.flush()
    kept = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = os.fdopen(kept, "w", buffering=1, encoding=sys.stdout.encoding)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes reports and prints."""
    return jax.process_index() == 0


def agree(fn: Callable, *args, primary_only: bool = False) -> Any:
    """`fn(*args)` in every process (`primary_only`: in process 0, the others wait); when it
    raised in any process, every process raises: the failed ones their own exception, the
    others a RunError naming the failed processes. One process: just `fn(*args)`.
    """
    error, result = None, None
    try:
        if is_primary() or not primary_only:
            result = fn(*args)
    except Exception as exc:  # noqa: BLE001 -- re-raised below, after telling the others
        error = exc
    if jax.process_count() > 1:
        failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and len(failed):
            raise RunError(f"process {', '.join(map(str, failed))} stopped (its own output "
                           f"says why); process {jax.process_index()} stops too")
    if error is not None:
        raise error
    return result
