"""The paper's fidelity tables on a model that denoises: PSNR and SSIM of parallel images vs one device.

    python -m distrifusion_jax.tools.fidelity --out docs/results/fidelity [--model demo] [--prompts 64]
        [--steps 50] [--device-counts 2 4 8] [--tables table1 gn warmup steps schedulers stale]

Every case generates the same held-out prompts with the same seeds as its one-device reference (same
scheduler and step count) and reports the mean and spread of PSNR (dB, images in [0, 1]) and SSIM
(Gaussian window 11, sigma 1.5, mean over RGB) over the prompts. Defaults follow the paper: DDIM, CFG 5,
warmup 4. The tables:
  table1      DistriFusion (corrected_async_gn) on each device count without and with the CFG split,
              against naive patches (row, col, alternate) at the same counts;
  gn          every GroupNorm mode, no_sync and full_sync at the largest count (no CFG split);
  warmup      warmup 0 / 1 / 2 / 4 / 8 at the largest count;
  steps       half the steps (DDIM) at the largest count, against its own one-device reference;
  schedulers  Euler and DPM-Solver++ at half the steps, likewise;
  stale       the stale-state options (bfloat16, int8, float8, hidden, hidden + int8) at the largest count.
The one-device images also get the demo's pixel check (colour and side of the largest object vs the
prompt). Results accumulate in OUT/results.json, one entry per case, so an interrupted run resumes where
it stopped; OUT/tables.md is rewritten after every case, with OUT/samples.png (the first prompts of the
table-1 cases side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from ..config import DistriConfig
from ..errors import ConfigError
from ..flags import run_command
from ..pipeline import DistriSDXLPipeline
from ..preflight import check_steps, make_scheduler_of, read_model, resolve_model_path
from .command import add_device_counts, cpu_devices, option_defaults, options_from, parser, positive
from .demo_data import check_image, heldout_prompts

TABLES = ("table1", "gn", "warmup", "steps", "schedulers", "stale")
GUIDANCE = 5.0
WARMUP = 4


@dataclasses.dataclass(frozen=True)
class Case:
    table: str
    label: str
    devices: int
    scheduler: str = "ddim"
    half_steps: bool = False
    config: tuple = ()  # DistriConfig fields beside devices, as sorted (name, value) pairs

    @property
    def key(self) -> str:
        fields = ",".join(f"{k}={v}" for k, v in self.config)
        return f"{self.scheduler}/{'half' if self.half_steps else 'full'}/{self.devices}/{fields}"

    @property
    def reference(self) -> "Case":
        return Case("reference", "1 device", 1, self.scheduler, self.half_steps)


def case(table, label, devices, scheduler="ddim", half_steps=False, **config) -> Case:
    """A run; fields equal to DistriConfig's defaults are left out, so the same run in two tables has one key."""

    defaults = {f.name: f.default for f in dataclasses.fields(DistriConfig)}
    config = {"warmup_steps": WARMUP, "split_batch": False, **config}
    kept = {k: v for k, v in config.items() if v != defaults[k]}
    return Case(table, label, devices, scheduler, half_steps, tuple(sorted(kept.items())))


def cases(tables, counts) -> list:
    """The cases of the named tables; identical runs in several tables are measured once (same key)."""
    top = max(counts)
    out = []
    if "table1" in tables:
        for n in counts:
            out.append(case("table1", f"DistriFusion, {n} devices", n))
            out.append(case("table1", f"DistriFusion + CFG split, {n} devices", n, split_batch=True))
            for scheme in ("row", "col", "alternate"):
                kw = dict(parallelism="naive_patch", split_scheme=scheme)
                out.append(case("table1", f"naive patches ({scheme}), {n} devices", n, **kw))
    if "gn" in tables:
        for mode in ("corrected_async_gn", "sync_gn", "stale_gn", "separate_gn", "no_sync", "full_sync"):
            out.append(case("gn", mode, top, mode=mode))
    if "warmup" in tables:
        for w in (0, 1, 2, 4, 8):
            out.append(case("warmup", f"warmup {w}", top, warmup_steps=w))
    if "steps" in tables:
        out.append(case("steps", "DDIM, full steps", top))
        out.append(case("steps", "DDIM, half the steps", top, half_steps=True))
    if "schedulers" in tables:
        out.append(case("schedulers", "DDIM, half the steps", top, half_steps=True))
        out.append(case("schedulers", "Euler, half the steps", top, "euler", True))
        out.append(case("schedulers", "DPM-Solver++, half the steps", top, "dpm-solver", True))
    if "stale" in tables:
        out.append(case("stale", "default (K/V, compute dtype)", top))
        for label, kw in (
            ("K/V bfloat16", dict(stale_kv_dtype="bfloat16")),
            ("K/V int8", dict(stale_kv_dtype="int8")),
            ("K/V float8", dict(stale_kv_dtype="float8_e4m3fn")),
            ("hidden", dict(stale_kv="hidden")),
            ("hidden int8", dict(stale_kv="hidden", stale_kv_dtype="int8")),
        ):
            out.append(case("stale", label, top, **kw))
    return out


# ---- image metrics ----
def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, for [N, H, W, C] arrays in [0, 1]; identical images give inf."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


@jax.jit
def _ssim(a, b):
    g = jnp.asarray(_gaussian_window(), jnp.float32)
    c = a.shape[-1]

    def blur(x):  # separable Gaussian, each channel alone, valid region only (as Wang et al.)
        kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
        kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
        dims = ("NHWC", "HWIO", "NHWC")
        x = jax.lax.conv_general_dilated(
            x, kh, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=c
        )
        return jax.lax.conv_general_dilated(
            x, kw, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=c
        )

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K = 0.01, 0.03) for [N, H, W, C] in
    [0, 1], averaged over channels; 1 for identical images."""
    return np.asarray(_ssim(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)), np.float64)


# ---- running ----
@dataclasses.dataclass(frozen=True)
class FidelityOptions:
    out: str
    model: str = "demo"
    prompts: int = 64
    steps: int = 50
    size: int = 256
    batch: int = 16
    device_counts: tuple = (2, 4, 8)
    tables: tuple = TABLES

    def __post_init__(self):
        unknown = sorted(set(self.tables) - set(TABLES))
        if unknown:
            raise ConfigError(f"--tables {' '.join(unknown)}: unknown; choose from {', '.join(TABLES)}")
        if self.steps < 2:
            raise ConfigError(f"--steps {self.steps}: at least 2 (the half-step cases run steps // 2)")
        if max(self.device_counts) > len(jax.devices()):
            raise ConfigError(
                f"--device-counts {max(self.device_counts)}: JAX sees {len(jax.devices())} device(s)"
            )


class Runner:
    """Generates the prompts for a case, in batches with fixed seeds (batch i uses seed i)."""

    def __init__(self, o: FidelityOptions):
        self.o = o
        self.prompts = heldout_prompts(o.prompts)
        self.load = lambda config: DistriSDXLPipeline.from_pretrained(o.model, config, dtype=jnp.float32)

    def config(self, c: Case) -> DistriConfig:
        return DistriConfig(height=self.o.size, width=self.o.size, devices=c.devices, **dict(c.config))

    def steps(self, c: Case) -> int:
        return self.o.steps // 2 if c.half_steps else self.o.steps

    def check(self, todo: list) -> None:
        """Every case's layout against the model and its step count against its scheduler, before any run
        (an image size whose latent rows do not split into a device count's bands is one line, not an
        error after an hour of other cases)."""
        files = read_model(resolve_model_path(self.o.model))
        for c in todo:
            self.config(c).check_model(files.unet, c.devices)
            check_steps(make_scheduler_of(files, c.scheduler), self.steps(c), "--steps")

    def images(self, c: Case) -> tuple:
        o = self.o
        pipe = self.load(self.config(c))
        steps = self.steps(c)
        out, seconds = [], 0.0
        texts = [p for p, _ in self.prompts]
        for i in range(0, len(texts), o.batch):
            t0 = time.perf_counter()
            r = pipe(
                texts[i : i + o.batch],
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                seed=i // o.batch,
                scheduler=c.scheduler,
                output_type="np",
            )
            seconds += time.perf_counter() - t0 - r.timings["compile_s"]
            out.append(r.images)
        return np.concatenate(out), seconds


def summary(values) -> dict:
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    return {
        "mean": float(finite.mean()) if finite.size else float("inf"),
        "std": float(finite.std()) if finite.size else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "identical": int((~np.isfinite(v)).sum()),
    }


def run_fidelity(o: FidelityOptions, log=print) -> dict:
    todo = cases(o.tables, o.device_counts)
    runner, refs = Runner(o), {}
    runner.check(todo)
    out = Path(o.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    settings = {"model": o.model, "prompts": o.prompts, "steps": o.steps, "size": o.size, "batch": o.batch}
    if results.get("settings", settings) != settings:
        raise ConfigError(
            f"{results_path} holds results for {results['settings']}: pass another --out or the same options"
        )
    results["settings"] = settings
    out.mkdir(parents=True, exist_ok=True)
    for c in todo:
        ref = c.reference
        if ref.key not in refs:
            refs[ref.key] = reference_images(runner, ref, out, results, log)
        if c.key not in results.setdefault("cases", {}):
            t0 = time.perf_counter()
            images, seconds = runner.images(c)
            p, s = psnr(images, refs[ref.key]), ssim(images, refs[ref.key])
            results["cases"][c.key] = {"psnr": p.tolist(), "ssim": s.tolist(), "seconds": seconds}
            write_json(results_path, results)
            if c.table == "table1":
                save_array(out / "samples" / f"{sample_name(c)}.npy", to_uint8(images[:4]))
            log(
                f"{c.table:<10} {c.label:<40} PSNR {summary(p)['mean']:6.2f} dB  SSIM {s.mean():.4f}"
                f"  ({time.perf_counter() - t0:.0f} s)"
            )
        (out / "tables.md").write_text(tables_markdown(o, todo, results))
    shown = {"1 device": to_uint8(refs[todo[0].reference.key][:4])} if todo else {}
    for c in todo:
        path = out / "samples" / f"{sample_name(c)}.npy"
        if c.table == "table1" and path.is_file():
            shown[c.label] = np.load(path, allow_pickle=False)
    if len(shown) > 1:
        sample_grid(out / "samples.png", shown)
    return results


def sample_name(c: Case) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in c.key)


def to_uint8(images) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8)


def save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def reference_images(runner: Runner, ref: Case, out: Path, results: dict, log) -> np.ndarray:
    """The one-device images of a (scheduler, steps): kept as OUT/ref-*.npy (uint8) so a resumed run reuses
    them, with the pixel check of each against its prompt."""
    path = out / f"ref-{ref.scheduler}-{'half' if ref.half_steps else 'full'}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False).astype(np.float32) / 255
    t0 = time.perf_counter()
    images, seconds = runner.images(ref)
    u8 = to_uint8(images)
    checks = [check_image(im, meta) for im, (_, meta) in zip(u8, runner.prompts)]
    results.setdefault("references", {})[ref.key] = {
        "seconds": seconds,
        "agree": sum(c["ok"] for c in checks),
        "agree_colour": sum(c["ok_colour"] for c in checks),
        "agree_position": sum(c["ok_position"] for c in checks),
        "n": len(checks),
    }
    write_json(out / "results.json", results)
    save_array(path, u8)
    agree = results["references"][ref.key]
    log(
        f"reference  {ref.scheduler}, {'half' if ref.half_steps else 'all'} steps, 1 device: prompt check "
        f"{agree['agree']}/{agree['n']}  ({time.perf_counter() - t0:.0f} s)"
    )
    return u8.astype(np.float32) / 255


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def tables_markdown(o: FidelityOptions, todo: list, results: dict) -> str:
    lines = [
        f"Model `{o.model}`, {o.prompts} held-out prompts, {o.size}x{o.size}, CFG {GUIDANCE:g}, "
        f"{o.steps} steps unless the row says half ({o.steps // 2}), warmup {WARMUP} unless the row says, "
        "no CFG split unless the row says. PSNR (dB) and SSIM of each image vs the one-device image with "
        "the same scheduler and steps: mean +- standard deviation [minimum]; identical images (infinite "
        "PSNR) are counted apart.",
        "",
    ]
    for ref_key, r in sorted(results.get("references", {}).items()):
        lines.append(
            f"- one device, {ref_key.split('/')[0]}, {ref_key.split('/')[1]} steps: the prompt check agrees on "
            f"{r['agree']}/{r['n']} images ({100 * r['agree'] / r['n']:.0f}%; colour {r['agree_colour']}, "
            f"side {r['agree_position']}); {r['seconds']:.0f} s"
        )
    for table in TABLES:
        rows = [c for c in todo if c.table == table]
        if not rows:
            continue
        lines += [
            "",
            f"### {table}",
            "",
            "| case | PSNR (dB) | SSIM | identical | s |",
            "|---|---|---|---|---|",
        ]
        for c in rows:
            e = results.get("cases", {}).get(c.key)
            if e is None:
                lines.append(f"| {c.label} | (not yet run) | | | |")
                continue
            p, s = summary(e["psnr"]), summary(e["ssim"])
            psnr_text = (
                "inf"
                if p["identical"] == len(e["psnr"])
                else f"{p['mean']:.2f} +- {p['std']:.2f} [{p['min']:.2f}]"
            )
            lines.append(
                f"| {c.label} | {psnr_text} | {s['mean']:.4f} +- {s['std']:.4f} [{s['min']:.4f}] "
                f"| {p['identical']}/{len(e['psnr'])} | {e['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def sample_grid(path: Path, named: dict) -> None:
    """Rows: cases (uint8 [n, H, W, 3] each); columns: the first prompts."""
    names = list(named)
    n, h, w = len(named[names[0]]), named[names[0]].shape[1], named[names[0]].shape[2]
    label_w = 260
    grid = Image.new("RGB", (label_w + n * w, len(names) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        draw.text((6, r * h + h // 2 - 6), name, fill="black")
        for k, im in enumerate(named[name][:n]):
            tile = Image.fromarray(im)
            grid.paste(tile, (label_w + k * w, r * h))
    grid.save(path)


def run(args) -> None:
    cpu_devices(max(args.device_counts))
    o = options_from(FidelityOptions, args)
    t0 = time.perf_counter()
    run_fidelity(o)
    print(f"wrote {Path(o.out) / 'tables.md'} in {(time.perf_counter() - t0) / 60:.1f} min")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = option_defaults(FidelityOptions)
    p.add_argument(
        "--out", required=True, help="results folder (results.json, tables.md, samples.png); resumes"
    )
    p.add_argument(
        "--model", default=d["model"], help="pipeline folder or 'demo' (default: the bundled demo model)"
    )
    p.add_argument(
        "--prompts", type=positive, default=d["prompts"], help="held-out prompts (default %(default)s)"
    )
    p.add_argument("--steps", type=positive, default=d["steps"], help="denoising steps (default %(default)s)")
    p.add_argument(
        "--size", type=positive, default=d["size"], help="image size in pixels (default %(default)s)"
    )
    p.add_argument(
        "--batch", type=positive, default=d["batch"], help="prompts per pipeline call (default %(default)s)"
    )
    add_device_counts(
        p, list(d["device_counts"]), "device counts (default: 2 4 8; the ablations use the largest)"
    )
    p.add_argument(
        "--tables", nargs="+", default=list(d["tables"]), metavar="TABLE", help=f"of {', '.join(TABLES)}"
    )


def main(argv=None) -> int:
    p = parser(__doc__, "fidelity")
    add_arguments(p)
    return run_command(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
