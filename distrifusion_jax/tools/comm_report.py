"""Per-device communication, stale memory and FLOPs of DistriFusion's displaced step, ours vs distrifuser's.

    python -m distrifusion_jax.tools.comm_report            # full SDXL, 1024/2048/3840, N = 2, 4, 8, CFG split
    python -m distrifusion_jax.tools.comm_report --tiny     # the micro-sdxl preset, small images: seconds
    python -m distrifusion_jax.tools.comm_report --config path/to/unet/config.json --sizes 1024 768x1344 \\
        --device-counts 2 4 --cfg-split both --dtype float16 --json report.json
    python -m distrifusion_jax.tools.comm_report --sizes 3840 --device-counts 8 --stale-kv hidden \\
        --stale-kv-dtype int8
    python -m distrifusion_jax.tools.comm_report --img2img  # img2img at 2048 and 3840: VAE encode + refine
        [--strength 0.3 --steps 50 --warmup-steps 4 --vae-dtype float32]

Abstract evaluation only (jax.eval_shape / jit tracing and lowering with ShapeDtypeStruct parameters):
no weights, no data, no compilation; fake CPU devices stand in for the mesh. `--img2img` reports the bytes
of one img2img instead (tools/comm_img2img.py): the row-sharded VAE encode and the refine pass's loop, from
the collectives of the traced programs.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from ..config import DTYPE_NAMES
from ..flags import FLAGS, add_distri_flags, run_command
from ..models.presets import sdxl_base, sdxl_vae_config, unet_preset, vae_preset
from ..models.unet import UNetConfig
from ..models.vae import AutoencoderKL
from . import comm_img2img
from .abstract import Case, abstract_model, abstract_weights
from .comm import report
from .command import add_device_counts, add_img2img_flags, cpu_devices, parser, positive
from .fmt import fmt_bytes, machine, ruled, write_json

# DistriConfig's flags this report takes from flags.py: the others are swept (sizes, device counts, CFG split)
# or do not change a displaced step's exchange (the warmup only counts with --img2img: the refine's total)
DISTRI_FLAGS = ("mode", "stale_kv", "stale_kv_dtype", "warmup_steps")
TINY_SIZES = [(128, 128), (256, 256)]
SIZES = [(1024, 1024), (2048, 2048), (3840, 3840)]
IMG2IMG_SIZES = [(2048, 2048), (3840, 3840)]

COLUMNS = ("halo", "K/V", "GN", "CFG/out", "total", "stale mem")
NOTES = """\
  Per device and per displaced step, bytes received by the busiest device (a middle band; the first and
  last bands exchange halos with one neighbour only).
  ours (JAX): halo = 2 non-cyclic ppermutes per 3x3 conv (incl. conv_in's one latent row, synchronous;
    one for a stride-2 conv, which reads no row below its band),
    K/V and GN (float32) all_gathers over the patch axis, CFG/out = eps all_gather over the cfg axis;
    stale mem = bytes of the stale-state pytree; FLOPs/dev = XLA cost analysis of this device's displaced
    step / one single-device UNet step on the whole image, same guidance batch (ideal 1/N in brackets).
  distrifuser (reference, from its design): halo rows all-gathered from all P bands (no conv_in), K/V
    all-gathered, GN [E x, E x^2] all-gathered in the activation dtype, CFG/out = the UNet output patch
    all-gathered over all N devices every step (synchronous); stale mem = its P-fold buffer list.
  MB/GB = 10^6/10^9 bytes."""


# ---- text output ----
def _cells(volumes: dict, stale: int) -> list:
    return [fmt_bytes(volumes[k]) for k in ("halo", "kv", "gn", "cfg", "total")] + [fmt_bytes(stale)]


def format_rows(rows: list) -> list:
    """Table lines for rows of one (size, cfg split) group: an "ours" and a "distrifuser" line per N."""
    lines = ruled(
        f"{'N':>3} {'mesh':>5}  {'':<11}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'FLOPs/dev (1/N)':>17}"
    )
    for r in rows:
        if "error" in r:
            lines.append(f"{r['devices']:>3} {'':>5}  n/a: {r['error']}")
            continue
        mesh = f"{r['cfg_size']}x{r['patches']}"
        ratio = f"{r['flops_ratio']:.3f} ({1 / r['devices']:.3f})" if "flops_ratio" in r else "-"
        for who, key, rat in (("ours (JAX)", "ours", ratio), ("distrifuser", "reference", "-")):
            cells = _cells(r[key]["received"], r[key]["stale_bytes"])
            lines.append(
                f"{r['devices'] if key == 'ours' else '':>3} {mesh if key == 'ours' else '':>5}  "
                f"{who:<11}" + "".join(f"{c:>10}" for c in cells) + f"{rat:>17}"
            )
        if not r["collectives_match"]:
            lines.append(
                "    WARNING: these byte counts differ from the collectives found in the traced program"
            )
    return lines


def format_table(rows: list, model: str = "UNet") -> str:
    """Readable tables, one per (resolution, CFG split), then the notes."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["height"], r["width"], r["cfg_split"]), []).append(r)
    for (h, w, split), group in groups.items():
        r = group[0]
        options = (
            ""
            if (r.get("stale_kv", "kv"), r.get("stale_kv_dtype")) == ("kv", None)
            else (f", stale {r['stale_kv']} in {r['stale_kv_dtype'] or r['dtype']}")
        )
        out.append(
            f"{model}, {w}x{h} (latent {w // 8}x{h // 8}), batch {r['batch']}, {r['dtype']}, "
            f"{'CFG split' if split else 'no CFG split'}, mode {r['mode']}{options}"
        )
        out += format_rows(group) + [""]
    return "\n".join(out + [NOTES])


# ---- command line ----
def parse_size(text: str) -> tuple:
    """ "1024" -> (1024, 1024); "768x1344" -> (768, 1344) as (height, width)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def build_parser():
    p = parser(__doc__, "comm_report")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--config", help="diffusers UNet config.json (default: SDXL base)")
    model.add_argument(
        "--tiny",
        action="store_true",
        help="the micro-sdxl preset (the smallest SDXL-shaped UNet; with --img2img the tiny-sdxl VAE) and "
        "small images: a quick check",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        help="image sizes, N or HxW pixels (default 1024 2048 3840; --tiny: 128 256)",
    )
    add_device_counts(p, [2, 4, 8], "device counts to report (default 2 4 8)")
    p.add_argument(
        "--cfg-split",
        choices=("on", "off", "both"),
        default="on",
        help="guidance branches on two halves of the devices (distrifuser's split_batch; default on)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=DTYPE_NAMES,
        help="activation and parameter dtype (default bfloat16)",
    )
    p.add_argument(
        "--vae-dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="with --img2img: the VAE's dtype (default float32, as SDXL's VAE asks)",
    )
    p.add_argument("--batch", type=positive, default=1, help="images per prompt batch (default 1)")
    add_distri_flags(p, skip=set(FLAGS) - set(DISTRI_FLAGS))
    add_img2img_flags(p, "the bytes of the row-sharded VAE encode and of the refine pass's loop instead")
    p.add_argument("--json", help="also write the numbers (bytes, FLOPs) to this JSON file")
    return p


def model_of(args) -> tuple:
    """(UNet config, its name in the table, default sizes)."""
    if args.tiny:
        return unet_preset("micro-sdxl"), "micro-sdxl UNet", TINY_SIZES
    if args.config:
        return UNetConfig.from_json(args.config), args.config, SIZES
    return sdxl_base(), "SDXL base UNet", SIZES


def run(args) -> list:
    """Print the tables (and write the JSON); returns the rows."""
    refine = comm_img2img.Refine(args.steps, args.strength, args.warmup_steps)  # checked before any work
    # fake CPU devices for the mesh (before JAX starts its backend; 8 as tests/conftest.py sets it)
    jax.config.update("jax_platforms", "cpu")
    cpu_devices(max(8, *args.device_counts))
    config, name, sizes = model_of(args)
    splits = {"on": (True,), "off": (False,), "both": (True, False)}[args.cfg_split]
    start = time.perf_counter()
    if args.img2img:
        return run_img2img(args, config, name, refine, splits, start)
    progress = lambda r: print(
        f"  {r['width']}x{r['height']} N={r['devices']} "
        f"{'split' if r['cfg_split'] else 'no split'}: {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    rows = report(
        config,
        args.sizes or sizes,
        args.device_counts,
        splits,
        args.dtype,
        args.mode,
        args.batch,
        progress=progress,
        stale_kv=args.stale_kv,
        stale_kv_dtype=args.stale_kv_dtype,
    )
    print()
    print(format_table(rows, name))
    print(
        f"\n{len(rows)} configurations in {time.perf_counter() - start:.1f} s (abstract evaluation, "
        f"JAX {jax.__version__}, {jax.device_count()} fake CPU devices)"
    )
    if args.json:
        write_json(args.json, {"model": name, "rows": rows})
        print(f"wrote {args.json}")
    return rows


def run_img2img(args, config, name, refine, splits, start) -> list:
    """--img2img: the encode + refine table (and JSON); returns its rows."""
    vae_config = vae_preset("tiny-sdxl") if args.tiny else sdxl_vae_config()
    vae_name = "tiny-sdxl VAE" if args.tiny else "SDXL VAE"
    dt = jnp.dtype(args.vae_dtype)
    vae = AutoencoderKL(vae_config, dtype=dt, param_dtype=dt)
    sizes = args.sizes or (TINY_SIZES if args.tiny else IMG2IMG_SIZES)
    options = dict(dtype=args.dtype, mode=args.mode, batch=args.batch)
    options.update(stale_kv=args.stale_kv, stale_kv_dtype=args.stale_kv_dtype)
    cases = [
        Case(config, h, w, n, split, **options)
        for h, w in sizes
        for split in splits
        for n in args.device_counts
    ]
    progress = lambda r: print(
        f"  {r['width']}x{r['height']} N={r['devices']}: {time.perf_counter() - start:.1f} s", flush=True
    )
    unet, params = abstract_model(config, args.dtype)
    rows = comm_img2img.report(cases, unet, params, vae, abstract_weights(vae, dt), refine, progress)
    print()
    print(comm_img2img.format_table(rows, name, vae_name))
    seconds = time.perf_counter() - start
    print(f"\n{len(rows)} configurations in {seconds:.1f} s (abstract evaluation, JAX {jax.__version__})")
    if args.json:
        meta = dict(
            platform=jax.devices()[0].platform,
            machine=machine(),
            fake_devices=jax.device_count(),
            jax=jax.__version__,
            date=time.strftime("%Y-%m-%d"),
            seconds=round(seconds, 1),
        )
        write_json(args.json, {"model": name, "vae": vae_name, "meta": meta, "rows": rows})
        print(f"wrote {args.json}")
    return rows


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
