"""`distrifusion-jax generate`: one prompt to one image file, with a progress bar and a timing summary."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import DTYPE_NAMES
from .errors import DistriFusionError
from .flags import add_distri_flags, describe, seed_arg
from .generate_checks import (
    check_loras,
    check_model_fit,
    check_numbers,
    check_output,
    check_refiner,
    check_run,
    distri_config,
    hires_sizes,
    read_image,
    run_devices,
    save_image,
    steps_run,
)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `generate` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "generate",
        help="text to image with DistriFusion on the available devices",
        description="Generate an SDXL image, split across devices by displaced patch parallelism.",
    )
    p.add_argument(
        "--model",
        default="demo",
        help="pipeline folder (SDXL or SD 1.x / 2.x, diffusers or converted; the pipeline class is picked from "
        "it), single-file checkpoint, hub id, or 'demo' (default: the bundled demo model, 256x256 scenes of "
        "coloured shapes)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--prompt-2", default=None, help="prompt for the second text encoder (default: --prompt)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument(
        "--scheduler",
        default=None,
        choices=["ddim", "euler", "dpm-solver"],
        help="default: the checkpoint's scheduler_config.json",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="0 <= SEED < 2^63 (default: 0)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument(
        "--output",
        default="image.png",
        help="image file to write (PNG, JPEG, ...: by its extension), in an existing folder",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    p.add_argument(
        "--image",
        default=None,
        help="img2img: start from this image (PNG, JPEG, ...), of exactly --width x --height, noised to --strength",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.3,
        help="img2img: the share of the --steps schedule run on the noised image, in (0, 1] (default 0.3)",
    )
    p.add_argument(
        "--hires-size",
        type=int,
        default=None,
        metavar="PX",
        help="high-res fix: generate at --width x --height (default: the model's size), upscale (Lanczos) to "
        "PX x PX and refine there by img2img on the devices",
    )
    p.add_argument(
        "--hires-strength", type=float, default=0.3, help="high-res fix: the refine pass's strength"
    )
    p.add_argument(
        "--hires-steps",
        type=int,
        default=None,
        help="high-res fix: the refine pass's steps (default --steps)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="NAME",
        help="single-file --model only: the bundled config it was trained with (sdxl-base-1.0, sd-1.5, sd-2.1, "
        "sd-2.1-base, ...; default: detected from its keys; SD 2.x files default to sd-2.1, 768 v-prediction)",
    )
    p.add_argument(
        "--refiner",
        default=None,
        metavar="PATH",
        help="SDXL's refiner (a pipeline folder or hub id): the base runs the high-noise part of the schedule, "
        "the refiner the rest, on the same devices (diffusers' denoising_end / denoising_start)",
    )
    p.add_argument(
        "--refiner-start",
        type=float,
        default=0.8,
        metavar="FRACTION",
        help="with --refiner: the fraction of the denoising the base runs, in (0, 1) (default 0.8)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="fuse a LoRA (kohya or diffusers/peft safetensors) into the weights, scale default 1.0; repeat to "
        "stack several",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR|off",
        help="persistent compilation cache (default: $DISTRIFUSION_JAX_CACHE or "
        "~/.cache/distrifusion-jax/xla); 'off' disables it",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no per-step progress bar: the whole loop then runs as one compiled program (lax.scan) "
        "instead of one call per step; both are stored in the compilation cache",
    )
    add_distri_flags(p, height=None, width=None)
    for flag in ("--height", "--width"):
        describe(
            p, flag, f"image {flag[2:]} in pixels (default: the model's, 1024 for SDXL, 256 for the demo)"
        )
    mem = p.add_argument_group("memory at high resolution")
    mem.add_argument(
        "--attention",
        default="auto",
        choices=["xla", "cudnn", "chunked", "auto"],
        help="UNet attention kernel (default 'auto': cuDNN's fused kernel on NVIDIA GPUs where it "
        "applies, else 'chunked' where the scores would exceed 1 GiB, else XLA's); 'chunked' computes "
        "blockwise with bounded memory on any backend",
    )
    mem.add_argument(
        "--vae-attention",
        default="auto",
        choices=["xla", "cudnn", "chunked", "auto"],
        help="the VAE mid-block's attention kernel (same choices and default; its head dim of 512 "
        "is beyond cuDNN's, so 'auto' is chunked from 2048^2 up and XLA's below)",
    )
    mem.add_argument(
        "--decode-tile-rows",
        type=int,
        default=None,
        metavar="ROWS",
        help="with one device, decode in overlapping tiles of ROWS >= 16 latent rows (memory of "
        "one tile, approximate like diffusers' VAE tiling; e.g. 64); several devices decode "
        "row-sharded instead",
    )
    hosts = p.add_argument_group(
        "multiple hosts",
        "one process per host, each started with the same --coordinator and --num-processes and "
        "its own --process-id; under SLURM (srun) or Open MPI (mpirun) the launcher supplies what is left out; "
        "--devices is then the total, N / processes on each",
    )
    hosts.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address, as every host reaches it (default: $JAX_COORDINATOR_ADDRESS)",
    )
    hosts.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="number of processes (default: $JAX_NUM_PROCESSES, else the launcher's, else 1)",
    )
    hosts.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help="this process's index 0..N-1; 0 hosts the coordinator, writes the image and prints "
        "(default: $JAX_PROCESS_ID, else the launcher's)",
    )
    hosts.add_argument(
        "--coordinator-bind",
        default=None,
        metavar="HOST:PORT",
        help="where process 0 listens (default: $JAX_COORDINATOR_BIND_ADDRESS, else every "
        "interface on the --coordinator port)",
    )
    hosts.add_argument(
        "--init-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the coordinator and every process (default: 300)",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    """Generate and save; user errors are raised as DistriFusionError (the CLI prints them in one line).

    Everything that needs no weights is checked first (arguments, devices, output file, model
    configs, size, steps, tiles, kernels), so a mistake costs seconds, not a load and a compilation.
    """
    from .distributed import initialize, is_main_process
    from .pipeline import DistriPipeline, DistriSDXLPipeline
    from .preflight import read_model, resolve_model_path

    check_numbers(args)
    # before any other JAX use: afterwards jax.devices() lists every process's devices
    processes = initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        timeout_s=args.init_timeout,
        bind_address=args.coordinator_bind,
    )
    devices = run_devices(args.devices, processes)
    main = is_main_process()  # only process 0 prints and writes; the others run the same program silently
    fmt = check_output(args.output, args.overwrite) if main else None
    files = read_model(resolve_model_path(args.model, single_file_config=args.config))
    native_size(args, files)
    base = hires_sizes(
        args
    )  # with --hires-size: the base pass's size; --height / --width become the final one
    config = distri_config(args)
    cfg, patches = check_run(args, config, devices)
    check_model_fit(args, config, files, devices)
    if base is not None:
        dataclasses.replace(config, height=base[0], width=base[1]).check_model(files.unet, len(devices))
    refiner = check_refiner(args, files, config, devices)
    image = read_image(args)
    loras = check_loras(args.lora, files.root)
    if main:
        announce(args, devices, processes, cfg, patches)
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    load = lambda cls, root: cls.from_pretrained(  # noqa: E731
        root,
        config,
        dtype=dtype,
        scheduler=args.scheduler,
        compilation_cache=args.compile_cache,
        attention_impl=args.attention,
        vae_attention_impl=args.vae_attention,
        decode_tile_rows=args.decode_tile_rows,
    )
    pipe = load(DistriPipeline, files.root)
    for adapter, scale in loras:
        pipe.load_lora(adapter, scale)
    if refiner is not None:
        refiner = load(DistriSDXLPipeline, refiner.root)
    out = generate(pipe, args, main, image, base, refiner)
    if main:
        save_image(out.images[0], args.output, fmt, args.overwrite)
        t = out.timings
        print(
            f"wrote {args.output} ({args.width}x{args.height}); compile {t['compile_s']:.1f} s "
            f"({t['programs_compiled']} programs compiled, {t['programs_loaded']} from the cache), denoising "
            f"{t['denoise_s']:.2f} s ({1e3 * t['denoise_s'] / steps_run(args, base, image):.1f} ms/step), decode "
            f"{t['decode_s']:.2f} s, text encoding {t['encode_s']:.2f} s",
            file=sys.stderr,
        )


def native_size(args, files) -> None:
    """--height / --width left out: the model's own size."""
    args.height = files.native_size if args.height is None else args.height
    args.width = files.native_size if args.width is None else args.width


def announce(args, devices, processes: int, cfg: int, patches: int) -> None:
    """The start line: what is loaded, onto which devices, in the layout the run will use."""
    where = f" in {processes} processes" if processes > 1 else ""
    axis = "tensor" if args.parallelism == "tensor" else "patch"
    print(
        f"loading {args.model} ({args.dtype}) for {len(devices)} {devices[0].platform} device(s){where}, mesh "
        f"(cfg x {axis}) {cfg}x{patches}, {args.parallelism}/{args.mode}, warmup {args.warmup_steps}",
        file=sys.stderr,
    )


def generate(pipe, args, main: bool, image=None, base=None, refiner=None):
    """Run the pipeline with a progress bar (process 0 only; one per pass of the high-res fix, or of the base and
    the refiner) and return its output."""
    from tqdm.auto import tqdm

    if main:
        print(
            "compiling the programs for these shapes, or loading them from the cache...",
            file=sys.stderr,
        )
    bars = []

    def bar(desc):
        def progress(
            i, n
        ):  # i = 0 once compiled, then each finished step: the bar times denoising steps only
            if not main:  # a no-op rather than None: every process must compile the same program
                return
            if i == 0:
                bars.append(tqdm(total=n, desc=desc, unit="step", file=sys.stderr))
            bars[-1].update(i - bars[-1].n)
            if i == n:
                bars[-1].close()

        return None if args.no_progress else progress

    common = dict(
        prompt_2=args.prompt_2,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
    )
    try:
        if base is not None:
            return pipe.hires_fix(
                args.prompt,
                base,
                strength=args.hires_strength,
                num_inference_steps=args.hires_steps or args.steps,
                base_steps=args.steps,
                progress=bar("refining"),
                base_progress=bar("base pass"),
                **common,
            )
        if refiner is not None:
            split = args.refiner_start
            mid = pipe(
                args.prompt,
                num_inference_steps=args.steps,
                denoising_end=split,
                output_type="latent",
                progress=bar("base"),
                **common,
            )
            out = refiner(
                args.prompt,
                image=mid.images,
                num_inference_steps=args.steps,
                denoising_start=split,
                progress=bar("refiner"),
                **common,
            )
            out.timings = {k: out.timings[k] + mid.timings.get(k, 0) for k in out.timings if k != "compiled"}
            return out
        extra = {} if image is None else dict(image=image, strength=args.strength)
        return pipe(args.prompt, num_inference_steps=args.steps, progress=bar("denoising"), **common, **extra)
    except DistriFusionError:
        raise
    except ValueError as e:  # any other input the pipeline refuses: its first line
        raise DistriFusionError(str(e).splitlines()[0]) from None
    finally:
        for bar in bars:
            bar.close()
