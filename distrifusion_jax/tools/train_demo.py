"""Train the demo model from scratch on the procedural scenes: the VAE, then the UNet; writes a pipeline folder.

    python -m distrifusion_jax.tools.train_demo --out demo-model [--vae-steps 600] [--steps 5500]
        [--batch 16] [--seed 0] [--size 256]

The text encoders are the preset's random ones, frozen (their embeddings of different captions differ,
which is all the UNet needs to condition on); the VAE trains on random crops of `--vae-crop` pixels
(it is convolutional), its latent scale is then measured so latents have unit variance, and the UNet
trains on the VAE's latents of whole images. Checkpoints (safetensors, never pickles) are written every
`--checkpoint-every` steps under OUT/checkpoints/; rerunning the same command resumes from them. The
result is OUT/pipeline, a converted pipeline folder `DistriSDXLPipeline.from_pretrained` loads, with a
loss curve OUT/loss.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .. import keymap
from ..convert import write_converted
from ..errors import ConfigError
from ..flags import run_command, seed_arg
from ..models.presets import preset_dict, scheduler_preset, unet_preset, vae_preset
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..pipeline import DistriSDXLPipeline
from ..schedulers import scheduler_from_config
from .command import option_defaults, options_from, parser, positive
from .demo_data import make_batch
from .random_pipeline import write_random_pipeline
from .train_steps import TIME_IDS, drop_captions, images_to_unit, make_step, unet_loss, vae_loss


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    out: str
    preset: str = "tiny-sdxl"
    vae_steps: int = 600
    unet_steps: int = 5500
    # the last high_noise_steps UNet steps draw timesteps with density ~ t^(power - 1): more high-noise steps,
    # where layout and colour are decided (docs/demo-model.md: prompt agreement 73% -> 84% on 256 prompts)
    high_noise_steps: int = 1000
    high_noise_power: float = 2.0
    batch: int = 16
    train_images: int = 6144
    vae_batch: int = 8
    vae_crop: int = 128
    size: int = 256
    seed: int = 0
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-6
    ema_decay: float = 0.999  # the VAE's
    unet_ema_decay: float = 0.995  # short: at 2000 steps the 0.999 average still lagged the raw weights
    snr_gamma: float = 5.0
    offset_noise: float = 0.1
    caption_dropout: float = 0.1
    checkpoint_every: int = 200

    def __post_init__(self):
        if self.size % 8 or self.vae_crop % 8 or self.vae_crop > self.size:
            raise ConfigError(
                f"--size {self.size} and --vae-crop {self.vae_crop}: multiples of 8, crop <= size"
            )
        if self.train_images < self.batch:
            raise ConfigError(f"--train-images {self.train_images}: at least --batch ({self.batch})")
        if not 0 <= self.high_noise_steps <= self.unet_steps or self.high_noise_power < 1:
            raise ConfigError(
                f"--high-noise-steps {self.high_noise_steps}: in [0, --steps]; --high-noise-power "
                f"{self.high_noise_power}: at least 1"
            )
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout={self.caption_dropout}: a share in [0, 1)")


# ---- checkpoints: a pytree's leaves in order, as safetensors (restored into a template's structure) ----
def save_tree(path: Path, tree, meta: dict) -> None:
    leaves = jax.tree.leaves(tree)
    tensors = {f"{i:06d}": np.asarray(a) for i, a in enumerate(leaves)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)  # whole or not at all


def load_tree(path: Path, template, meta_only: bool = False):
    """(the tree saved at `path` in `template`'s structure and dtypes, its meta dict); (None, meta) with meta_only."""
    with safe_open(str(path), "numpy") as f:
        meta = json.loads(f.metadata()["meta"])
    if meta_only:
        return None, meta
    tensors = load_file(str(path))
    leaves, treedef = jax.tree.flatten(template)
    if len(tensors) != len(leaves):
        raise ConfigError(
            f"{path}: a checkpoint of another model ({len(tensors)} arrays, expected {len(leaves)})"
        )
    restored = [jnp.asarray(tensors[f"{i:06d}"], t.dtype) for i, t in enumerate(leaves)]
    return jax.tree.unflatten(treedef, restored), meta


# ---- data ----
def batch_seeds(o: TrainOptions, stage: int, step: int, n: int) -> list:
    """Training scene seeds of one step: deterministic, different for every step and stage."""
    base = (o.seed * 7919 + stage * 1_000_003 + step) * n
    return [(base + i) % 10**9 for i in range(n)]


def random_crops(images: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A crop x crop window of each image at a random place."""
    h = images.shape[1]
    ys, xs = rng.integers(0, h - crop + 1, (2, len(images)))
    return np.stack([im[y : y + crop, x : x + crop] for im, y, x in zip(images, ys, xs)])


# ---- one stage: resumable loop with a progress bar ----
def train_stage(name, step_fn, optimizer, params, steps, batch_fn, ckpt: Path, every: int):
    """Run `steps` steps from the checkpoint if there is one; returns (EMA params, losses)."""
    state, losses, start = (params, optimizer.init(params), params), [], 0
    if ckpt.is_file():
        state, meta = load_tree(ckpt, state)
        losses, start = meta["losses"], meta["step"]
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, unit="step")
    for i in bar:
        *state, loss, _ = step_fn(*state, i, *batch_fn(i))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if (i + 1) % every == 0 or i + 1 == steps:
            save_tree(ckpt, tuple(state), {"step": i + 1, "losses": losses})
    bar.close()
    return state[2], losses


def unet_data(o: TrainOptions, path: Path, vae, vae_params, scale: float, encode_text) -> dict:
    """The UNet's training set, computed once and kept at `path`: `train_images` scenes' scaled VAE latents
    and their captions' embeddings (the text encoders are frozen, so both are fixed). Encoding on the fly
    cost 0.065 s per image on this 2-core CPU, 1 s of every 2.5 s step at batch 16."""
    meta = {"images": o.train_images, "size": o.size, "seed": o.seed, "scale": scale}
    if path.is_file():
        with safe_open(str(path), "numpy") as f:
            if json.loads(f.metadata()["meta"]) == meta:
                return load_file(str(path))
    to_latent = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method=vae.encode)[0] * scale)
    parts = {"latents": [], "embeds": [], "pooled": []}
    chunk = 32
    for start in tqdm(range(0, o.train_images, chunk), desc="encoding the UNet's training set", unit="batch"):
        n = min(chunk, o.train_images - start)
        images, captions = make_batch(batch_seeds(o, 1, start // chunk, chunk)[:n], o.size)
        embeds, pooled = encode_text(captions)
        for k, v in zip(parts, (to_latent(images_to_unit(images)), embeds, pooled)):
            parts[k].append(np.asarray(v, np.float32))
    data = {k: np.concatenate(v) for k, v in parts.items()}
    tmp = path.with_suffix(".tmp")
    save_file(data, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)
    return data


def latent_scale(vae, params, o: TrainOptions) -> float:
    """1 / std of the posterior means over 64 training images: SD's recipe for the latent scaling factor."""
    images, _ = make_batch(batch_seeds(o, 9, 0, 64), o.size)
    encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode)[0])
    means = np.concatenate([np.asarray(encode(images_to_unit(images[i : i + 8]))) for i in range(0, 64, 8)])
    return float(1.0 / means.std())


def loss_curve(path: Path, curves: dict) -> None:
    """A loss-curve PNG (log scale, one panel per stage), drawn with PIL."""
    w, h, pad = 480, 220, 30
    img = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, losses) in enumerate(curves.items()):
        y = np.log10(
            np.maximum(
                np.convolve(losses, np.ones(10) / 10, mode="valid") if len(losses) > 10 else losses, 1e-8
            )
        )
        lo, hi = float(y.min()), float(y.max()) + 1e-9
        pts = [
            (
                k * w + pad + (w - 2 * pad) * i / max(1, len(y) - 1),
                h - pad - (h - 2 * pad) * (v - lo) / (hi - lo),
            )
            for i, v in enumerate(y)
        ]
        draw.line(pts, fill="navy", width=2)
        draw.text(
            (k * w + pad, 5),
            f"{name}: {10**hi:.3g} -> {10 ** y[-1]:.3g} (log scale, {len(losses)} steps)",
            fill="black",
        )
    img.save(path)


# ---- the whole run ----
def train(o: TrainOptions) -> Path:
    out = Path(o.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    start = out / "start"  # the random text encoders, tokenizers and scheduler the pipeline keeps
    if not start.is_dir():
        shutil.rmtree(out / ".start.partial", ignore_errors=True)
        write_random_pipeline(out / ".start.partial", o.preset, seed=o.seed).replace(start)

    vae = AutoencoderKL(vae_preset(o.preset))
    clipped = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    vae_opt, unet_opt = clipped(o.vae_lr), clipped(o.unet_lr)
    vae_step = make_step(lambda p, x, k: vae_loss(vae, p, x, k, o.kl_weight), vae_opt, o.ema_decay)

    def vae_batch(i):
        images, _ = make_batch(batch_seeds(o, 0, i, o.vae_batch), o.size)
        # crops drawn from (seed, step): a resumed run crops alike
        crops = random_crops(images, o.vae_crop, np.random.default_rng((o.seed, i)))
        return images_to_unit(crops), jax.random.key(i)

    vae_params, vae_losses = train_stage(
        "VAE",
        vae_step,
        vae_opt,
        vae.init_params(o.seed),
        o.vae_steps,
        vae_batch,
        out / "checkpoints" / "vae.safetensors",
        o.checkpoint_every,
    )
    scale = latent_scale(vae, vae_params, o)
    vae_config = dict(preset_dict(o.preset, "vae"), scaling_factor=scale)

    pipe = DistriSDXLPipeline.from_pretrained(str(start), dtype=jnp.float32)
    encode_text = lambda captions: pipe.prompt_encoder.encode(captions, captions)
    unet = UNet2DConditionModel(unet_preset(o.preset))
    alphas = jnp.asarray(scheduler_from_config(scheduler_preset()).alphas_cumprod(), jnp.float32)
    time_ids = jnp.asarray([TIME_IDS(o.size)] * o.batch, jnp.float32)
    steps = {}
    for power in (1.0, o.high_noise_power):
        loss = functools.partial(
            unet_loss,
            unet,
            time_ids=time_ids,
            alphas_cumprod=alphas,
            snr_gamma=o.snr_gamma,
            offset_noise=o.offset_noise,
            t_power=power,
        )
        steps[power] = make_step(
            lambda p, lat, e, pooled, k, f=loss: f(p, lat, e, pooled, key=k), unet_opt, o.unet_ema_decay
        )
    switch = o.unet_steps - o.high_noise_steps  # from this step on, the high-noise timestep density

    def unet_step(params, opt_state, ema, i, *batch):
        return steps[o.high_noise_power if i >= switch else 1.0](params, opt_state, ema, i, *batch)

    data = unet_data(o, out / "checkpoints" / "unet_data.safetensors", vae, vae_params, scale, encode_text)

    def unet_batch(i):
        # a fixed set of `train_images` scenes, encoded once; each step draws a batch from (seed, step)
        pick = np.random.default_rng((o.seed, 1, i)).choice(o.train_images, o.batch, replace=False)
        key_drop, key = jax.random.split(jax.random.key(10**6 + i))
        embeds, pooled = drop_captions(
            data["embeds"][pick], data["pooled"][pick], key_drop, o.caption_dropout
        )
        return jnp.asarray(data["latents"][pick]), embeds, pooled, key

    unet_params, unet_losses = train_stage(
        "UNet",
        unet_step,
        unet_opt,
        unet.init_params(o.seed),
        o.unet_steps,
        unet_batch,
        out / "checkpoints" / "unet.safetensors",
        o.checkpoint_every,
    )
    loss_curve(out / "loss.png", {"VAE": vae_losses, "UNet": unet_losses})
    return write_pipeline(out, start, vae_params, vae_config, unet_params, o)


def write_pipeline(
    out: Path, start: Path, vae_params, vae_config: dict, unet_params, o: TrainOptions
) -> Path:
    """OUT/pipeline: the start folder (text encoders, tokenizers, scheduler) with the trained VAE and UNet,
    staged in a hidden folder and renamed into place."""
    staged, final = out / ".pipeline.partial", out / "pipeline"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(start, staged)
    steps = f"VAE {o.vae_steps} + UNet {o.unet_steps} steps"
    source = f"distrifusion_jax.tools.train_demo ({o.preset}, seed {o.seed}, {steps})"
    for name, params, config in (
        ("vae", vae_params, vae_config),
        ("unet", unet_params, preset_dict(o.preset, "unet")),
    ):
        flat = {k: np.asarray(v, np.float32) for k, v in keymap.flatten(params).items()}
        shutil.rmtree(staged / name)
        write_converted(staged / name, flat, config, source, "float32", progress=False)
    shutil.rmtree(final, ignore_errors=True)
    staged.replace(final)
    return final


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = option_defaults(TrainOptions)
    p.add_argument(
        "--out", required=True, help="output folder (checkpoints/, loss.png, pipeline/); rerun to resume"
    )
    p.add_argument(
        "--preset", default=d["preset"], help="bundled model configs to train (default: %(default)s)"
    )
    p.add_argument(
        "--vae-steps", type=positive, default=d["vae_steps"], help="VAE steps (default %(default)s)"
    )
    p.add_argument(
        "--unet-steps",
        "--steps",
        dest="unet_steps",
        type=positive,
        default=d["unet_steps"],
        help="UNet steps (default %(default)s)",
    )
    p.add_argument(
        "--high-noise-steps",
        type=int,
        default=d["high_noise_steps"],
        help="the last N UNet steps draw more high-noise timesteps (density ~ t^(power - 1); default %(default)s)",
    )
    p.add_argument(
        "--high-noise-power",
        type=float,
        default=d["high_noise_power"],
        help="the power of that density (2: rising linearly with t; 1: uniform; default %(default)s)",
    )
    p.add_argument("--batch", type=positive, default=d["batch"], help="UNet batch (default %(default)s)")
    p.add_argument("--vae-batch", type=positive, default=d["vae_batch"])
    p.add_argument(
        "--train-images",
        type=positive,
        default=d["train_images"],
        help="scenes in the UNet's training set, encoded once (default %(default)s)",
    )
    p.add_argument(
        "--vae-crop",
        type=positive,
        default=d["vae_crop"],
        help="VAE training crop in pixels (default %(default)s)",
    )
    p.add_argument(
        "--size", type=positive, default=d["size"], help="image size in pixels (default %(default)s)"
    )
    p.add_argument("--seed", type=seed_arg, default=d["seed"], help="0 <= SEED < 2^63 (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=positive, default=d["checkpoint_every"])


def run(args) -> None:
    options = options_from(TrainOptions, args)
    t0 = time.perf_counter()
    folder = train(options)
    print(f"wrote {folder} in {(time.perf_counter() - t0) / 60:.1f} min")


def main(argv=None) -> int:
    p = parser(__doc__, "train_demo")
    add_arguments(p)
    return run_command(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
