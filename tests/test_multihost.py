"""Multi-process runs through jax.distributed: 2 processes x 4 CPU devices on loopback equal 1 process x 8.

The workers (tests/multihost_worker.py) form one (cfg 2, patch 4) mesh over 8 global devices; this
process, which has 8 fake CPU devices (conftest), computes the same runs on its own and compares.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import multihost_worker as W
import numpy as np
import pytest

from distrifusion_jax import DistriConfig, distributed
from distrifusion_jax.errors import ConfigError, DistriFusionError
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.tools.random_pipeline import write_random_pipeline

TOLERANCE = 1e-5  # max abs difference (images in [0, 1], latents of order 10) and relative L2; the same
# program on as many devices: the latents come out bitwise equal, the decode within ~1e-6
WORKER = Path(__file__).with_name("multihost_worker.py")
SUBPROCESS_TIMEOUT_S = 240
LAUNCH_VARS = (
    "JAX_COORDINATOR",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "SLURM_",
    "OMPI_",
)


def free_port() -> int:
    """A port nobody listens on (bound to loopback and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """Ours without a launcher's variables; the workers import the installed package, nothing from tests/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}  # no launcher around us
    env.update(JAX_PLATFORMS="cpu", DISTRIFUSION_JAX_CACHE="off")
    return env


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("tiny_pipeline"), seed=0)


def reference(model) -> dict:
    """The workers' runs in this process, on its 8 devices."""
    pipe = DistriSDXLPipeline.from_pretrained(
        model, DistriConfig(height=W.HEIGHT, width=W.WIDTH), dtype=jnp.float32, compilation_cache="off"
    )
    return {name: W.generate(pipe, name) for name in W.RUNS}


def run_workers(model, out: Path, logs: Path, n: int = 2):
    """Start n workers, compute the reference meanwhile (the CPUs are shared anyway), then collect them.

    Their output goes to files, not pipes, which nobody reads while the reference runs.
    """
    port, env = free_port(), worker_env()
    files = [open(logs / f"worker{i}.log", "w+") for i in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(n), str(port), str(model), str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i, f in enumerate(files)
    ]
    try:
        ref = reference(model)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    return ref, [(p.returncode, (logs / f"worker{i}.log").read_text()) for i, p in enumerate(procs)]


def report(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("MULTIHOST ")]
    assert len(lines) == 1, log[-3000:]
    return json.loads(lines[0][len("MULTIHOST ") :])


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_pipeline, tmp_path):
    assert len(jax.devices()) == 8 and jax.process_count() == 1  # the reference: one process, 8 devices
    t0 = time.perf_counter()
    out = tmp_path / "out"
    out.mkdir()
    ref, results = run_workers(tiny_pipeline, out, tmp_path)
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"worker {i} exited {rc}:\n{log[-3000:]}"
    infos = [report(log) for _, log in results]
    for i, info in enumerate(infos):
        assert info["process_id"] == i and info["process_count"] == 2 and info["initialize"] == 2
        assert info["global_devices"] == 8 and info["local_devices"] == W.LOCAL_DEVICES
        assert info["main"] == (i == 0) and info["multi"] and info["params_global"]
    written = sorted(p.name for p in out.iterdir())
    expected = sorted(f"{name}_{kind}.npy" for name in W.RUNS for kind in ("latent", "image"))
    assert written == expected  # process 0 wrote each file once; process 1 nothing
    for name in W.RUNS:
        for kind in ("latent", "image"):
            got, want = np.load(out / f"{name}_{kind}.npy"), np.asarray(ref[name][kind])
            assert got.shape == want.shape and np.isfinite(got).all() and got.std() > 0.01
            diff = float(np.abs(got - want).max())
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            print(f"{name} {kind}: max abs diff {diff:.3g}, relative L2 {rel:.3g} (tolerance {TOLERANCE:g})")
            assert diff < TOLERANCE and rel < TOLERANCE, (name, kind, diff, rel)
    # the two runs differ (a run compared with itself would prove nothing about the mode)
    assert np.abs(np.load(out / "full_sync_image.npy") - np.load(out / "displaced_image.npy")).max() > 1e-3
    print(f"2 processes x 4 devices and the reference: {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_unreachable_coordinator_fails_fast_in_one_line(tiny_pipeline):
    """Process 1 of 2 pointed at a port where nobody listens: exit status 2 and a one-line error in seconds."""
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distrifusion_jax",
            "generate",
            "--model",
            str(tiny_pipeline),
            "--prompt",
            "x",
            "--coordinator",
            address,
            "--num-processes",
            "2",
            "--process-id",
            "1",
            "--init-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("error: ") and address in last and "within 3 s" in last and "process 0" in last
    assert "Traceback" not in r.stderr
    assert elapsed < 60
    print(f"failed in {elapsed:.1f} s: {last}")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
        (dict(coordinator_address="localhost:99999", num_processes=2, process_id=0), "is not HOST:PORT"),
        (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "distinct id 0..1"),
        (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), "need at least 1"),
        (dict(coordinator_address="localhost:1234", num_processes=2), "missing: process id"),
        (dict(num_processes="two", process_id=0), "is not an integer"),
    ],
)
def test_initialize_rejects_bad_settings_in_one_line(monkeypatch, kwargs, message):
    for key in list(os.environ):
        if key.startswith(LAUNCH_VARS):
            monkeypatch.delenv(key)
    with pytest.raises(ConfigError, match=message) as e:
        distributed.initialize(**kwargs)
    assert "\n" not in str(e.value)


def test_initialize_without_settings_is_a_no_op(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCH_VARS):
            monkeypatch.delenv(key)
    assert distributed.initialize() == 1 and distributed.initialize(num_processes=1) == 1
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="missing: coordinator address, process id"):
        distributed.initialize()
    x = np.arange(6.0).reshape(2, 3)
    assert distributed.is_main_process() and not distributed.spans_processes(jax.devices())
    assert np.array_equal(distributed.to_host(jnp.asarray(x)), x)


def test_port_in_use_is_reported_before_jax_starts(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCH_VARS):
            monkeypatch.delenv(key)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(DistriFusionError, match="port .* is in use"):
            distributed.initialize(address, 2, 0, bind_address=address)


@pytest.mark.parametrize("tasks, nodes, local_ids", [("2", "2", None), ("4", "2", [1])])
def test_slurm_supplies_what_is_missing(monkeypatch, tasks, nodes, local_ids):
    """Under srun: process 0's host from the node list; one task per host keeps all its devices."""
    for key in list(os.environ):
        if key.startswith(LAUNCH_VARS):
            monkeypatch.delenv(key)
    for key, value in dict(
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="gpu[017-018]",
        SLURM_NTASKS=tasks,
        SLURM_STEP_NUM_TASKS=tasks,
        SLURM_STEP_NUM_NODES=nodes,
        SLURM_PROCID="1",
        SLURM_LOCALID="1",
        JAX_COORDINATOR_PORT="4567",
    ).items():
        monkeypatch.setenv(key, value)
    assert distributed._cluster() is not None
    assert distributed._from_cluster(None, None, None, None, 5) == ("gpu017:4567", int(tasks), 1, local_ids)
    # explicit values win over the launcher's
    assert distributed._from_cluster("head:1", 8, None, [0], 5) == ("head:1", 8, 1, [0])
