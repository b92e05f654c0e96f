"""Quick start: a small random SDXL pipeline, converted and run with DistriFusion, images saved and compared.

    python examples/quickstart.py [--out outputs/quickstart] [--steps 20] [--size 256]

No download and no torch: the checkpoint is a small random SDXL-shaped pipeline (UNet, VAE, both
CLIP text encoders, the real CLIP tokenizer vocabulary) written in diffusers' layout. It is converted
to our format, then the same prompt and seed run on one device and on every device JAX sees (8 fake
CPU devices without GPUs; CPU timings say nothing about speedups: they share this machine's cores).
Random weights make abstract images; what matters is how close the parallel ones are (PSNR).
"""

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU backend; must precede any JAX work

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import distrifusion_jax as dj  # noqa: E402
from distrifusion_jax.tools.random_pipeline import write_random_pipeline  # noqa: E402


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="outputs/quickstart", help="where checkpoints and images are written"
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--size", type=int, default=256, help="image height and width (a multiple of 128)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(jax.devices())
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}: {n} device(s)")

    # 1. a small random SDXL pipeline in diffusers' layout, 2. converted to ours
    src = write_random_pipeline(out / "tiny-sdxl-diffusers", preset="tiny-sdxl", seed=0, fmt="diffusers")
    print(f"1. wrote a small random SDXL pipeline (diffusers layout) to {src}")
    dst = dj.convert_pipeline(src, out / "tiny-sdxl-converted", dtype="float32", progress=False)
    print(f"2. converted it to {dst}")

    # 3. the same prompt and seed on one device and with every parallel layout
    prompt = "a watercolor painting of a lighthouse at dawn"
    runs = [
        ("1-device", dict(devices=1)),
        (f"{n}dev-full_sync", dict(mode="full_sync")),
        (f"{n}dev-distrifusion", dict(mode="corrected_async_gn", warmup_steps=4)),
        (f"{n}dev-naive_patch", dict(parallelism="naive_patch")),
    ]
    print(f"3. '{prompt}', {args.size}x{args.size}, {args.steps} Euler steps, guidance 5, seed 0:")
    images = {}
    for name, kw in runs[: 1 if n == 1 else None]:
        config = dj.DistriConfig(height=args.size, width=args.size, **kw)
        pipe = dj.DistriSDXLPipeline.from_pretrained(dst, config, dtype=jnp.float32)
        t0 = time.perf_counter()
        result = pipe(prompt, num_inference_steps=args.steps, seed=0)
        total = time.perf_counter() - t0
        image = result.images[0]
        image.save(out / f"{name}.png")
        images[name] = np.asarray(image, np.float32) / 255
        t = result.timings
        layout = "x".join(map(str, config.layout(len(config.resolve_devices()))))
        quality = (
            "reference"
            if name == "1-device"
            else f"PSNR vs 1 device {psnr(images[name], images['1-device']):5.1f} dB"
        )
        print(
            f"   {name:<22} mesh {layout:<4} {total:5.1f} s (compile {t['compile_s']:4.1f} s, denoise "
            f"{t['denoise_s']:4.2f} s, decode {t['decode_s']:4.2f} s)  {quality}  -> {out / (name + '.png')}"
        )
    print("   (full_sync is exact; DistriFusion stays close; naive patches, with no exchange, drift apart)")


if __name__ == "__main__":
    main()
