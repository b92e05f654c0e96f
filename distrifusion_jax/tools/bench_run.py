"""The benchmark's measurements: each configuration's loop (compile, latency, memory), the VAE decode, ratios."""

from __future__ import annotations

from typing import Optional

import jax

from ..config import DistriConfig
from ..denoise import Denoiser
from .bench_options import CONFIGS, BenchmarkOptions
from .bench_setup import Setup, mesh_of, placed
from .timing import first_call, timed

# Execution order: per-device memory roughly ascending, so that each configuration raises the
# process-wide peak that `memory_stats()` reports (it cannot be reset) and its own peak is visible.
RUN_ORDER = ("naive_patch", "full_sync", "displaced", "tensor", "single")


# ---- the compiled program and its memory ----
def _program(d: Denoiser):
    """The program the Denoiser compiled on its first call (a benchmark calls it with one input shape)."""
    return next(iter(d._executables.values()))  # the Denoiser keeps no public handle on it


def peak_marks(devices) -> Optional[list]:
    """Each device's `peak_bytes_in_use` (process-wide high-water mark), or None where not reported."""
    marks = [(dev.memory_stats() or {}).get("peak_bytes_in_use") for dev in devices]
    return None if None in marks else marks


def program_bytes(compiled) -> Optional[int]:
    """Per-device bytes of a compiled program by XLA's memory analysis: arguments + outputs + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
        - m.alias_size_in_bytes
    )


def memory_entry(before: Optional[list], after: Optional[list], analysed: Optional[int]) -> dict:
    """Peak device memory of one configuration, from memory_stats where available, else the analysis.

    memory_stats' peak cannot be reset: the devices whose mark rose during this configuration give
    its peak exactly; if none rose, an earlier configuration's peak bounds it from above. The marks
    are read around the first call, so scratch memory of compilation (GPU autotuning) counts too.
    """
    if before is None or after is None:
        return {"peak_bytes": analysed, "peak_source": "memory_analysis", "program_bytes": analysed}
    rose = [a for b, a in zip(before, after) if a > b]
    return {
        "peak_bytes": max(rose or after),
        "peak_source": "memory_stats",
        "peak_exact": bool(rose),
        "program_bytes": analysed,
    }


# ---- one configuration ----
def run_loop(dc: DistriConfig, setup: Setup, o: BenchmarkOptions) -> tuple:
    """Compile, time and measure the memory of one configuration's denoising loop: (result, call)."""
    d = Denoiser(setup.unet, dc, setup.scheduler, o.steps, guidance_scale=o.guidance_scale)
    params, lat, ehs, added = placed(d, setup)
    call = lambda: jax.block_until_ready(d(params, lat, ehs, added))
    before = peak_marks(d.devices)
    _, first = first_call(call)
    compile_s = d.last_compile_s
    loop = timed(call, o.repeats, warmup=1)
    result = dict(
        devices=len(d.devices),
        mesh=mesh_of(d),
        parallelism=dc.parallelism,
        mode=dc.mode,
        warmup_steps=dc.warmup_steps,
        compile_s=compile_s,
        first_call_s=first,
        e2e_s=loop,
        step_ms={k[:-2]: 1e3 * loop[k] / o.steps for k in ("median_s", "min_s", "max_s")},
    )
    result.update(memory_entry(before, peak_marks(d.devices), program_bytes(_program(d))))
    return result, call


def make_decode(setup: Setup):
    """Final latents -> image on the first device, as the pipeline decodes (latents / scaling_factor)."""
    vae, device = setup.vae, setup.devices[0]
    decode = jax.jit(
        lambda p, z: vae.apply(
            {"params": p}, (z / vae.config.scaling_factor).astype(vae.dtype), method=vae.decode
        )
    )
    return lambda z: jax.block_until_ready(decode(setup.vae_params, jax.device_put(z, device)))


def failure(e: Exception) -> str:
    """Why a configuration was skipped, in one line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return f"does not fit in device memory ({text[:200]})"
    return f"failed: {type(e).__name__}: {text[:300]}"


def run_all(configs: dict, setup: Setup, o: BenchmarkOptions, log) -> tuple:
    """Every configuration's loop (in RUN_ORDER), then the same loops followed by the VAE decode.

    Returns ({name: result} in CONFIGS order, VAE decode timings or None).
    """
    results, calls = {}, {}
    for name in sorted(configs, key=RUN_ORDER.index):
        dc = configs[name]
        if isinstance(dc, str):
            results[name] = {"skipped": dc}
            log(f"{name}: skipped, {dc}")
            continue
        log(f"{name}: compiling and timing the {o.steps}-step loop on {len(dc.resolve_devices())} device(s)")
        try:
            results[name], calls[name] = run_loop(dc, setup, o)
        except Exception as e:  # noqa: BLE001 - one configuration failing (memory, unsupported) is reported
            results[name] = {"skipped": failure(e)}
            log(f"{name}: skipped, {results[name]['skipped']}")
    vae = None
    if calls:  # the decode runs after every loop so its activations do not mask the loops' memory peaks
        decode, latents = make_decode(setup), next(iter(calls.values()))()
        _, first = first_call(lambda: decode(latents))
        vae = dict(first_call_s=first, **timed(lambda: decode(latents), o.repeats, warmup=1))
    for name, call in calls.items():
        log(f"{name}: timing the loop followed by the VAE decode")
        results[name]["e2e_decode_s"] = timed(lambda: decode(call()), o.repeats, warmup=1)
    return {name: results[name] for name in CONFIGS if name in results}, vae


def add_ratios(results: dict) -> Optional[str]:
    """Speedups (baseline median / this one) and memory (this / baseline) vs single, else full_sync."""
    measured = [n for n in ("single", "full_sync") if "step_ms" in results.get(n, {})]
    if not measured:
        return None
    base = results[measured[0]]
    for r in results.values():
        if "step_ms" not in r:
            continue
        r["vs_baseline"] = {
            "step_speedup": base["step_ms"]["median"] / r["step_ms"]["median"],
            "e2e_decode_speedup": base["e2e_decode_s"]["median_s"] / r["e2e_decode_s"]["median_s"],
            "compile_ratio": r["compile_s"] / base["compile_s"],
        }
        if r.get("peak_bytes") and base.get("peak_bytes"):
            r["vs_baseline"]["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return measured[0]
