"""Quick start: the bundled demo model on one device, with DistriFusion and with naive patches on 2, 4 and 8.

    python examples/quickstart.py [--steps 25] [--prompt TEXT] [--out outputs/quickstart]

No download and no torch: the demo model ships inside the package (an SDXL-architecture pipeline trained
here on scenes of coloured shapes, docs/demo-model.md). Without GPUs JAX gets 8 fake CPU devices, which
share this machine's cores: the timings say nothing about speedups, the images and their PSNR against the
one-device image say how closely each parallel method reproduces it. Writes OUT/grid.png and one PNG per
run.
"""

import argparse
import time
from pathlib import Path

import jax
from PIL import Image

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU backend; must precede any JAX work

from distrifusion_jax.tools.demo_grid import PROMPT, compare, grid_image  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="where the images are written")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}: {len(jax.devices())} device(s)")
    print(f"'{args.prompt}', 256x256, {args.steps} DDIM steps, guidance 5, seed 0:")
    t0 = time.perf_counter()
    runs = compare(args.prompt, (2, 4, 8), args.steps)
    for r in runs:
        name = f"{r.devices}dev-{r.label.replace(' ', '_')}" if r.devices > 1 else "1-device"
        Image.fromarray(r.image).save(out / f"{name}.png")
    grid_image(runs, args.prompt).save(out / "grid.png")
    print(f"wrote {out / 'grid.png'} in {time.perf_counter() - t0:.0f} s")
    print("(DistriFusion stays close to the one-device image; naive patches, with no exchange, drift apart)")


if __name__ == "__main__":
    main()
