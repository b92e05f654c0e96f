"""Single-device UNet step: our JAX UNet vs diffusers' PyTorch UNet on the same card, same shapes.

    python examples/benchmark_unet.py [--size 1024] [--batch 2] [--dtype bfloat16] [--repeats 10]
                                      [--small] [--no-torch] [--json FILE]

Both models get random full-size SDXL weights generated in place (no download); the step is one
noise prediction for a CFG batch (2 images) at the given resolution. Each figure is the median of
`--repeats` device-synchronised runs after warm-up, measured in this one process, so ratios compare
like with like. `--small` uses a tiny SDXL-shaped config (for checking the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

import distrifusion_jax as dj
from distrifusion_jax.benchmark import random_params, timed

SDXL_STEP_TFLOPS = 13.5  # two UNet forwards at 1024^2 (CFG batch 2), from the DistriFusion paper


def jax_step(config, size, batch, dtype, repeats, impls):
    unet0 = dj.UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    t0 = time.perf_counter()
    params = jax.block_until_ready(random_params(unet0, dtype))
    print(f"  random params on {jax.devices()[0].device_kind}: {time.perf_counter() - t0:.1f} s", flush=True)
    h = size // 8
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, 4)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((batch, 77, config.cross_attention_dim[0])), dtype)
    added = None
    if config.addition_embed_type == "text_time":
        n_ids = 6
        d = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        added = {"text_embeds": jnp.asarray(rng.standard_normal((batch, d)), dtype),
                 "time_ids": jnp.tile(jnp.asarray([[size, size, 0, 0, size, size]], jnp.float32), (batch, 1))}
    t = jnp.full((batch,), 500.0)
    results = {}
    for impl in impls:
        unet = unet0.clone(attention_impl=impl)
        step = jax.jit(lambda p, x, t, e, a, unet=unet: unet.apply({"params": p}, x, t, e, a))
        try:
            t0 = time.perf_counter()
            compiled = step.lower(params, x, t, ehs, added).compile()
            compile_s = time.perf_counter() - t0
            out = compiled(params, x, t, ehs, added)
            finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
            r = timed(lambda: compiled(params, x, t, ehs, added).block_until_ready(), repeats)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            r.update(compile_s=compile_s, finite=finite, xla_flops=float(cost.get("flops", 0.0)) if cost else None)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. no cuDNN attention on this platform)
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        results[f"jax[{impl or 'default'}]"] = r
        print(f"  jax attention={impl or 'default'}: {r}", flush=True)
    return results, (unet0, params, x, ehs, added)


def jax_loop(unet, params, x, ehs, added, steps, impl, repeats):
    """The whole single-device DDIM loop (CFG 5), jitted, as `make_denoise_fn` runs it."""
    size = 8 * x.shape[1]
    sched = dj.make_scheduler("ddim", json.loads(resources.files("distrifusion_jax").joinpath(
        "configs/sdxl-base-1.0/scheduler/scheduler_config.json").read_text()))
    denoise = dj.make_denoise_fn(unet.clone(attention_impl=impl), dj.DistriConfig(size, size, devices=1), sched,
                                 num_inference_steps=steps, guidance_scale=5.0)
    lat = x[: x.shape[0] // 2]
    t0 = time.perf_counter()
    denoise(params, lat, ehs, added).block_until_ready()
    first = time.perf_counter() - t0
    r = timed(lambda: denoise(params, lat, ehs, added).block_until_ready(), repeats, warmup=1)
    r.update(steps=steps, first_call_s=first, per_step_ms=1e3 * r["median_s"] / steps)
    print(f"  jax {steps}-step DDIM loop attention={impl or 'default'}: {r}", flush=True)
    return {f"jax_loop{steps}[{impl or 'default'}]": r}


def torch_step(raw_config, size, batch, dtype_name, repeats):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    t0 = time.perf_counter()
    with torch.device(device):
        model = TorchUNet.from_config(raw_config).to(tdtype).eval()
    print(f"  torch model on {device}: {time.perf_counter() - t0:.1f} s", flush=True)
    h = size // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, h, h, device=device, dtype=tdtype, generator=g)
    ehs = torch.randn(batch, 77, raw_config["cross_attention_dim"], device=device, dtype=tdtype, generator=g)
    kwargs = {}
    if raw_config.get("addition_embed_type") == "text_time":
        d = raw_config["projection_class_embeddings_input_dim"] - 6 * raw_config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, d, device=device, dtype=tdtype, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=tdtype)}
    t = torch.full((batch,), 500.0, device=device)

    def run():
        with torch.no_grad():
            model(x, t, ehs, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    r = timed(run, repeats)
    r.update(torch=torch.__version__, attention="SDPA (diffusers default AttnProcessor2_0)")
    print(f"  torch eager: {r}", flush=True)
    return {"diffusers[eager]": r}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny SDXL-shaped config (script check on CPU)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--impls", default="default,cudnn", help="attention implementations to try")
    p.add_argument("--loop-steps", type=int, default=0, help="also time the whole jitted DDIM loop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    if args.small:
        raw = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "attention_head_dim": [2, 4],
               "block_out_channels": [32, 64], "cross_attention_dim": 32, "layers_per_block": 1,
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
               "projection_class_embeddings_input_dim": 16 + 6 * 8, "transformer_layers_per_block": [1, 2],
               "use_linear_projection": True}
    else:
        raw = json.loads(resources.files("distrifusion_jax").joinpath(
            "configs/sdxl-base-1.0/unet/config.json").read_text())
    config = dj.UNetConfig.from_dict(raw)
    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[args.dtype]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}, {args.size}^2, batch {args.batch}, "
          f"{args.dtype}", flush=True)
    impls = [None if i == "default" else i for i in args.impls.split(",")]
    results = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, "size": args.size,
               "batch": args.batch, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
               "model": "tiny" if args.small else "sdxl-base-1.0 UNet (random weights)"}
    step_results, (unet, params, x, ehs, added) = jax_step(config, args.size, args.batch, dtype, args.repeats, impls)
    results.update(step_results)
    if args.loop_steps:
        results.update(jax_loop(unet, params, x, ehs, added, args.loop_steps, impls[-1], max(3, args.repeats // 3)))
    if not args.no_torch:
        try:
            results.update(torch_step(raw, args.size, args.batch, args.dtype, args.repeats))
        except Exception as e:  # noqa: BLE001
            results["diffusers[eager]"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"  torch failed: {results['diffusers[eager]']}", flush=True)

    print("\nmedian step latency (device-synchronised, after warm-up):")
    scale = (args.size / 1024) ** 2 * args.batch / 2  # rough: conv FLOPs scale with pixels, attention faster
    for name, r in results.items():
        if isinstance(r, dict) and "median_s" in r and "steps" not in r:
            tflops = SDXL_STEP_TFLOPS * scale / r["median_s"] if not args.small else float("nan")
            print(f"  {name:<18} {1e3 * r['median_s']:8.2f} ms  (min {1e3 * r['min_s']:.2f}, max "
                  f"{1e3 * r['max_s']:.2f})  ~{tflops:.0f} TFLOP/s" + (
                      f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
