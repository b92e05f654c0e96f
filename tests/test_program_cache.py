"""A warm process neither traces nor compiles: traced programs (jax.export) and compiled ones are read back.

Each run is a fresh Python process using a shared cache folder, as a user's second `generate` is.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from distrifusion_jax.cache import CompileClock, cached_json

CHILD = r"""
import hashlib, json, sys
from jax import monitoring
traced = []
monitoring.register_event_time_span_listener(
    lambda ev, s, e, **kw: traced.append(kw.get("fun_name")) if ev.endswith("jaxpr_trace_duration") else None)
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_num_cpu_devices", 4)
import distrifusion_jax as dj
from distrifusion_jax.pipeline import DistriSDXLPipeline
cache, fields = sys.argv[1], json.loads(sys.argv[2])
pipe = DistriSDXLPipeline.from_pretrained(
    "demo", dj.DistriConfig(128, 128, **fields), dtype=jnp.float32, compilation_cache=cache)
out = pipe("a red circle on the left", num_inference_steps=3, output_type="np", progress=lambda i, n: None)
print("RESULT " + json.dumps({"compiled": out.timings["programs_compiled"],
    "loaded": out.timings["programs_loaded"], "traced": sorted(set(traced)),
    "image": hashlib.sha256(np.asarray(out.images).tobytes()).hexdigest()}))
"""
# the functions of our programs: denoising loop and steps, text encoders, decode (one device or row bands)
OURS = {"_run", "start", "advance", "encode", "decode", "decode_tiles", "decode_band"}


def run(cache, fields: dict) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields", [dict(devices=1), dict(devices=4, warmup_steps=1)], ids=["1 device", "2x2"]
)
def test_warm_process_traces_and_compiles_nothing(tmp_path, fields):
    cold = run(tmp_path, fields)
    warm = run(tmp_path, fields)
    print(f"cold: {cold['compiled']} compiled, traced {cold['traced'][:8]}...; warm: {warm}")
    assert cold["compiled"] > 0 and set(cold["traced"]) & OURS
    assert warm["compiled"] == 0 and warm["loaded"] > 0
    assert not set(warm["traced"]) & OURS, warm["traced"]
    assert warm["image"] == cold["image"]
    # a traced program cut short (a full disk, a killed process) is traced again, and rewritten
    files = sorted((tmp_path / "programs").glob("denoise-step*.jaxexport"))
    assert files
    size = files[0].stat().st_size
    files[0].write_bytes(files[0].read_bytes()[:100])
    again = run(tmp_path, fields)
    assert again["image"] == cold["image"] and set(again["traced"]) & OURS
    assert files[0].stat().st_size == size


def test_compile_clock_counts_this_process():
    import jax
    import jax.numpy as jnp

    unique = float(np.random.default_rng().random())  # a constant no cache has seen: XLA must compile
    clock = CompileClock()
    jax.jit(lambda x: jnp.sin(x) * unique + 0.5)(np.arange(7.0)).block_until_ready()
    split = clock.split()
    assert clock.compiled >= 1 and clock.loaded == 0 and clock.seconds > 0
    assert set(split) == {"trace", "lower", "compile"} and clock.seconds <= sum(split.values()) + 1e-9


def test_cached_json(tmp_path, monkeypatch):
    """Computed once per key where there is a cache folder, every time where there is none."""
    from distrifusion_jax import cache

    calls = []
    compute = lambda: calls.append(1) or {"a": [1, 2]}
    monkeypatch.setattr(cache, "program_folder", lambda: None)
    assert cached_json("x", "y", compute) == cached_json("x", "y", compute) == {"a": [1, 2]}
    assert len(calls) == 2
    monkeypatch.setattr(cache, "program_folder", lambda: tmp_path)
    assert cached_json("x", "y", compute) == cached_json("x", "y", compute) == {"a": [1, 2]}
    assert len(calls) == 3 and len(list(tmp_path.glob("x-*.json"))) == 1
    assert cached_json("x", "z", compute) == {"a": [1, 2]} and len(calls) == 4  # another key
