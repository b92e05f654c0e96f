"""Several processes, one mesh: `jax.distributed` set-up and moving arrays between hosts and the global mesh.

After `initialize`, `jax.devices()` lists every process's devices, so a `DistriConfig` lays its
`(cfg, patch)` mesh over all of them and the same program runs in every process (SPMD). What
changes is that an array spanning several processes is no longer fully addressable: a process can
only create and read the shards on its own devices. Hence the helpers below: `global_array` builds
an array from host data that every process holds (each places only its own slices), `to_host`
brings one back to numpy (a collective: every process must call it).

Environment variables (each a fallback for the argument of the same meaning):
`JAX_COORDINATOR_ADDRESS` (JAX reads it too), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (ours: JAX
itself only takes these from a cluster), `JAX_COORDINATOR_BIND_ADDRESS` and `JAX_LOCAL_DEVICE_IDS`
(read by JAX). Under SLURM (`srun`) or Open MPI (`mpirun`) with several tasks, what is still missing
comes from the launcher, through JAX's own cluster detection.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .errors import ConfigError, DistriFusionError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_BIND_ADDRESS = "JAX_COORDINATOR_BIND_ADDRESS"
DEFAULT_TIMEOUT_S = 300  # long enough for every host of a batch job to start and load its Python
CLUSTERS = ("slurm", "ompi")  # launchers detected from environment variables alone (no network query)
_HINT = (
    "--coordinator HOST:PORT, --num-processes N and --process-id I (or JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
)


# ---- set-up ----
def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    bind_address: Optional[str] = None,
) -> int:
    """Join this process to a multi-process run; returns the number of processes (1: nothing was done).

    Call it before any other JAX use (it must precede backend initialisation). Each value comes from
    its argument, else its environment variable, else the cluster launcher (SLURM, Open MPI) when
    this process is one of several tasks it started. With none of them, or one process, it is a
    no-op, so single-process programs can always call it. Process 0 hosts the coordinator, bound to
    `bind_address` (default: $JAX_COORDINATOR_BIND_ADDRESS, else every interface on the port of
    `coordinator_address`). A process that cannot reach the coordinator within `timeout_s` seconds
    fails with a one-line `DistriFusionError`; once connected, a run whose processes do not all
    join within the timeout is stopped by JAX itself (an abort with its own message, not an
    exception), after process 0 has printed what it waits for.
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    n = _int_setting(num_processes, ENV_NUM_PROCESSES, "num_processes")
    pid = _int_setting(process_id, ENV_PROCESS_ID, "process_id")
    if address is None and n is None and pid is None and _cluster() is None:
        return 1
    if n == 1 and pid in (None, 0):  # one process needs no coordinator
        return 1
    if None in (address, n, pid):
        address, n, pid, local_device_ids = _from_cluster(address, n, pid, local_device_ids, timeout_s)
    _validate(address, n, pid, timeout_s)
    if n == 1:
        return 1
    bind = bind_address or os.environ.get(ENV_BIND_ADDRESS) or None
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        _check_port_free(bind or f"[::]:{_split(address)[1]}")
    else:
        _wait_for_coordinator(address, n, pid, timeout_s, deadline)
    if pid == 0:
        print(f"coordinator {address}: waiting up to {timeout_s:g} s for {n} processes", file=sys.stderr)
    _start(address, n, pid, local_device_ids, max(1, int(np.ceil(deadline - time.monotonic()))), bind)
    return n


def _int_setting(value, env: str, name: str) -> Optional[int]:
    """An integer argument, else its environment variable, else None; a non-integer is a ConfigError."""
    if value is not None:
        raw, source = value, name
    elif os.environ.get(env, "").strip():
        raw, source = os.environ[env].strip(), f"${env}"
    else:
        return None
    try:
        if isinstance(raw, bool) or float(raw) != int(raw):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}={raw!r} is not an integer; pass a whole number") from None


def _cluster():
    """JAX's environment class of a launcher that started this process as one of several tasks, else None.

    Only launchers recognised from environment variables (SLURM's srun, Open MPI's mpirun): the
    others JAX knows (Cloud TPU, Kubernetes) need network queries, too slow to try on every run.
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - JAX moved it: auto-detection off, explicit values still work
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        try:
            if (
                getattr(env, "name", None) in CLUSTERS
                and env.is_env_present()
                and env.get_process_count() > 1
            ):
                return env
        except (KeyError, ValueError):  # a half-set environment: not a launcher we can use
            continue
    return None


def _from_cluster(address, n, pid, local_device_ids, timeout_s):
    """Missing values from the launcher; with none, a ConfigError naming what to pass."""
    env = _cluster()
    if env is None:
        missing = [
            name
            for name, v in (("coordinator address", address), ("number of processes", n), ("process id", pid))
            if v is None
        ]
        raise ConfigError(f"a multi-process run needs {_HINT}; missing: {', '.join(missing)}")
    if address is None:
        address = env.get_coordinator_address(
            timeout_secs=int(timeout_s), override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT")
        )
    n = env.get_process_count() if n is None else n
    pid = env.get_process_id() if pid is None else pid
    if (
        local_device_ids is None
        and not os.environ.get("JAX_LOCAL_DEVICE_IDS")
        and not _one_process_per_host(env)
    ):
        # several tasks on a host: one device each, by local rank (JAX's choice under these launchers);
        # with one task per host, it keeps all of the host's devices
        local = env.get_local_process_id()
        local_device_ids = None if local is None else [local]
    return address, n, pid, local_device_ids


def _one_process_per_host(env) -> bool:
    """Whether the launcher started exactly one task on each host (then each process uses all its devices)."""
    e = os.environ
    if env.name == "slurm":
        tasks = e.get("SLURM_STEP_NUM_TASKS", e.get("SLURM_NTASKS"))
        nodes = e.get("SLURM_STEP_NUM_NODES", e.get("SLURM_NNODES"))
        return tasks is not None and tasks == nodes
    return e.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"


def _split(address: str) -> tuple[str, int]:
    """host:port (host may be [IPv6]) -> (host without brackets, port); ConfigError when malformed."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"coordinator address {address!r} is not HOST:PORT; pass e.g. 10.0.0.1:1234 "
            "(process 0's host name or IP address and a free port)"
        )
    return host.strip("[]"), int(port)


def _validate(address: str, n: int, pid: int, timeout_s: float) -> None:
    _split(address)
    if n < 1:
        raise ConfigError(
            f"num_processes={n}: need at least 1 (the number of processes started, one per host)"
        )
    if not 0 <= pid < n:
        raise ConfigError(
            f"process_id={pid} with num_processes={n}: give each process a distinct id "
            f"0..{n - 1} (process 0 hosts the coordinator)"
        )
    if not timeout_s > 0:
        raise ConfigError(f"timeout {timeout_s!r} s: pass a positive number of seconds")


def _check_port_free(bind: str) -> None:
    """Process 0: fail now, in one line, when another program already listens on the coordinator's port."""
    host, port = _split(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host or "::", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DistriFusionError(
                f"cannot start the coordinator on {bind}: port {port} is in use; pick a free "
                "port for --coordinator (the same on every process)"
            ) from None
        # anything else (no IPv6, an address of another interface): let JAX report it


def _wait_for_coordinator(address: str, n: int, pid: int, timeout_s: float, deadline: float) -> None:
    """Processes 1..n-1: wait until the coordinator's port accepts connections, or fail in one line.

    JAX aborts the whole process (no Python exception) when its connection times out, so the
    reachability check is done here first, where the failure can be reported properly.
    """
    host, port = _split(address)
    while True:
        try:
            with socket.create_connection(
                (host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))
            ):
                return
        except socket.gaierror:
            raise DistriFusionError(
                f"coordinator address {address}: cannot resolve host {host!r}; use process 0's "
                "host name or IP address as this host sees it"
            ) from None
        except OSError:
            if time.monotonic() >= deadline:
                raise DistriFusionError(
                    f"process {pid} of {n} could not reach the coordinator at {address} within {timeout_s:g} s: "
                    f"check that process 0 is running with the same --coordinator, that the host and port are "
                    f"right and reachable from this host (firewall), and that every process got --num-processes "
                    f"{n}"
                ) from None
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _start(address, n, pid, local_device_ids, timeout_s: int, bind) -> None:
    """jax.distributed.initialize with everything resolved (JAX's own cluster detection off)."""
    try:
        jax.distributed.initialize(
            address,
            n,
            pid,
            local_device_ids=local_device_ids,
            cluster_detection_method="deactivate",
            initialization_timeout=timeout_s,
            coordinator_bind_address=bind,
        )
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "before" in first:  # JAX was used already in this process
            raise ConfigError(
                "distributed initialize must come before any other JAX use (jax.devices(), "
                "arrays, computations): call it first"
            ) from None
        raise DistriFusionError(
            f"joining the run at {address} as process {pid} of {n} failed: {first}"
        ) from None


# ---- processes and devices ----
def devices() -> list:
    """`jax.devices()`, or a one-line ConfigError naming the platform asked for when JAX cannot start it.

    JAX raises a bare AssertionError (a platform whose plugin is not installed, e.g. JAX_PLATFORMS=cuda
    with CPU-only jaxlib) or a RuntimeError (a plugin without its hardware or driver).
    """
    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:
        asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        why = (
            str(e).split(" (set JAX_PLATFORMS")[0].splitlines()[0]
            if str(e)
            else "its plugin is not installed"
        )
        if not asked:
            raise ConfigError(
                f"JAX cannot start a backend ({why}); check the accelerator's driver, or set "
                "JAX_PLATFORMS=cpu to run on the CPU"
            ) from None
        raise ConfigError(
            f"JAX_PLATFORMS={asked}: JAX cannot start {asked!r} ({why}); unset JAX_PLATFORMS (or set "
            "it to cpu) to use what this machine has, or install JAX for that platform where it "
            "exists (e.g. pip install -U 'jax[cuda12]' on a host with NVIDIA GPUs)"
        ) from None


def is_main_process() -> bool:
    """Process 0: the one that writes files and prints (always true in a single-process run)."""
    return jax.process_index() == 0


def spans_processes(devices) -> bool:
    """Whether some of `devices` belong to other processes (arrays over them are then not fully addressable)."""
    me = jax.process_index()
    return any(d.process_index != me for d in devices)


def check_local_share(devices) -> None:
    """Every process of a multi-process run must own some of the devices, or it would have nothing to run."""
    owners = {d.process_index for d in devices}
    if jax.process_index() not in owners:
        raise ConfigError(
            f"process {jax.process_index()} of {jax.process_count()} owns none of the {len(devices)} "
            "devices chosen: use every process's devices (leave devices unset) or start fewer "
            "processes"
        )


def local_device(devices):
    """The first of `devices` this process owns, else its first local device."""
    me = jax.process_index()
    return next((d for d in devices if d.process_index == me), jax.local_devices()[0])


# ---- arrays ----
def global_array(host, sharding) -> jax.Array:
    """A global array with `sharding` from `host`, the whole value, identical on every process.

    Each process places only the slices its own devices hold: no cross-process traffic and no
    equality check (`jax.device_put` of host data to a multi-process sharding compares the data
    across processes first, an all-gather of every weight). `host` may be numpy or a fully
    addressable jax array (then the slices are copied device to device).
    """
    if not isinstance(host, jax.Array):
        host = np.asarray(host)
    return jax.make_array_from_callback(tuple(host.shape), sharding, lambda index: host[index])


def place(tree, sharding):
    """Every leaf of `tree` as a global array with `sharding` (leaves already spanning processes kept, so
    values placed once, such as the weights, keep their placement and compiled programs still match)."""
    return jax.tree.map(lambda a: a if is_global(a) else global_array(a, sharding), tree)


def replicate(tree, mesh):
    """Every leaf of `tree` replicated on all devices of `mesh`."""
    return place(tree, NamedSharding(mesh, PartitionSpec()))


def is_global(x) -> bool:
    """A jax array with shards in other processes."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(x):
    """numpy value of `x` on every process.

    An array spanning processes is gathered (`process_allgather`); every process must call this
    for it then, in the same order, as for any collective. Otherwise it is `np.asarray(x)`.
    """
    if is_global(x):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def local_copy(tree, device):
    """Leaves on `device`: a replicated global leaf contributes this process's own replica (no traffic)."""

    def one(a):
        if is_global(a):
            if not a.sharding.is_fully_replicated:
                a = to_host(a)
            else:
                a = a.addressable_data(0)
        return jax.device_put(a, device)

    return jax.tree.map(one, tree)
