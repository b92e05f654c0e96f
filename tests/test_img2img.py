"""img2img: `image=` / `strength=` equal diffusers' StableDiffusionXLImg2ImgPipeline on a tiny checkpoint; the
row-sharded VAE encode equals one device's; the loop started mid-schedule (warmup counted from the first step
run, the stepwise path equal to the one-program loop); argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import HEIGHT, PSNR_MIN, WIDTH, psnr, tiny_sdxl

import distrifusion_jax as dj
from distrifusion_jax.arguments import check_strength
from distrifusion_jax.pipeline import DistriSDXLPipeline
from helpers import micro_setup, rel_l2, sdxl_scheduler_config

PROMPT, NEGATIVE = "a red cube on a table", "blurry"
STEPS, STRENGTH = 5, 0.6  # steps 2, 3, 4 of 5 run (diffusers: int(5 * 0.6) = 3)
SEED = 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl_img2img")
    return folder, tiny_sdxl(folder)


@pytest.fixture(scope="module")
def ours(checkpoint):
    """(devices, mode, warmup) -> our float32 pipeline on the tiny checkpoint, built once."""
    folder, _ = checkpoint
    built = {}

    def get(devices, mode="full_sync", warmup_steps=4):
        key = (devices, mode, warmup_steps)
        if key not in built:
            config = dj.DistriConfig(HEIGHT, WIDTH, devices=devices, mode=mode, warmup_steps=warmup_steps)
            built[key] = DistriSDXLPipeline.from_pretrained(folder, config, dtype=jnp.float32)
        return built[key]

    return get


def init_image() -> Image.Image:
    """A smooth colour gradient with a bright square: structure the encode and a low strength keep."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    rgb = np.stack([x, y, 0.5 * (1 - x)], axis=-1)
    rgb[40:90, 60:120] = (0.9, 0.8, 0.1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def diffusers_noise(seed: int, image_batch: int = 1, n: int = 1):
    """The two draws diffusers' img2img makes from one CPU generator: the VAE posterior's sample noise
    (latent_dist.sample), then the noise add_noise mixes in; both (B, 4, h, w) float32."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, HEIGHT // 8, WIDTH // 8)
    return torch.randn((image_batch, *shape), generator=g).numpy(), torch.randn(
        (n, *shape), generator=g
    ).numpy()


def reference(pipe, scheduler: str, image, seed: int, steps=STEPS, strength=STRENGTH):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
    )

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm-solver": DPMSolverMultistepScheduler}
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
    img2img.scheduler = cls[scheduler].from_config(pipe.scheduler.config)
    with torch.no_grad():
        return img2img(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=image,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images


def generate(pipe, scheduler: str, image, seed: int, steps=STEPS, strength=STRENGTH, **kw):
    posterior, noise = diffusers_noise(seed)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        image=image,
        strength=strength,
        image_noise=posterior,
        latents=noise,
        output_type="np",
        scheduler=scheduler,
        **kw,
    ).images


@pytest.mark.parametrize(
    "scheduler, devices",
    [
        pytest.param(s, n, marks=[] if (s, n) == ("euler", 1) else [pytest.mark.slow])
        for s in ("ddim", "euler", "dpm-solver")
        for n in (1, 8)
    ],
)
def test_img2img_equals_diffusers(checkpoint, ours, scheduler, devices):
    _, pipe = checkpoint
    image = init_image()
    ref = reference(pipe, scheduler, image, SEED)
    out = generate(ours(devices), scheduler, image, SEED)
    value = psnr(out, ref)
    print(
        f"img2img {scheduler}, strength {STRENGTH} of {STEPS} steps, {devices} device(s) full_sync: {value:.1f} dB"
    )
    assert out.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    assert value >= PSNR_MIN


def test_row_sharded_encode_equals_one_device_encode(ours):
    """Eight bands of 16 pixel rows (2 latent rows each): halos, GroupNorm statistics and the mid-block's K/V
    exchanged synchronously, so the latents equal one device's."""
    sharded, single = ours(8).encoder, ours(1).encoder
    rng = np.random.default_rng(2)
    pixels = rng.uniform(-1, 1, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    noise = rng.standard_normal((2, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    assert sharded.parallel_for(pixels) and not single.parallel_for(pixels)
    a = np.asarray(sharded(ours(8).vae_params, pixels, noise))
    b = np.asarray(single(ours(1).vae_params, pixels, noise))
    print(f"row-sharded encode on 8 devices vs one: relative L2 {rel_l2(a, b):.1e}")
    assert a.shape == (2, HEIGHT // 8, WIDTH // 8, 4)
    assert rel_l2(a, b) <= 1e-5
    mean = np.asarray(
        single(ours(1).vae_params, pixels, np.zeros_like(noise))
    )  # zero noise: the posterior mean
    assert 0 < rel_l2(mean, b) < 1


@pytest.mark.slow
def test_displaced_img2img_on_four_devices_is_close_to_one_device(ours):
    """corrected_async_gn with warmup 1: of steps 2..7 (strength 0.75 of 8), 2 and 3 synchronous, then displaced;
    the progress path (one program per step) reports the 6 steps run and gives the loop's image."""
    image, steps, strength = init_image(), 8, 0.75
    displaced = ours(4, "corrected_async_gn", 1)
    one = generate(ours(1), "ddim", image, SEED, steps, strength)
    loop = generate(displaced, "ddim", image, SEED, steps, strength)
    seen = []
    stepwise = generate(
        displaced, "ddim", image, SEED, steps, strength, progress=lambda i, n: seen.append((i, n))
    )
    value = psnr(loop, one)
    print(f"img2img corrected_async_gn, warmup 1, 4 devices vs 1 device: PSNR {value:.1f} dB")
    assert 25 < value < float("inf")
    assert seen == [(i, 6) for i in range(7)]
    assert np.abs(stepwise - loop).max() <= 1e-5


@pytest.mark.parametrize("steps", [10, 20])  # DPM-Solver++'s last step: first order below 15 steps
@pytest.mark.parametrize("name", ["ddim", "euler", "dpm-solver"])
def test_schedulers_started_mid_schedule_match_diffusers(name, steps):
    """add_noise at t_start, then steps t_start .. n - 1 with the scheduler's begin index set, as diffusers'
    img2img runs them; a fake model (elementwise in the sample) stands in for the UNet."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm-solver": DPMSolverMultistepScheduler}
    config = sdxl_scheduler_config()
    ref, sched = cls[name].from_config(config), dj.make_scheduler(name, config)
    ref.set_timesteps(steps)
    first = check_strength(0.45, steps)
    rng = np.random.default_rng(5)
    x0, noise = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(2))
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(first)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[first : first + 1])
    got = sched.add_noise(steps, jnp.asarray(x0), jnp.asarray(noise), first)
    assert rel_l2(got, want.numpy()) <= 1e-6
    state = sched.init(steps, got, start=first)
    for i in range(first, steps):
        t = ref.timesteps[i]
        want = ref.step(0.3 * ref.scale_model_input(want, t) + 0.1, t, want).prev_sample
        got, state = sched.step(state, 0.3 * sched.scale_model_input(state, got, i) + 0.1, i, got)
    print(f"{name}, {steps} steps from step {first}: relative error {rel_l2(got, want.numpy()):.1e}")
    assert rel_l2(got, want.numpy()) <= 1e-5


@pytest.mark.parametrize("progress", [False, True])
def test_warmup_counts_from_the_first_step_run(progress):
    """Strength 0.5 of 8 steps runs steps 4..7; with warmup 1 steps 4 and 5 are synchronous. A warmup covering
    every step run gives full_sync's latents (counted from step 0 it would leave all four displaced)."""
    unet, params, (latents, ehs, added), _ = micro_setup(128, 64)
    sched = dj.make_scheduler("dpm-solver", sdxl_scheduler_config())
    first = check_strength(0.5, 8)
    assert first == 4

    def denoiser(**fields):
        d = dj.Denoiser(unet, dj.DistriConfig(128, 64, devices=4, **fields), sched, 8, first_step=first)
        if progress:
            d.progress = lambda i, n: None
        return d

    d = denoiser(warmup_steps=1)
    assert d.num_run == 4 and d.num_sync == 2
    assert [(start, stop) for _, start, stop, _ in d._phases()] == [(4, 6), (6, 8)]
    displaced = np.asarray(d(params, latents, ehs, added))
    exact = np.asarray(denoiser(mode="full_sync")(params, latents, ehs, added))
    covered = np.asarray(denoiser(warmup_steps=3)(params, latents, ehs, added))
    print(
        f"first step 4, warmup 3 vs full_sync: {rel_l2(covered, exact):.1e}; warmup 1: {rel_l2(displaced, exact):.1e}"
    )
    assert rel_l2(covered, exact) <= 1e-5
    assert 0 < rel_l2(displaced, exact) < 0.5  # 0.14: two displaced DPM-Solver steps of the random micro UNet
    one = np.asarray(
        dj.Denoiser(unet, dj.DistriConfig(128, 64, devices=1), sched, 8, first_step=first)(
            params, latents, ehs, added
        )
    )
    assert rel_l2(exact, one) <= 1e-5


def test_bad_img2img_arguments_are_one_line_errors(ours):
    pipe, image = ours(1), init_image()
    cases = [
        (dict(strength=0.0), r"strength=0.0 is not supported: pass a number in \(0, 1\]"),
        (dict(strength=1.5), r"strength=1.5 is not supported"),
        (dict(strength="high"), r"strength='high' is not supported: pass a number"),
        (dict(strength=0.2), r"strength=0.2 with num_inference_steps=4 runs no step \(int\(4 \* 0.2\) = 0\)"),
        (
            dict(image=image.resize((64, 64))),
            r"image is 64x64 \(width x height\) but the DistriConfig is for 192x128",
        ),
        (dict(image=np.zeros((2, HEIGHT, WIDTH, 3), np.uint8)), r"2 images for 1 generated image"),
        (dict(image=np.full((HEIGHT, WIDTH, 3), 2.0)), r"image values span \[2, 2\]: float images must be"),
        (dict(image="cat.png"), r"image='cat.png' is not supported: pass a PIL image"),
        (
            dict(image_noise=np.zeros((1, 4, 8, 8))),
            r"image_noise have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 24\)",
        ),
    ]
    for kw, match in cases:
        kw = {"image": image, **kw}
        with pytest.raises(dj.ConfigError, match=match) as e:
            pipe("x", num_inference_steps=4, output_type="latent", **kw)
        assert "\n" not in str(e.value)


# ---- the high-res fix, and img2img from the command line ----
def test_hires_fix_is_a_base_pass_upscaled_then_img2img(checkpoint, ours):
    """hires_fix = the pipeline at the base size, Lanczos to the DistriConfig's size, img2img there (2 devices)."""
    folder, _ = checkpoint
    pipe = ours(2)
    kw = dict(seed=SEED, scheduler="euler", guidance_scale=5.0)
    out = pipe.hires_fix(
        PROMPT, (HEIGHT // 2, WIDTH // 2), strength=0.6, num_inference_steps=5, base_steps=3, **kw
    )
    small = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT // 2, WIDTH // 2, devices=2), dtype=jnp.float32
    )(PROMPT, num_inference_steps=3, **kw).images[0]
    want = pipe(
        PROMPT, image=small.resize((WIDTH, HEIGHT), Image.LANCZOS), strength=0.6, num_inference_steps=5, **kw
    )
    assert out.images[0].size == (WIDTH, HEIGHT) and "base_denoise_s" in out.timings
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(want.images[0]))
    assert pipe.distri_config.height == HEIGHT  # the base pass's size was only borrowed
    with pytest.raises(dj.ConfigError):  # a base size the UNet cannot take: one line, before any work
        pipe.hires_fix(PROMPT, (HEIGHT // 2 + 8, WIDTH), num_inference_steps=2)


def test_generate_image_and_hires_flags(checkpoint, tmp_path, monkeypatch, capsys):
    import jax

    from distrifusion_jax import cli, pipeline

    jax.devices()  # the session's 8 fake devices start before the CLI's --devices could ask for fewer
    folder, _ = checkpoint
    init_image().save(tmp_path / "in.png")
    args = ["generate", "--model", str(folder), "--prompt", "x", "--steps", "3", "--devices", "1"]
    args += ["--dtype", "float32", "--compile-cache", "off", "--no-progress"]
    size = ["--height", str(HEIGHT), "--width", str(WIDTH)]
    out = tmp_path / "out.png"
    assert (
        cli.main(
            args + size + ["--image", str(tmp_path / "in.png"), "--strength", "0.7", "--output", str(out)]
        )
        == 0
    )
    assert Image.open(out).size == (WIDTH, HEIGHT)

    def fail(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.DistriPipeline, "from_pretrained", classmethod(fail))
    bad = [
        (
            ["--height", "64", "--width", "64", "--image", str(tmp_path / "in.png"), "--strength", "0.7"],
            f"is {WIDTH}x{HEIGHT}",
        ),
        (size + ["--image", str(tmp_path / "in.png"), "--strength", "0"], "strength=0"),
        (size + ["--image", str(tmp_path / "missing.png"), "--strength", "0.7"], "cannot read it"),
        (size + ["--hires-size", "100"], "multiple of 8"),
        (size + ["--hires-size", "256", "--image", str(tmp_path / "in.png")], "pass one"),
    ]
    for extra, message in bad:
        capsys.readouterr()
        rc = cli.main(args + extra + ["--output", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (extra, err)
