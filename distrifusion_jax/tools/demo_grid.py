"""One prompt on one device, with DistriFusion and with naive patches on several device counts: images and PSNR.

    python -m distrifusion_jax.tools.demo_grid [--prompt TEXT] [--device-counts 2 4 8] [--steps 25]
        [--out outputs/grid.png] [--model demo]

Every run uses the same prompt, seed and scheduler; the parallel ones split the image into as many row
bands as devices (no CFG split, so 2 devices already means 2 patches). The grid shows the one-device
image, then a column per device count with DistriFusion (corrected_async_gn, warmup 4) above naive patches
(no exchange at all), each with its PSNR against the one-device image written under it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from ..config import DistriConfig
from ..errors import ConfigError
from ..flags import run_command, seed_arg
from ..pipeline import DistriSDXLPipeline
from ..preflight import read_model, resolve_model_path
from .command import add_device_counts, cpu_devices, parser, positive
from .fidelity import psnr

PROMPT = "a red circle on the left and a blue square on the right, on a yellow background"
METHODS = {
    "DistriFusion": dict(parallelism="patch", mode="corrected_async_gn", warmup_steps=4),
    "naive patches": dict(parallelism="naive_patch", split_scheme="row"),
}


@dataclasses.dataclass
class Run:
    label: str
    devices: int
    image: np.ndarray  # uint8 [H, W, 3]
    psnr: float | None  # vs the one-device image; None for that image itself
    seconds: float  # denoising + decode, compile excluded
    compile_s: float


def compare(
    prompt: str = PROMPT,
    counts=(2, 4, 8),
    steps: int = 25,
    seed: int = 0,
    model="demo",
    scheduler: str = "ddim",
    guidance_scale: float = 5.0,
    log=print,
) -> list:
    """The runs: one device first, then each method on each device count (all devices JAX sees at most)."""

    files = read_model(resolve_model_path(model))
    size = files.native_size
    available = len(jax.devices())
    counts = [n for n in counts if n <= available]
    plan = [("1 device", 1, {})] + [(m, n, kw) for n in counts for m, kw in METHODS.items()]
    configs = [DistriConfig(height=size, width=size, devices=n, split_batch=False, **kw) for _, n, kw in plan]
    for config, (_, n, _) in zip(configs, plan):  # every layout checked before the first run
        config.check_model(files.unet, n)
    runs = []
    for config, (label, n, kw) in zip(configs, plan):
        pipe = DistriSDXLPipeline.from_pretrained(model, config, dtype=jnp.float32)
        t0 = time.perf_counter()
        out = pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler
        )
        compile_s = out.timings["compile_s"]
        image = np.asarray(out.images[0])
        quality = None if n == 1 else float(psnr(image[None] / 255, runs[0].image[None] / 255)[0])
        run = Run(label, n, image, quality, 0.0, compile_s)
        run.seconds = time.perf_counter() - t0 - compile_s
        runs.append(run)
        quality = "reference" if run.psnr is None else f"PSNR {run.psnr:5.1f} dB vs 1 device"
        log(f"  {label:<14} {n} device(s): {quality}  ({run.seconds:.1f} s + compile {compile_s:.1f} s)")
    return runs


def grid_image(runs: list, prompt: str = "") -> Image.Image:
    """Column 0: the one-device image; then one column per device count, DistriFusion above naive patches,
    with the PSNR under each image."""
    ref = runs[0]
    counts = sorted({r.devices for r in runs[1:]})
    methods = list(dict.fromkeys(r.label for r in runs[1:]))
    h, w = ref.image.shape[:2]
    pad, text_h, head = 8, 18, 36
    cols, rows = 1 + len(counts), max(1, len(methods))
    grid = Image.new("RGB", (pad + cols * (w + pad), head + rows * (h + text_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 4), prompt[:120], fill="black")

    def place(run, col, row, caption):
        x, y = pad + col * (w + pad), head + row * (h + text_h + pad)
        grid.paste(Image.fromarray(run.image), (x, y))
        draw.text((x + 2, y + h + 3), caption, fill="black")

    place(ref, 0, 0, "1 device (reference)")
    for r in runs[1:]:
        psnr_text = "identical" if r.psnr == float("inf") else f"{r.psnr:.1f} dB"
        place(
            r, 1 + counts.index(r.devices), methods.index(r.label), f"{r.label}, {r.devices} dev: {psnr_text}"
        )
    return grid


def run(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists: pass another path or --overwrite")
    cpu_devices(max(args.device_counts))
    print(f"'{args.prompt}', {args.steps} DDIM steps, guidance 5, seed {args.seed}:")
    runs = compare(args.prompt, args.device_counts, args.steps, args.seed, args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(runs, args.prompt).save(out)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = parser(__doc__, "demo_grid")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--steps", type=positive, default=25, help="DDIM steps (default 25)")
    p.add_argument("--seed", type=seed_arg, default=0, help="0 <= SEED < 2^63 (default: 0)")
    p.add_argument("--model", default="demo", help="pipeline folder or 'demo' (default)")
    p.add_argument("--out", default="outputs/grid.png", help="the grid PNG (default outputs/grid.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_device_counts(p, [2, 4, 8], "device counts (default 2 4 8; fake CPU devices without accelerators)")
    return run_command(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
