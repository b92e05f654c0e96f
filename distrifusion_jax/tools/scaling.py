"""Scaling evidence on one device: a displaced step's per-device compute, and projected N-device latency.

    python -m distrifusion_jax.tools.scaling measure [--sizes 1024 2048] [--device-counts 2 4 8] [--json measured.json]
    python -m distrifusion_jax.tools.scaling project measured.json comm.json   # comm.json: tools.comm_report --json
    python -m distrifusion_jax.tools.scaling estimate measured.json comm.json --sizes 3840 [--check 1024:2048]

`measure` times, on the one device it runs on, (a) the single-device UNet step with the CFG batch of 2
and (b) for N devices with the CFG split (N/2 row bands, batch 1 per device) the computation one
device performs in a displaced step: its band against the whole image's stale K/V, with every
collective left out (tools/emulate.py's BandPlan). `project` combines (b) with the bytes each device
exchanges per displaced step (from the communication report) into projected step latencies at
published interconnect bandwidths: with overlap max(compute, comm), without compute + comm. These
are projections, not measurements of a multi-GPU run.

`estimate` extends a measurement to sizes that were not timed (3840^2): for each N it takes XLA's
FLOP count of the same programs at the new size (cost analysis of the lowered program, abstract
weights, no device needed) and divides by the throughput (FLOP/s) measured for that N at the largest
timed size. Larger bands keep a GPU at least as busy, so this tends to overestimate the time
(`--check 1024:2048` estimates a measured size from a smaller one to show the error). Estimates are
labelled as such.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..flags import FLAGS, OneLineErrorParser, add_distri_flags, run_command
from ..models.presets import sdxl_base
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..nn.attention import IMPLEMENTATIONS
from .abstract import SDXL_TIME_IDS, TEXT_TOKENS, abstract_weights, flops
from .command import add_device_counts, parser, positive
from .emulate import BandPlan, band_step
from .fmt import write_json
from .timing import first_call, random_params, timed

# one direction of the per-GPU interconnect (bytes/s), as published by the vendors
BANDWIDTHS = {
    "A100 NVLink3 (300 GB/s)": 300e9,
    "H100 NVLink4 (450 GB/s)": 450e9,
    "PCIe 4.0 x16 (32 GB/s)": 32e9,
}
DTYPE = jnp.bfloat16
DISTRI_FLAGS = (
    "mode",
    "stale_kv",
    "stale_kv_dtype",
)  # the displaced step's; the layout is N/2 bands x CFG split


# ---- what one device computes ----
def step_shapes(config: UNetConfig, size: int, n: int) -> tuple:
    """(bands, (x, t, ehs, added) as ShapeDtypeStructs) of one device's step on n devices: the whole image
    with the CFG batch of 2 for n = 1, else one of n/2 bands with batch 1 (the CFG split)."""
    bands, batch = (1, 2) if n == 1 else (n // 2, 1)
    s, h = jax.ShapeDtypeStruct, size // 8
    text_dim = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
    added = {"text_embeds": s((batch, text_dim), DTYPE), "time_ids": s((batch, SDXL_TIME_IDS), jnp.float32)}
    return bands, (
        s((batch, h // bands, h, 4), jnp.float32),
        s((batch,), jnp.float32),
        s((batch, TEXT_TOKENS, config.cross_attention_dim[0]), DTYPE),
        added,
    )


def step_program(unet, params, size: int, n: int, args) -> tuple:
    """(jitted fn, its arguments as ShapeDtypeStructs): the plain UNet step for one band per device group,
    else one band's displaced step with the stale state as an input."""
    bands, inputs = step_shapes(unet.config, size, n)
    if bands == 1:
        return jax.jit(lambda p, *a: unet.apply({"params": p}, *a)), (params,) + inputs
    apply, state_shapes = band_step(unet, bands, args.mode, args.stale_kv, args.stale_kv_dtype)
    return jax.jit(apply), (params, state_shapes(params, *inputs)) + inputs


def step_flops(config: UNetConfig, size: int, n: int, args) -> float:
    """XLA's FLOPs of what one device computes per step (abstract weights, nothing compiled)."""
    unet = UNet2DConditionModel(config, dtype=DTYPE, param_dtype=DTYPE)
    fn, fargs = step_program(unet, abstract_weights(unet, DTYPE), size, n, args)
    return flops(fn.lower(*fargs))


def zeros(tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


# ---- measure ----
def measure(args) -> dict:
    config = unet_config(args)
    base = UNet2DConditionModel(config, dtype=DTYPE, param_dtype=DTYPE, attention_impl=args.attention)
    params = jax.block_until_ready(random_params(base, DTYPE))
    dev = jax.devices()[0]
    out = {
        "device": dev.device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "attention": args.attention,
        "mode": args.mode,
        "rows": [],
    }
    for size in args.sizes:
        for n in [1] + list(args.device_counts):
            fn, (_, *state, x, t, ehs, added) = step_program(base, params, size, n, args)
            # zeros for the state and inputs, timestep 500: the cost does not depend on the values
            fargs = (
                params,
                *zeros(state),
                zeros(x),
                jnp.full(t.shape, 500.0, t.dtype),
                zeros(ehs),
                zeros(added),
            )
            call = lambda: fn(*fargs).block_until_ready()
            _, compile_s = first_call(call)
            r = timed(call, args.repeats)
            bands, batch = (1, 2) if n == 1 else (n // 2, 1)
            out["rows"].append(dict(size=size, devices=n, bands=bands, batch=batch, compile_s=compile_s, **r))
            if args.json:  # after every row, so a run cut short still leaves its measurements
                write_json(args.json, out, indent=2)
            print(
                f"  {size}^2 N={n} ({bands} band(s), batch {batch}): {1e3 * r['median_s']:.2f} ms "
                f"(min {1e3 * r['min_s']:.2f}, max {1e3 * r['max_s']:.2f}), compile {compile_s:.1f} s",
                flush=True,
            )
    return out


# ---- project and estimate ----
def read_inputs(args) -> tuple:
    """(measured report, {(size, N): median s}, {(size, N): bytes received per displaced step})."""
    with open(args.measured) as f:
        measured = json.load(f)
    with open(args.comm) as f:
        comm = json.load(f)
    rows = comm["rows"] if isinstance(comm, dict) and "rows" in comm else comm
    received = {
        (r["height"], r["devices"]): r["ours"]["received"]["total"]
        for r in rows
        if r.get("cfg_split", True) and "ours" in r
    }
    return measured, {(r["size"], r["devices"]): r["median_s"] for r in measured["rows"]}, received


def bandwidth_cells(compute: float, comm_bytes: float, single: float) -> list:
    """Per interconnect: overlapped max(compute, comm) / serial compute + comm (ms), overlapped speedup."""
    cells = []
    for bw in BANDWIDTHS.values():
        c = comm_bytes / bw
        cells.append(
            f"{1e3 * max(compute, c):8.1f} / {1e3 * (compute + c):8.1f} ms ({single / max(compute, c):.1f}x)"
        )
    return cells


def project(args) -> None:
    measured, by, received = read_inputs(args)
    print(
        f"Projected per-step latency of a displaced step (PROJECTION; compute measured on one "
        f"{measured['device']}, {measured['date']}; communication from the comm report)"
    )
    head = " ".join(f"{name:>28}" for name in BANDWIDTHS)
    print(f"{'size':>6} {'N':>2} {'1-dev step':>11} {'1/N of it':>10} {'band compute':>12}  {head}")
    for (size, n), compute in sorted(by.items()):
        if n == 1:
            continue
        single = by[(size, 1)]
        cells = bandwidth_cells(compute, received.get((size, n), 0), single)
        print(
            f"{size:>6} {n:>2} {1e3 * single:9.1f}ms {1e3 * single / n:8.1f}ms {1e3 * compute:10.1f}ms  "
            + " ".join(f"{cell:>28}" for cell in cells)
        )
    print(
        "cells: overlapped max(compute, comm) / serial compute + comm, and the overlapped speedup vs 1 device"
    )


def estimate(args) -> dict:
    config = unet_config(args)
    measured, by, received = read_inputs(args)
    counts = sorted({n for _, n in by})
    pairs = [tuple(int(v) for v in c.split(":")) for c in args.check] + [
        (max(sz for sz, _ in by), size) for size in args.sizes
    ]
    out = {"measured": args.measured, "device": measured["device"], "rows": []}
    print(
        f"ESTIMATES from XLA FLOP counts and the throughput measured on one {measured['device']} "
        f"({measured['date']}); communication from the comm report"
    )
    for ref, size in pairs:
        counted = {n: (step_flops(config, ref, n, args), step_flops(config, size, n, args)) for n in counts}
        est = {n: by[(ref, n)] * f_new / f_ref for n, (f_ref, f_new) in counted.items()}
        for n in counts:
            row = {
                "size": size,
                "from_size": ref,
                "devices": n,
                "flops": counted[n][1],
                "tflops_per_s_at_from_size": counted[n][0] / by[(ref, n)] / 1e12,
                "estimated_s": est[n],
                "measured_s": by.get((size, n)),
            }
            if n > 1:
                for name, bw in BANDWIDTHS.items():
                    c = received.get((size, n), 0) / bw
                    row[name] = {"overlap_s": max(est[n], c), "serial_s": est[n] + c}
            cells = bandwidth_cells(est[n], received.get((size, n), 0), est[1]) if n > 1 else []
            out["rows"].append(row)
            got = f", measured {1e3 * row['measured_s']:.1f} ms" if row["measured_s"] else ""
            print(
                f"{size}^2 N={n} (from {ref}^2): {counted[n][1] / 1e12:7.1f} TFLOP, estimated "
                f"{1e3 * est[n]:8.1f} ms{got}  " + "  ".join(cells),
                flush=True,
            )
    print("cells: " + ", ".join(BANDWIDTHS) + ": overlapped max(compute, comm) / serial, speedup vs 1 device")
    if args.json:
        write_json(args.json, out)
    return out


# ---- command line ----
def unet_config(args) -> UNetConfig:
    config = sdxl_base() if args.config is None else UNetConfig.from_json(args.config)
    if config.addition_embed_type != "text_time":
        raise ConfigError(f"--config {args.config}: the scaling tool needs SDXL's text_time conditioning")
    return config


def check(args) -> None:
    """Bad input as one line, before any weight: the mode (emulated bands) and the device counts."""
    BandPlan(mode=args.mode, stale_kv=args.stale_kv, stale_kv_dtype=args.stale_kv_dtype)
    odd = [n for n in getattr(args, "device_counts", ()) if n % 2]
    if odd:
        raise ConfigError(
            f"--device-counts {' '.join(map(str, odd))}: the CFG split needs an even device count"
        )


def run(args):
    check(args)
    return args.func(args)


def build_parser():
    p = parser(__doc__, "scaling")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineErrorParser)
    skip = set(FLAGS) - set(DISTRI_FLAGS)
    m = sub.add_parser("measure", help="time one device's step for 1 and N devices (emulated bands)")
    m.add_argument(
        "--sizes", type=positive, nargs="+", default=[1024, 2048], help="square image sizes in pixels"
    )
    add_device_counts(m, [2, 4, 8], "even device counts (CFG split: N/2 bands)")
    add_distri_flags(m, skip=skip)
    m.add_argument(
        "--attention",
        default="cudnn",
        choices=[i for i in IMPLEMENTATIONS if i],
        help="attention implementation (default cudnn; xla or chunked on a CPU)",
    )
    m.add_argument("--repeats", type=positive, default=5)
    m.add_argument(
        "--config", default=None, help="a UNet config.json with text_time conditioning (default: SDXL)"
    )
    m.add_argument("--json", default=None)
    m.set_defaults(func=measure)
    q = sub.add_parser("project", help="projected latencies from a measurement and a comm report")
    q.add_argument("measured")
    q.add_argument("comm")
    q.set_defaults(func=project, mode="corrected_async_gn", stale_kv="kv", stale_kv_dtype=None)
    e = sub.add_parser("estimate", help="extend a measurement to untimed sizes by FLOP counts (an estimate)")
    e.add_argument("measured")
    e.add_argument("comm")
    e.add_argument("--sizes", type=positive, nargs="+", default=[3840])
    e.add_argument(
        "--check",
        nargs="*",
        default=[],
        metavar="FROM:TO",
        help="also estimate a measured size from a smaller one, e.g. 1024:2048, to show the error",
    )
    add_distri_flags(e, skip=skip)
    e.add_argument("--config", default=None)
    e.add_argument("--json", default=None)
    e.set_defaults(func=estimate)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
