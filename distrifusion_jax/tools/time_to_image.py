"""Time to image of `generate`: fresh processes, cold (empty caches) then warm, split by phase.

    python -m distrifusion_jax.tools.time_to_image                       # the demo model, 256^2, 4 steps, 1 device
    python -m distrifusion_jax.tools.time_to_image --steps 25 --devices 2 --repeats 3 --json tti.json
    python -m distrifusion_jax.tools.time_to_image --model path/to/pipeline --height 1024 --width 1024

Each run is a new Python process doing what `distrifusion-jax generate` does (progress bar on: the default):
import, load the pipeline, encode the prompt, denoise, decode, write the PNG. The first run finds empty
caches (a fresh folder for JAX's persistent compilation cache and our traced programs); the next ones
find what it wrote. Wall is the whole process as the shell sees it; "compile" is time spent tracing,
lowering and compiling or loading compiled programs (`cache.CompileClock`), taken out of the phase it
happened in; "other" is the rest (interpreter start, argument checks, writing the image).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax.numpy as jnp

from ..cache import CompileClock
from ..config import DTYPE_NAMES, DistriConfig
from ..pipeline import DistriSDXLPipeline
from .command import parser, positive

PHASES = ("import_s", "load_s", "compile_s", "encode_s", "denoise_s", "decode_s")
HEADER = (
    "| run | wall s | import | load | compile | text encoding | denoising | decode | other "
    "| programs compiled / from the cache |"
)


def child(spec: dict) -> dict:
    """One run inside the fresh process: the phases' seconds ("import_s" from the parent's spawn time to here,
    the interpreter's start and every import of the package and JAX included)."""
    t0 = time.time()
    import_s = t0 - spec["spawned"]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[spec["dtype"]]
    clock = CompileClock()
    pipe = DistriSDXLPipeline.from_pretrained(
        spec["model"],
        DistriConfig(spec["height"], spec["width"], devices=spec["devices"]),
        dtype=dtype,
        compilation_cache=spec["cache"],
    )
    load_compile = clock.seconds
    load_s = time.time() - t0 - load_compile
    out = pipe(spec["prompt"], num_inference_steps=spec["steps"], seed=0, progress=lambda i, n: None)
    out.images[0].save(spec["image"])
    t = out.timings
    return {
        "import_s": import_s,
        "load_s": load_s,
        "compile_s": t["compile_s"] + load_compile,
        "encode_s": t["encode_s"],
        "denoise_s": t["denoise_s"],
        "decode_s": t["decode_s"],
        "programs_compiled": t["programs_compiled"],
        "programs_loaded": t["programs_loaded"],
    }


def run_once(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["devices"] > 1:  # fake CPU devices where there are no accelerators (ignored by GPU backends)
        env["XLA_FLAGS"] = (
            f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={spec['devices']}"
        )
    spec = {**spec, "spawned": time.time()}
    code = "import json, sys; from distrifusion_jax.tools.time_to_image import child; "
    code += "print('RESULT ' + json.dumps(child(json.loads(sys.argv[1]))))"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"time_to_image: the run failed: {last}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["wall_s"] = wall
    out["other_s"] = wall - sum(out[k] for k in PHASES)
    return out


def row(label: str, r: dict) -> str:
    cells = [f"{r[k]:.2f}" for k in ("wall_s", *PHASES, "other_s")]
    return f"| {label} | " + " | ".join(cells) + f" | {r['programs_compiled']} / {r['programs_loaded']} |"


def run(args) -> dict:
    folder = tempfile.mkdtemp(prefix="dfj-tti-")
    spec = {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "devices": args.devices,
        "steps": args.steps,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "cache": os.path.join(folder, "cache"),
        "image": os.path.join(folder, "image.png"),
    }
    try:
        runs = []
        for i in range(1 + args.repeats):
            label = "cold" if i == 0 else f"warm {i}"
            runs.append((label, run_once(spec)))
            print(f"{label}: {runs[-1][1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    warm = [r for label, r in runs[1:]]
    best = min(warm, key=lambda r: r["wall_s"]) if warm else None
    lines = [
        f"`generate`, {args.model}, {args.width}x{args.height}, {args.steps} steps, {args.devices} device(s), "
        f"{args.dtype}, progress bar on:",
        "",
        HEADER,
        "|" + "---|" * 10,
        *(row(label, r) for label, r in runs),
    ]
    if best is not None:
        work = best["load_s"] + best["encode_s"] + best["denoise_s"] + best["decode_s"]
        lines += [
            "",
            f"Fastest warm run: compile {best['compile_s']:.2f} s; wall {best['wall_s']:.2f} s = "
            f"{best['wall_s'] / work:.2f} x (load + text encoding + denoising + decode = {work:.2f} s).",
        ]
    print("\n".join(lines))
    result = {"spec": {k: v for k, v in spec.items() if k not in ("cache", "image")}, "runs": dict(runs)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def build_parser():
    p = parser(__doc__, "time_to_image")
    p.add_argument(
        "--model", default="demo", help="pipeline folder or hub id (default: the bundled demo model)"
    )
    p.add_argument("--height", type=positive, default=256)
    p.add_argument("--width", type=positive, default=256)
    p.add_argument("--steps", type=positive, default=4)
    p.add_argument("--devices", type=positive, default=1)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    p.add_argument("--repeats", type=positive, default=2, help="warm runs after the cold one (default 2)")
    p.add_argument(
        "--prompt", default="a red circle on the left and a blue square on the right, on a yellow background"
    )
    p.add_argument("--json", default=None, help="also write the runs here")
    return p


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
