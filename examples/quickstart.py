"""Quick start: a small random SDXL-shaped UNet, converted, loaded and denoised with DistriFusion.

    python examples/quickstart.py [--out outputs/quickstart] [--steps 20]

No download and no torch: the "checkpoint" is written from random Flax parameters with diffusers'
key names and layouts, exactly as a real `unet/` folder of an SDXL pipeline is laid out. Without
GPUs the patch-parallel loop runs on 8 fake CPU devices (CPU timings say nothing about speedups:
the 8 fake devices share this machine's cores).
"""

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU backend; must precede any JAX work

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import distrifusion_jax as dj  # noqa: E402

# SDXL's structure (DownBlock2D then two cross-attention levels, text_time micro-conditioning with six
# time ids, deeper transformers at lower resolution) at a width that runs in seconds on a CPU.
SMALL_SDXL = dj.UNetConfig.from_dict({
    "addition_embed_type": "text_time", "addition_time_embed_dim": 16, "attention_head_dim": [2, 4, 8],
    "block_out_channels": [32, 64, 128], "cross_attention_dim": 64, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32, "projection_class_embeddings_input_dim": 32 + 6 * 16,
    "transformer_layers_per_block": [1, 2, 3], "use_linear_projection": True,
})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="where the checkpoints are written")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the denoising loop")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}: {len(jax.devices())} device(s)")

    # 1. a random checkpoint in diffusers format
    unet = dj.UNet2DConditionModel(SMALL_SDXL)
    params = unet.init_params(seed=0)
    n = sum(p.size for p in jax.tree.leaves(params))
    src = dj.save_unet_diffusers(out / "diffusers-unet", SMALL_SDXL, params)
    print(f"1. wrote a random SDXL-shaped UNet ({n:,} parameters) in diffusers format to {src}")

    # 2. convert it (same as `distrifusion-jax convert SRC DST --dtype bfloat16`)
    dst = dj.convert_unet(src, out / "flax-unet", dtype="float32", progress=False)
    print(f"2. converted it to {dst} ({', '.join(sorted(p.name for p in dst.iterdir()))})")

    # 3. load both and run one noise prediction for an SDXL-style batch [uncond; cond]
    unet, params = dj.load_unet(dst)
    _, params_src = dj.load_unet(src)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_src)))
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, 32, 48, 4)), jnp.float32)  # 256x384 image, NHWC
    context = jnp.asarray(rng.standard_normal((2, 77, 64)), jnp.float32)
    added = {"text_embeds": jnp.asarray(rng.standard_normal((2, 32)), jnp.float32),
             "time_ids": jnp.tile(jnp.array([[256.0, 384.0, 0.0, 0.0, 256.0, 384.0]]), (2, 1))}
    step = jax.jit(unet.apply)
    t0 = time.perf_counter()
    eps = step({"params": params}, latents, jnp.array([999, 999]), context, added).block_until_ready()
    t1 = time.perf_counter()
    eps = step({"params": params}, latents, jnp.array([500, 500]), context, added).block_until_ready()
    t2 = time.perf_counter()
    print(f"3. loaded both folders (identical parameters: {same}); noise prediction {tuple(eps.shape)} "
          f"{eps.dtype}, mean |eps| {float(jnp.abs(eps).mean()):.4f}, finite: {bool(jnp.isfinite(eps).all())}")
    print(f"   first call (compile + run) {t1 - t0:.2f} s, second call {1e3 * (t2 - t1):.1f} ms")

    # 4. the denoising loop: single device, then DistriFusion on every device JAX sees
    sched_config = json.loads(resources.files("distrifusion_jax").joinpath(
        "configs/sdxl-base-1.0/scheduler/scheduler_config.json").read_text())
    scheduler = dj.make_scheduler("ddim", sched_config)
    height, width = 8 * latents.shape[1], 8 * latents.shape[2]
    start = latents[:1]
    n = len(jax.devices())
    print(f"4. {args.steps} DDIM steps, guidance 5, {height}x{width} image; reference: 1 device")
    results = {}
    for label, kw in [("1 device", dict(devices=1)),
                      (f"{n} devices full_sync", dict(mode="full_sync")),
                      (f"{n} devices corrected_async_gn (DistriFusion)", dict(warmup_steps=4)),
                      (f"{n} devices naive_patch", dict(parallelism="naive_patch"))]:
        if n == 1 and label != "1 device":
            continue
        config = dj.DistriConfig(height=height, width=width, **kw)
        denoise = dj.make_denoise_fn(unet, config, scheduler, num_inference_steps=args.steps, guidance_scale=5.0)
        t0 = time.perf_counter()
        out = denoise(params, start, context, added).block_until_ready()
        t1 = time.perf_counter()
        out = denoise(params, start, context, added).block_until_ready()
        t2 = time.perf_counter()
        results[label] = np.asarray(out)
        ref = results["1 device"]
        err = np.linalg.norm(results[label] - ref) / np.linalg.norm(ref)
        layout = "x".join(map(str, config.layout(len(config.resolve_devices()))))
        print(f"   {label:<46} mesh (cfg x patch) {layout:<4} compile+run {t1 - t0:5.1f} s, run {t2 - t1:5.2f} s, "
              f"relative difference to 1 device {err:.1e}")


if __name__ == "__main__":
    main()
