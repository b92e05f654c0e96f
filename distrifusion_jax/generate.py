"""`distrifusion-jax generate`: one prompt to one image file, with a progress bar and a timing summary."""

from __future__ import annotations

import argparse
import sys

from .config import MODES, PARALLELISMS, SPLIT_SCHEMES


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `generate` subcommand on an argparse subparsers object."""
    p = sub.add_parser("generate", help="text to image with DistriFusion on the available devices",
                       description="Generate an SDXL image, split across devices by displaced patch parallelism.")
    p.add_argument("--model", required=True, help="SDXL pipeline folder (diffusers or converted) or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--prompt-2", default=None, help="prompt for the second text encoder (default: --prompt)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default=None, choices=["ddim", "euler", "dpm-solver"],
                   help="default: the checkpoint's scheduler_config.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--mode", default="corrected_async_gn", choices=MODES)
    p.add_argument("--parallelism", default="patch", choices=PARALLELISMS)
    p.add_argument("--split-scheme", default="row", choices=SPLIT_SCHEMES)
    p.add_argument("--no-split-batch", action="store_true", help="do not split the guidance batch across devices")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices (default: all); without accelerators, N CPU devices are created "
                        "(with several processes: the total, N / processes each)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", default="image.png", help="image file to write (PNG, JPEG, ...)")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent compilation cache (default: $DISTRIFUSION_JAX_CACHE or "
                        "~/.cache/distrifusion-jax/xla); 'off' disables it")
    p.add_argument("--no-progress", action="store_true",
                   help="no per-step progress bar: the denoising program then has no host callback and is "
                        "also stored in the compilation cache (with the bar only the text encoders and "
                        "the VAE are)")
    mem = p.add_argument_group("memory at high resolution")
    mem.add_argument("--attention", default=None, choices=["xla", "cudnn", "chunked", "auto"],
                     help="UNet attention kernel (default: JAX's choice); 'chunked' computes blockwise with bounded "
                          "memory on any backend, 'auto' only where the scores would exceed 1 GiB")
    mem.add_argument("--vae-attention", default="auto", choices=["xla", "cudnn", "chunked", "auto"],
                     help="the VAE mid-block's attention kernel (same choices; default 'auto': chunked where "
                          "the scores would exceed 1 GiB, from 2048^2 up)")
    mem.add_argument("--stale-kv", default="kv", choices=["kv", "hidden"],
                     help="what displaced steps keep and exchange per self-attention: K and V, or the input "
                          "tokens (half the memory and traffic, K/V projected again each step)")
    mem.add_argument("--stale-kv-dtype", default=None, choices=["bfloat16", "float8_e4m3fn", "int8"],
                     help="store and exchange those tokens narrower (default: the compute dtype)")
    mem.add_argument("--decode-tile-rows", type=int, default=None, metavar="ROWS",
                     help="when the VAE decodes on one device, decode in overlapping tiles of ROWS latent rows "
                          "(memory of one tile, approximate like diffusers' VAE tiling; e.g. 64)")
    hosts = p.add_argument_group(
        "multiple hosts", "one process per host, each started with the same --coordinator and --num-processes and "
        "its own --process-id; under SLURM (srun) or Open MPI (mpirun) the launcher supplies what is left out")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address, as every host reaches it (default: $JAX_COORDINATOR_ADDRESS)")
    hosts.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="number of processes (default: $JAX_NUM_PROCESSES, else the launcher's, else 1)")
    hosts.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process's index 0..N-1; 0 hosts the coordinator, writes the image and prints "
                            "(default: $JAX_PROCESS_ID, else the launcher's)")
    hosts.add_argument("--coordinator-bind", default=None, metavar="HOST:PORT",
                       help="where process 0 listens (default: $JAX_COORDINATOR_BIND_ADDRESS, else every "
                            "interface on the --coordinator port)")
    hosts.add_argument("--init-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for the coordinator and every process (default: 300)")
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    """Generate and save; user errors are raised as DistriFusionError (the CLI prints them in one line)."""
    import jax

    from .distributed import initialize, is_main_process
    from .errors import DistriFusionError

    # before any other JAX use: afterwards jax.devices() lists every process's devices
    processes = initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout,
                           bind_address=args.coordinator_bind)
    if args.devices is not None and args.devices > 0:
        if args.devices % processes:
            raise DistriFusionError(f"--devices {args.devices} over {processes} processes: use a multiple of "
                                    f"{processes} (the total; each process brings its share)")
        # only the CPU backend reads this (devices per process); it must precede any JAX computation
        jax.config.update("jax_num_cpu_devices", args.devices // processes)
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from .config import DistriConfig
    from .pipeline import DistriSDXLPipeline

    config = DistriConfig(height=args.height, width=args.width, devices=args.devices,
                          split_batch=not args.no_split_batch, warmup_steps=args.warmup_steps, mode=args.mode,
                          parallelism=args.parallelism, split_scheme=args.split_scheme, stale_kv=args.stale_kv,
                          stale_kv_dtype=args.stale_kv_dtype)
    if args.steps < 1:
        raise DistriFusionError(f"--steps {args.steps}: need at least one step")
    devices = config.resolve_devices()
    layout = "x".join(map(str, config.layout(len(devices))))
    main = is_main_process()  # only process 0 prints and writes; the others run the same program silently
    where = f" in {processes} processes" if processes > 1 else ""
    if main:
        print(f"loading {args.model} ({args.dtype}) for {len(devices)} {devices[0].platform} device(s){where}, mesh "
              f"(cfg x patch) {layout}, {args.parallelism}/{args.mode}, warmup {args.warmup_steps}", file=sys.stderr)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    pipe = DistriSDXLPipeline.from_pretrained(args.model, config, dtype=dtype, scheduler=args.scheduler,
                                              compilation_cache=args.compile_cache, attention_impl=args.attention,
                                              vae_attention_impl=args.vae_attention,
                                              decode_tile_rows=args.decode_tile_rows)
    if main:
        print("compiling the denoising loop (cached for later runs of the same shapes)...", file=sys.stderr)
    bars = []

    def progress(i, n):
        if not main:  # a no-op rather than None: every process must compile the same program
            return
        if not bars:  # created at the first finished step, so compilation does not count as step time
            bars.append(tqdm(total=n, desc="denoising", unit="step", file=sys.stderr))
        bars[0].update(i - bars[0].n)

    try:
        out = pipe(args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative_prompt,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   guidance_rescale=args.guidance_rescale, seed=args.seed,
                   progress=None if args.no_progress else progress)
    except ValueError as e:  # e.g. a prompt list that does not fit the batch
        raise DistriFusionError(str(e).splitlines()[0]) from None
    finally:
        for bar in bars:
            bar.close()
    if not main:
        return
    try:
        out.images[0].save(args.output)
    except (OSError, ValueError) as e:
        raise DistriFusionError(f"cannot write {args.output}: {e}") from None
    t = out.timings
    print(f"wrote {args.output} ({args.width}x{args.height}); compile {t['compile_s']:.1f} s, denoising "
          f"{t['denoise_s']:.2f} s ({1e3 * t['denoise_s'] / args.steps:.1f} ms/step), decode {t['decode_s']:.2f} s, "
          f"text encoding {t['encode_s']:.2f} s", file=sys.stderr)
