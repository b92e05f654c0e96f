"""Parallel configurations side by side: compile time, step latency, end to end, memory.

    python -m distrifusion_jax.tools.benchmark --random sdxl --steps 50 --devices 8 --json results.json  # GPUs
    python -m distrifusion_jax.tools.benchmark --random tiny --devices 8 --dtype float32 --steps 10 --overhead
    python -m distrifusion_jax.tools.benchmark --model path/to/sdxl-pipeline --height 2048 --configs single,displaced
    python -m distrifusion_jax.tools.benchmark --random sdxl --devices 8 --dry-run   # builds and lowers, no weights

Also `distrifusion-jax benchmark ...`, or from Python: `run(BenchmarkOptions(random="tiny", ...))`.
Configurations: single (one device), full_sync (patch parallelism, every step synchronous), displaced
(DistriFusion: --mode, --warmup-steps, --stale-kv ...), naive_patch (independent bands, --split-scheme)
and tensor (the tensor-parallel baseline), with speedups against single (or full_sync where single is
skipped), all measured in this one process.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from ..config import DTYPE_NAMES
from ..flags import add_distri_flags, run_command, seed_arg
from ..models.unet import UNetConfig
from ..preflight import check_steps
from ..schedulers import SCHEDULERS, make_scheduler
from .abstract import TEXT_TOKENS
from .bench_options import CONFIGS, RANDOM, SKIPPED_FLAGS, BenchmarkOptions
from .bench_overhead import dry_run, measure_overhead
from .bench_run import add_ratios, run_all
from .bench_setup import (
    build,
    check_configs,
    devices_of,
    distri_configs,
    overhead_config,
    scheduler_config,
    unet_config_of,
)
from .bench_table import format_dry_run, format_table
from .command import RawDescription, cpu_devices, describe, parser
from .fmt import write_json
from .timing import cold_compiles

__all__ = ["BenchmarkOptions", "CONFIGS", "run", "main", "add_arguments", "add_parser"]


# ---- command line ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (`distrifusion-jax benchmark`, `python -m distrifusion_jax.tools.benchmark`)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model", help="SDXL pipeline folder (or hub id) with unet/ and vae/; text encoders are not used"
    )
    src.add_argument(
        "--random",
        choices=RANDOM,
        help="random weights, no download: the full-size SDXL UNet + VAE (made on the devices), or "
        "the small-sdxl preset's UNet with the tiny-sdxl VAE (seconds on a CPU)",
    )
    add_distri_flags(p, skip=SKIPPED_FLAGS, height=None, width=None)
    describe(p, "--height", "image height in pixels (default 1024; 256 with --random tiny)")
    describe(p, "--width", "image width in pixels (default: --height)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", choices=tuple(SCHEDULERS))
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="UNet weights and compute")
    p.add_argument("--vae-dtype", default="float32", choices=DTYPE_NAMES, help="VAE decode (default float32)")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (default: all), or 'none' with --overhead",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each loop after one warm-up run")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="also time one displaced step against one naive-patch step of the same shapes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only build each configuration and lower its loop with abstract weights (no memory)",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="0 <= SEED < 2^63 (default: 0)")
    p.add_argument(
        "--json", default=None, help="also write the results to this JSON file (its folder must exist)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `benchmark` subcommand on an argparse subparsers object (the CLI's)."""
    p = sub.add_parser(
        "benchmark",
        help="compare parallel configurations: compile time, step latency, end to end, memory",
        description=__doc__,
        formatter_class=RawDescription,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = parser(__doc__, "benchmark")
    add_arguments(p)
    return run_command(p, run, argv)


# ---- the run ----
def run(options) -> dict:
    """Run the benchmark (BenchmarkOptions, or the parsed command line), print the table, write the JSON;
    returns the report dict."""
    o = options if isinstance(options, BenchmarkOptions) else BenchmarkOptions.from_args(options)
    if isinstance(o.distri.devices, int):
        cpu_devices(o.distri.devices)
    devices = devices_of(o)
    unet_config = unet_config_of(o)
    configs = distri_configs(o, devices)
    check_configs(dict(configs, overhead=overhead_config(o, devices)), unet_config)
    check_steps(make_scheduler(o.scheduler, scheduler_config(o)), o.steps, "--steps")
    report = header(o, devices, unet_config)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    if o.dry_run:
        report.update(dry_run(configs, unet_config, o, log))
        print(format_dry_run(report))
    else:
        with cold_compiles():
            report.update(measure(configs, unet_config, devices, o, log))
        print(format_table(report))
    if o.json:
        write_json(o.json, report)
        log(f"wrote {o.json}")
    return report


def header(o: BenchmarkOptions, devices, unet_config: UNetConfig) -> dict:
    """The report's settings: what was run, where."""
    dc = o.distri
    return dict(
        model=o.source,
        height=o.height,
        width=o.width,
        batch=o.batch,
        steps=o.steps,
        scheduler=o.scheduler,
        dtype=o.dtype,
        vae_dtype=o.vae_dtype,
        guidance_scale=o.guidance_scale,
        warmup_steps=dc.warmup_steps,
        mode=dc.mode,
        split_batch=dc.split_batch,
        stale_kv=dc.stale_kv,
        stale_kv_dtype=dc.stale_kv_dtype,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        platform=devices[0].platform,
        jax=jax.__version__,
        repeats=o.repeats,
        date=time.strftime("%Y-%m-%d"),
        inputs=f"random prompt embeddings [{2 * o.batch}, {TEXT_TOKENS}, "
        f"{unet_config.cross_attention_dim[0]}] and pooled embeddings (no text encoders)",
    )


def measure(configs: dict, unet_config: UNetConfig, devices, o: BenchmarkOptions, log) -> dict:
    """The measured part of the report: configurations, ratios, VAE decode, overhead."""
    log(f"making the weights and inputs on {len(devices)} {devices[0].platform} device(s)")
    setup = build(o, unet_config, devices)
    out = {"unet_parameters": sum(a.size for a in jax.tree.leaves(setup.params))}
    out["configs"], out["vae_decode_s"] = run_all(configs, setup, o, log)
    out["baseline"] = add_ratios(out["configs"])
    measured = [r for r in out["configs"].values() if "peak_source" in r]
    out["memory_source"] = measured[0]["peak_source"] if measured else "-"
    if o.overhead:
        log("timing one displaced step against one naive-patch step")
        dc = overhead_config(o, devices)
        out["overhead"] = measure_overhead(dc, setup, o) if dc else {"skipped": "needs at least 2 devices"}
    return out


if __name__ == "__main__":
    sys.exit(main())
