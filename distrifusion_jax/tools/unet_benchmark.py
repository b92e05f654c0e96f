"""Single-device UNet step: our JAX UNet vs diffusers' PyTorch UNet on the same card, same shapes.

    python -m distrifusion_jax.tools.unet_benchmark [--size 1024] [--batch 2] [--dtype bfloat16] [--repeats 10]
                                                    [--small] [--no-torch] [--json FILE]

Both models get random full-size SDXL weights generated in place (no download); the step is one
noise prediction for a CFG batch (2 images) at the given resolution. Each figure is the median of
`--repeats` device-synchronised runs after warm-up, measured in this one process, so ratios compare
like with like. `--small` uses the small-sdxl preset's UNet (for checking the tool on a CPU).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import DTYPE_NAMES, DistriConfig
from ..denoise import make_denoise_fn
from ..flags import run_command
from ..models.presets import preset_dict, scheduler_preset
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..schedulers import make_scheduler
from .abstract import SDXL_TIME_IDS, TEXT_TOKENS
from .command import parser, positive
from .fmt import write_json
from .timing import first_call, random_params, timed

SDXL_STEP_TFLOPS = 13.5  # two UNet forwards at 1024^2 (CFG batch 2), from the DistriFusion paper
SMALL = "small-sdxl"  # the preset of --small


def _error(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def jax_inputs(config: UNetConfig, size: int, batch: int, dtype) -> tuple:
    """(x, t, ehs, added): random latents and prompt embeddings, SDXL's six time ids, timestep 500."""
    h, rng = size // 8, np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, 4)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((batch, TEXT_TOKENS, config.cross_attention_dim[0])), dtype)
    added = None
    if config.addition_embed_type == "text_time":
        d = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
        added = {
            "text_embeds": jnp.asarray(rng.standard_normal((batch, d)), dtype),
            "time_ids": jnp.tile(jnp.asarray([[size, size, 0, 0, size, size]], jnp.float32), (batch, 1)),
        }
    return x, jnp.full((batch,), 500.0), ehs, added


def time_step(unet, params, inputs, repeats: int) -> dict:
    """Compile, check and time one jitted noise prediction."""
    step = jax.jit(lambda p, *a: unet.apply({"params": p}, *a))
    compiled, compile_s = first_call(lambda: step.lower(params, *inputs).compile())
    finite = bool(jnp.isfinite(compiled(params, *inputs).astype(jnp.float32)).all())
    r = timed(lambda: compiled(params, *inputs).block_until_ready(), repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    r.update(compile_s=compile_s, finite=finite, xla_flops=float(cost.get("flops", 0.0)) if cost else None)
    return r


def jax_step(config, size, batch, dtype, repeats, impls):
    unet0 = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    params, seconds = first_call(lambda: jax.block_until_ready(random_params(unet0, dtype)))
    print(f"  random params on {jax.devices()[0].device_kind}: {seconds:.1f} s", flush=True)
    inputs = jax_inputs(config, size, batch, dtype)
    results = {}
    for impl in impls:
        try:
            r = time_step(unet0.clone(attention_impl=impl), params, inputs, repeats)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. no cuDNN attention on this platform)
            r = _error(e)
        results[f"jax[{impl or 'default'}]"] = r
        print(f"  jax attention={impl or 'default'}: {r}", flush=True)
    return results, (unet0, params, inputs)


def jax_loop(unet, params, inputs, steps, impl, repeats):
    """The whole single-device DDIM loop (CFG 5), jitted, as `make_denoise_fn` runs it."""
    x, _, ehs, added = inputs
    size = 8 * x.shape[1]
    denoise = make_denoise_fn(
        unet.clone(attention_impl=impl),
        DistriConfig(size, size, devices=1),
        make_scheduler("ddim", scheduler_preset()),
        num_inference_steps=steps,
        guidance_scale=5.0,
    )
    lat = x[: x.shape[0] // 2]
    call = lambda: denoise(params, lat, ehs, added).block_until_ready()
    _, first = first_call(call)
    r = timed(call, repeats, warmup=1)
    r.update(steps=steps, first_call_s=first, per_step_ms=1e3 * r["median_s"] / steps)
    print(f"  jax {steps}-step DDIM loop attention={impl or 'default'}: {r}", flush=True)
    return {f"jax_loop{steps}[{impl or 'default'}]": r}


def torch_step(raw_config, size, batch, dtype_name, repeats):
    import torch  # optional: only this comparison needs torch and diffusers
    from diffusers import UNet2DConditionModel as TorchUNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    with torch.device(device):
        model = TorchUNet.from_config(raw_config).to(tdtype).eval()
    print(f"  torch model on {device}: {time.perf_counter() - t0:.1f} s", flush=True)
    h = size // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, h, h, device=device, dtype=tdtype, generator=g)
    ehs = torch.randn(
        batch, TEXT_TOKENS, raw_config["cross_attention_dim"], device=device, dtype=tdtype, generator=g
    )
    kwargs = {}
    if raw_config.get("addition_embed_type") == "text_time":
        d = (
            raw_config["projection_class_embeddings_input_dim"]
            - SDXL_TIME_IDS * raw_config["addition_time_embed_dim"]
        )
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, d, device=device, dtype=tdtype, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=tdtype),
        }
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


def print_summary(results: dict, args) -> None:
    print("\nmedian step latency (device-synchronised, after warm-up):")
    scale = (args.size / 1024) ** 2 * args.batch / 2  # rough: conv FLOPs scale with pixels, attention faster
    for name, r in results.items():
        if isinstance(r, dict) and "median_s" in r and "steps" not in r:
            tflops = SDXL_STEP_TFLOPS * scale / r["median_s"] if not args.small else float("nan")
            print(
                f"  {name:<18} {1e3 * r['median_s']:8.2f} ms  (min {1e3 * r['min_s']:.2f}, max "
                f"{1e3 * r['max_s']:.2f})  ~{tflops:.0f} TFLOP/s"
                + (f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else "")
            )


def run(args) -> dict:
    raw = preset_dict(SMALL if args.small else "sdxl-base-1.0", "unet")
    config, dtype, dev = UNetConfig.from_dict(raw), jnp.dtype(args.dtype), jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}, {args.size}^2, batch {args.batch}, "
        f"{args.dtype}",
        flush=True,
    )
    impls = [None if i == "default" else i for i in args.impls.split(",")]
    results = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"),
        "model": f"{SMALL} UNet" if args.small else "sdxl-base-1.0 UNet (random weights)",
    }
    step_results, (unet, params, inputs) = jax_step(config, args.size, args.batch, dtype, args.repeats, impls)
    results.update(step_results)
    if args.loop_steps:
        results.update(jax_loop(unet, params, inputs, args.loop_steps, impls[-1], max(3, args.repeats // 3)))
    if not args.no_torch:
        try:
            results.update(torch_step(raw, args.size, args.batch, args.dtype, args.repeats))
        except Exception as e:  # noqa: BLE001
            results["diffusers[eager]"] = _error(e)
            print(f"  torch failed: {results['diffusers[eager]']}", flush=True)
    print_summary(results, args)
    if args.json:
        write_json(args.json, results, indent=2)
    return results


def build_parser():
    p = parser(__doc__, "unet_benchmark")
    p.add_argument("--size", type=positive, default=1024, help="square image size in pixels")
    p.add_argument("--batch", type=positive, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--repeats", type=positive, default=10)
    p.add_argument(
        "--small", action="store_true", help=f"the {SMALL} preset's UNet (a check of the tool on a CPU)"
    )
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--impls", default="default,cudnn", help="attention implementations to try")
    p.add_argument("--loop-steps", type=int, default=0, help="also time the whole jitted DDIM loop")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
