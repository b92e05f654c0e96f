"""Scaling evidence on one device: a displaced step's per-device compute, and projected N-device latency.

    python examples/scaling.py measure [--sizes 1024 2048] [--devices 2 4 8] [--json measured.json]
    python examples/scaling.py project measured.json comm.json      # comm.json: examples/comm_report.py --json
    python examples/scaling.py estimate measured.json comm.json --sizes 3840 [--check 1024:2048]

`measure` times, on the one device it runs on, (a) the single-device UNet step with the CFG batch of 2
and (b) for N devices with the CFG split (N/2 row bands, batch 1 per device) the computation one
device performs in a displaced step: its band against the whole image's stale K/V, with every
collective left out (`PatchPlan(emulate=bands)`). `project` combines (b) with the bytes each device
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

import argparse
import json
import sys
import time

# one direction of the per-GPU interconnect (bytes/s), as published by the vendors
BANDWIDTHS = {"A100 NVLink3 (300 GB/s)": 300e9, "H100 NVLink4 (450 GB/s)": 450e9,
              "PCIe 4.0 x16 (32 GB/s)": 32e9}


def measure(args):
    import jax
    import jax.numpy as jnp

    import distrifusion_jax as dj
    from benchmark_unet import random_params, timed  # examples/benchmark_unet.py, beside this file
    from distrifusion_jax.parallel import STALE, PatchPlan

    config = dj.sdxl_base() if args.config is None else dj.UNetConfig.from_json(args.config)
    dtype = jnp.bfloat16
    base = dj.UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype, attention_impl=args.attention)
    params = jax.block_until_ready(random_params(base, dtype))
    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "attention": args.attention, "rows": []}
    for size in args.sizes:
        h = size // 8
        for n in [1] + list(args.devices):
            bands, batch = (1, 2) if n == 1 else (n // 2, 1)
            x = jnp.zeros((batch, h // bands, h, 4), jnp.float32)
            ehs = jnp.zeros((batch, 77, config.cross_attention_dim[0]), dtype)
            text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, text_dim), dtype), "time_ids": jnp.zeros((batch, 6), jnp.float32)}
            t = jnp.full((batch,), 500.0)
            if bands == 1:
                step = jax.jit(lambda p, x: base.apply({"params": p}, x, t, ehs, added))
                fn = lambda: step(params, x).block_until_ready()
            else:
                unet = base.clone(parallel=PatchPlan("displaced", args.mode, emulate=bands))
                shapes = jax.eval_shape(lambda: unet.apply({"params": params}, x, t, ehs, added, mutable=[STALE])[1])
                stale = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                step = jax.jit(lambda p, s, x: unet.apply({"params": p, **s}, x, t, ehs, added, mutable=[STALE])[0])
                fn = lambda: step(params, stale, x).block_until_ready()
            t0 = time.perf_counter()
            fn()
            compile_s = time.perf_counter() - t0
            r = timed(fn, args.repeats)
            row = dict(size=size, devices=n, bands=bands, batch=batch, compile_s=compile_s, **r)
            out["rows"].append(row)
            if args.json:  # after every row, so a run cut short still leaves its measurements
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=2)
            print(f"  {size}^2 N={n} ({bands} band(s), batch {batch}): {1e3 * r['median_s']:.2f} ms "
                  f"(min {1e3 * r['min_s']:.2f}, max {1e3 * r['max_s']:.2f}), compile {compile_s:.1f} s", flush=True)


def project(args):
    measured = json.load(open(args.measured))
    comm = json.load(open(args.comm))
    rows = comm["rows"] if isinstance(comm, dict) and "rows" in comm else comm
    received = {(r["height"], r["devices"]): r["ours"]["received"]["total"] for r in rows
                if r.get("cfg_split", True) and "ours" in r}
    by = {(r["size"], r["devices"]): r["median_s"] for r in measured["rows"]}
    print(f"Projected per-step latency of a displaced step (PROJECTION; compute measured on one "
          f"{measured['device']}, {measured['date']}; communication from the comm report)")
    head = " ".join(f"{name:>28}" for name in BANDWIDTHS)
    print(f"{'size':>6} {'N':>2} {'1-dev step':>11} {'1/N of it':>10} {'band compute':>12}  {head}")
    for (size, n), compute in sorted(by.items()):
        if n == 1:
            continue
        single = by[(size, 1)]
        comm_bytes = received.get((size, n), 0)
        cells = []
        for bw in BANDWIDTHS.values():
            c = comm_bytes / bw
            cells.append(f"{1e3 * max(compute, c):8.1f} / {1e3 * (compute + c):8.1f} ms ({single / max(compute, c):.1f}x)")
        print(f"{size:>6} {n:>2} {1e3 * single:9.1f}ms {1e3 * single / n:8.1f}ms {1e3 * compute:10.1f}ms  "
              + " ".join(f"{cell:>28}" for cell in cells))
    print("cells: overlapped max(compute, comm) / serial compute + comm, and the overlapped speedup vs 1 device")


def step_flops(config, size: int, n: int, mode: str) -> float:
    """XLA's FLOPs of what one device computes per step: the 1-device step (CFG batch 2) for n = 1,
    else one of n/2 bands (batch 1) of a displaced step against the whole image's stale K/V."""
    import jax
    import jax.numpy as jnp

    import distrifusion_jax as dj
    from distrifusion_jax.parallel import STALE, PatchPlan

    dtype, s = jnp.bfloat16, jax.ShapeDtypeStruct
    base = dj.UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda a: s(a.shape, dtype), base.abstract_params())
    h = size // 8
    bands, batch = (1, 2) if n == 1 else (n // 2, 1)
    x = s((batch, h // bands, h, 4), jnp.float32)
    ehs = s((batch, 77, config.cross_attention_dim[0]), dtype)
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": s((batch, text_dim), dtype), "time_ids": s((batch, 6), jnp.float32)}
    t = s((batch,), jnp.float32)
    if bands == 1:
        lowered = jax.jit(lambda p, x, t, e, a: base.apply({"params": p}, x, t, e, a)).lower(params, x, t, ehs, added)
    else:
        unet = base.clone(parallel=PatchPlan("displaced", mode, emulate=bands))
        apply = lambda p, st, x, t, e, a: unet.apply({"params": p, **st}, x, t, e, a, mutable=[STALE])
        state = jax.eval_shape(lambda p, x, t, e, a: apply(p, {}, x, t, e, a)[1], params, x, t, ehs, added)
        lowered = jax.jit(lambda *a: apply(*a)[0]).lower(params, state, x, t, ehs, added)
    return float(lowered.cost_analysis()["flops"])


def estimate(args):
    import distrifusion_jax as dj

    config = dj.sdxl_base() if args.config is None else dj.UNetConfig.from_json(args.config)
    measured = json.load(open(args.measured))
    by = {(r["size"], r["devices"]): r["median_s"] for r in measured["rows"]}
    comm = json.load(open(args.comm))
    rows = comm["rows"] if isinstance(comm, dict) and "rows" in comm else comm
    received = {(r["height"], r["devices"]): r["ours"]["received"]["total"] for r in rows
                if r.get("cfg_split", True) and "ours" in r}
    counts = sorted({n for _, n in by})
    pairs = [tuple(int(v) for v in c.split(":")) for c in args.check] + [
        (max(sz for sz, _ in by), size) for size in args.sizes]
    out = {"measured": args.measured, "device": measured["device"], "rows": []}
    print(f"ESTIMATES from XLA FLOP counts and the throughput measured on one {measured['device']} "
          f"({measured['date']}); communication from the comm report")
    for ref, size in pairs:
        flops = {n: (step_flops(config, ref, n, args.mode), step_flops(config, size, n, args.mode)) for n in counts}
        est = {n: by[(ref, n)] * f_new / f_ref for n, (f_ref, f_new) in flops.items()}
        for n in counts:
            row = {"size": size, "from_size": ref, "devices": n, "flops": flops[n][1],
                   "tflops_per_s_at_from_size": flops[n][0] / by[(ref, n)] / 1e12, "estimated_s": est[n],
                   "measured_s": by.get((size, n))}
            cells = []
            if n > 1:
                for name, bw in BANDWIDTHS.items():
                    c = received.get((size, n), 0) / bw
                    row[name] = {"overlap_s": max(est[n], c), "serial_s": est[n] + c}
                    cells.append(f"{1e3 * max(est[n], c):8.1f} / {1e3 * (est[n] + c):8.1f} ms "
                                 f"({est[1] / max(est[n], c):.1f}x)")
            out["rows"].append(row)
            got = f", measured {1e3 * row['measured_s']:.1f} ms" if row["measured_s"] else ""
            print(f"{size}^2 N={n} (from {ref}^2): {flops[n][1] / 1e12:7.1f} TFLOP, estimated "
                  f"{1e3 * est[n]:8.1f} ms{got}  " + "  ".join(cells), flush=True)
    print("cells: " + ", ".join(BANDWIDTHS) + ": overlapped max(compute, comm) / serial, speedup vs 1 device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    m.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8])
    m.add_argument("--mode", default="corrected_async_gn")
    m.add_argument("--attention", default="cudnn", help="attention implementation (default cudnn; 'xla' on CPU)")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--config", default=None, help="a UNet config.json with text_time conditioning (default: SDXL)")
    m.add_argument("--json", default=None)
    m.set_defaults(func=measure)
    q = sub.add_parser("project")
    q.add_argument("measured")
    q.add_argument("comm")
    q.set_defaults(func=project)
    e = sub.add_parser("estimate", help="extend a measurement to untimed sizes by FLOP counts (an estimate)")
    e.add_argument("measured")
    e.add_argument("comm")
    e.add_argument("--sizes", type=int, nargs="+", default=[3840])
    e.add_argument("--check", nargs="*", default=[], metavar="FROM:TO",
                   help="also estimate a measured size from a smaller one, e.g. 1024:2048, to show the error")
    e.add_argument("--mode", default="corrected_async_gn")
    e.add_argument("--config", default=None)
    e.add_argument("--json", default=None)
    e.set_defaults(func=estimate)
    args = p.parse_args(argv)
    if getattr(args, "attention", None) == "xla":
        args.attention = None
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
