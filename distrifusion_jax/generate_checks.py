"""`generate`'s checks before anything slow (arguments, devices, output file, model configs, size, steps,
the refiner), each a one-line error, and the image written whole or not at all."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

from .config import DistriConfig
from .errors import ConfigError, DistriFusionError
from .flags import distri_config_from_args


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
    from .arguments import denoising_first, denoising_stop
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
    denoising_stop(sched, args.steps, args.refiner_start, "--refiner-start")
    denoising_first(sched, args.steps, args.refiner_start, "--refiner-start")
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
