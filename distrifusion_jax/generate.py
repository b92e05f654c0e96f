"""`distrifusion-jax generate`: one prompt to one image file, with a progress bar and a timing summary."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets
import sys
from pathlib import Path

from .config import DTYPE_NAMES, DistriConfig
from .errors import ConfigError, DistriFusionError
from .flags import add_distri_flags, describe, distri_config_from_args, seed_arg


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
    files = read_model(resolve_model_path(args.model))
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


# ---- checks before anything slow ----
def steps_run(args, base, image) -> int:
    """Denoising steps of the (last) pass: img2img and the high-res fix's refine run the last part of theirs (with
    --refiner, the timings cover both passes: all --steps)."""
    if base is not None:
        steps, strength = args.hires_steps or args.steps, args.hires_strength
    elif image is not None:
        steps, strength = args.steps, args.strength
    else:
        return args.steps
    return max(1, min(int(steps * strength), steps))


def hires_sizes(args):
    """--hires-size: (height, width) of the base pass (the given or native size), and --height / --width set to
    the final size; None without it. The refine pass's strength and steps are checked here too."""
    from .arguments import check_strength

    if args.hires_size is None:
        return None
    if args.image is not None:
        raise ConfigError("--image and --hires-size: pass one (the high-res fix makes its own first image)")
    if args.hires_size < 8 or args.hires_size % 8:
        raise ConfigError(f"--hires-size {args.hires_size}: a positive multiple of 8 (e.g. 2048)")
    if args.hires_steps is not None and args.hires_steps < 1:
        raise ConfigError(f"--hires-steps {args.hires_steps}: at least one step")
    check_strength(args.hires_strength, args.hires_steps or args.steps)
    base = (args.height, args.width)
    args.height = args.width = args.hires_size
    return base


def check_refiner(args, files, config: DistriConfig, devices):
    """--refiner: its folder's configuration files (an SDXL pipeline, its size rule on this layout, the split of the
    schedule), read before any weight; None without it."""
    from .arguments import denoising_split
    from .preflight import make_scheduler_of, read_model, resolve_model_path

    if args.refiner is None:
        return None
    if args.image is not None or args.hires_size is not None:
        raise ConfigError(
            "--refiner with --image or --hires-size: pass one (the refiner finishes the base's image)"
        )
    if files.family != "sdxl":
        raise ConfigError(f"--refiner: {args.model} is not an SDXL model; the refiner finishes SDXL's base")
    refiner = read_model(resolve_model_path(args.refiner, args.compile_cache))
    if refiner.family != "sdxl":
        raise ConfigError(f"--refiner {args.refiner}: not an SDXL pipeline (SDXL's refiner is one)")
    config.check_model(refiner.unet, len(devices))
    sched = make_scheduler_of(files, args.scheduler)
    denoising_split(sched, args.steps, None, args.refiner_start, "--refiner-start")
    denoising_split(sched, args.steps, args.refiner_start, None, "--refiner-start")
    return refiner


def read_image(args):
    """--image as a PIL image of exactly --width x --height (never resized), with --strength checked; None
    without it."""
    from PIL import Image, UnidentifiedImageError

    from .arguments import check_strength

    if args.image is None:
        return None
    check_strength(args.strength, args.steps)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(
            f"--image {args.image}: cannot read it as an image ({e.__class__.__name__})"
        ) from None
    if image.size != (args.width, args.height):
        raise ConfigError(
            f"--image {args.image} is {image.size[0]}x{image.size[1]} but the run is {args.width}x{args.height}: "
            "pass --width / --height of the image, or resize it"
        )
    return image.convert("RGB")


def check_loras(values: list, root) -> list:
    """[(LoRA path, scale)] of the --lora flags, each read and matched against the model's layers by shape
    (no weight loaded): a LoRA for another model, a wrong rank or a pickle is one line before the load."""
    from .arguments import float_arg
    from .weights.lora import abstract_trees, parse_lora_arg, plan_lora, read_lora

    specs = [parse_lora_arg(v) for v in values]
    if not specs:
        return []
    trees = abstract_trees(root)
    for path, scale in specs:
        float_arg(f"--lora {path}: scale", scale)
        plan_lora(trees, read_lora(path))
    return specs


def check_numbers(args) -> None:
    """Counts and scales the parser cannot bound."""
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: need at least one step (e.g. 30)")
    for flag, value in (
        ("--guidance-scale", args.guidance_scale),
        ("--guidance-rescale", args.guidance_rescale),
        ("--init-timeout", args.init_timeout),
    ):
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: pass a finite number")
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: pass at least 1 (or leave it out to use all)")


def run_devices(requested, processes: int) -> tuple:
    """This run's devices: the first `requested` (default all) of every process's.

    Without accelerators, `requested` CPU devices are created, which JAX allows only before it
    starts; where it has started already (main() called by a program that used JAX), the devices it
    has are used if there are enough.
    """
    import jax

    from .distributed import devices

    started = False
    if requested is not None:
        if requested % processes:
            raise ConfigError(
                f"--devices {requested} over {processes} processes: use a multiple of {processes} "
                "(the total; each process brings its share)"
            )
        try:  # only the CPU backend reads this (devices per process)
            jax.config.update("jax_num_cpu_devices", requested // processes)
        except RuntimeError:
            started = True
    available = devices()
    if requested is not None and requested > len(available):
        why = (
            f"JAX was started in this process with {len(available)} before this command could create more"
            if started
            else "this machine has no more"
        )
        raise ConfigError(
            f"--devices {requested} but JAX sees {len(available)} {available[0].platform} device(s) "
            f"({why}); pass --devices {len(available)} or fewer, or leave it out to use all"
        )
    return tuple(available[: requested or len(available)])


def check_output(path, overwrite: bool) -> str:
    """The PIL format to write `path` in, once its folder, name and extension are known to work."""
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise ConfigError(f"--output {path} is a folder; name an image file in it, e.g. {p / 'image.png'}")
    folder = p.parent
    if not folder.is_dir():
        raise ConfigError(
            f"--output {path}: folder {folder} does not exist; create it first (mkdir -p {folder}) "
            "or write elsewhere"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {path}: folder {folder} is not writable; write the image elsewhere")
    fmt = image_format(p, path)
    if p.exists() and not overwrite:
        raise ConfigError(
            f"--output {path} already exists; pass --overwrite to replace it, or choose another name"
        )
    return fmt


def image_format(p: Path, shown) -> str:
    """The PIL format of `p`'s extension, if PIL can write an RGB image in it."""
    import io

    from PIL import Image

    Image.init()  # registers every plugin's extensions
    fmt = Image.registered_extensions().get(p.suffix.lower())
    fix = "use .png, .jpg or .webp"
    if not p.suffix:
        raise ConfigError(
            f"--output {shown} has no file extension, which names the image format; {fix} (e.g. {p.name}.png)"
        )
    if fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"--output {shown}: Pillow cannot write {p.suffix} files; {fix}")
    try:  # some formats take only some image modes (XBM: 1-bit)
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--output {shown}: Pillow cannot write an RGB image as {fmt} ({e}); {fix}"
        ) from None
    return fmt


def distri_config(args) -> DistriConfig:
    """The DistriConfig of the run, with the CFG split only where the guidance scale uses it."""
    return distri_config_from_args(args, do_classifier_free_guidance=args.guidance_scale > 1)


def check_run(args, config: DistriConfig, devices) -> tuple:
    """(cfg, patch) mesh of the run; the layout, cache folder, decode tiles and attention kernels checked."""
    from .cache import check_cache_dir
    from .decode import check_tiles, check_tiles_apply
    from .preflight import check_attention

    layout = config.layout(len(devices))
    check_cache_dir(args.compile_cache)
    check_tiles(args.decode_tile_rows, name="--decode-tile-rows")
    check_tiles_apply(args.decode_tile_rows, len(devices), config.latent_height, "--decode-tile-rows")
    check_attention(args.attention, devices[0].platform, "--attention")
    check_attention(args.vae_attention, devices[0].platform, "--vae-attention")
    return layout


def check_model_fit(args, config: DistriConfig, files, devices) -> None:
    """The size against the UNet's downsampling on this layout, and the steps against the scheduler."""
    from .preflight import check_steps, make_scheduler_of

    config.check_model(files.unet, len(devices))
    check_steps(make_scheduler_of(files, args.scheduler), args.steps, "--steps")


def save_image(image, path, fmt: str, overwrite: bool) -> None:
    """Write `image` to a temporary file in the output's folder, then rename it into place.

    A failure or an interruption never leaves a half-written image, nor replaces a file that
    appeared meanwhile unless `overwrite`.
    """
    p = Path(os.fspath(path)).expanduser()
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.partial")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
        )  # the umask applies, as to any new file
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        if p.exists() and not overwrite:
            raise ConfigError(
                f"--output {path} appeared while generating; pass --overwrite to replace it, or "
                "choose another name"
            )
        os.replace(tmp, p)
    except DistriFusionError:
        raise
    except (OSError, ValueError) as e:
        raise DistriFusionError(
            f"cannot write {path}: {getattr(e, 'strerror', None) or e}; check the free space "
            "and permissions of its folder"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)  # after the rename there is nothing left to remove
