"""Per-device communication, stale memory and FLOPs of DistriFusion's displaced step, ours vs distrifuser's.

    python examples/comm_report.py                      # full SDXL, 1024/2048/3840, N = 2, 4, 8, CFG split
    python examples/comm_report.py --tiny               # a tiny SDXL-shaped UNet, seconds
    python examples/comm_report.py --config path/to/unet/config.json --sizes 1024 768x1344 \\
        --devices 2 4 --cfg-split both --dtype float16 --json report.json
    python examples/comm_report.py --sizes 3840 --devices 8 --stale-kv hidden --stale-kv-dtype int8

Abstract evaluation only (jax.eval_shape / jit tracing and lowering with ShapeDtypeStruct parameters):
no weights, no data, no compilation; fake CPU devices stand in for the mesh.
"""

import argparse
import json
import time

import jax

import distrifusion_jax as dj
from distrifusion_jax.config import MODES, STALE_KV, STALE_KV_DTYPES

# The smallest SDXL-shaped UNet: DownBlock2D + a cross-attention level, text_time micro-conditioning.
TINY = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 4, "attention_head_dim": [1, 2],
    "block_out_channels": [8, 16], "cross_attention_dim": 8, "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 20, "use_linear_projection": True,
}


def parse_size(text: str) -> tuple:
    """"1024" -> (1024, 1024); "768x1344" -> (768, 1344) as (height, width)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="diffusers UNet config.json (default: SDXL base)")
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped UNet and small images (quick check)")
    p.add_argument("--sizes", nargs="+", type=parse_size, help="image sizes, N or HxW pixels "
                   "(default 1024 2048 3840; --tiny: 128 256)")
    p.add_argument("--devices", nargs="+", type=int, default=[2, 4, 8], help="device counts (default 2 4 8)")
    p.add_argument("--cfg-split", choices=("on", "off", "both"), default="on",
                   help="guidance branches on two halves of the devices (distrifuser's split_batch; default on)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activation and parameter dtype (default bfloat16)")
    p.add_argument("--mode", default="corrected_async_gn", choices=MODES, help="DistriConfig mode")
    p.add_argument("--batch", type=int, default=1, help="images per prompt batch (default 1)")
    p.add_argument("--stale-kv", default="kv", choices=STALE_KV, help="DistriConfig stale_kv (default kv)")
    p.add_argument("--stale-kv-dtype", choices=[d for d in STALE_KV_DTYPES if d],
                   help="DistriConfig stale_kv_dtype (default: the activation dtype)")
    p.add_argument("--json", help="also write the numbers (bytes, FLOPs) to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # fake CPU devices for the mesh (before JAX starts its backend; 8 as tests/conftest.py sets it)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(8, *args.devices))
    from distrifusion_jax.parallel.report import format_table, report

    if args.tiny:
        config, name, sizes = dj.UNetConfig.from_dict(TINY), "tiny SDXL-shaped UNet", [(128, 128), (256, 256)]
    elif args.config:
        config, name, sizes = dj.UNetConfig.from_json(args.config), args.config, None
    else:
        config, name, sizes = dj.sdxl_base(), "SDXL base UNet", None
    sizes = args.sizes or sizes or [(1024, 1024), (2048, 2048), (3840, 3840)]
    splits = {"on": (True,), "off": (False,), "both": (True, False)}[args.cfg_split]

    start = time.perf_counter()
    progress = lambda r: print(f"  {r['width']}x{r['height']} N={r['devices']} "
                               f"{'split' if r['cfg_split'] else 'no split'}: {time.perf_counter() - start:.1f} s",
                               flush=True)
    rows = report(config, sizes, args.devices, splits, args.dtype, args.mode, args.batch, progress=progress,
                  stale_kv=args.stale_kv, stale_kv_dtype=args.stale_kv_dtype)
    print()
    print(format_table(rows, name))
    print(f"\n{len(rows)} configurations in {time.perf_counter() - start:.1f} s (abstract evaluation, "
          f"JAX {jax.__version__}, {jax.device_count()} fake CPU devices)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
