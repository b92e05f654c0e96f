"""End to end: our DistriSDXLPipeline equals diffusers' StableDiffusionXLPipeline on a tiny checkpoint."""

from importlib import resources

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import distrifusion_jax as dj
from distrifusion_jax.pipeline import DistriSDXLPipeline
from helpers import rel_l2

HEIGHT, WIDTH = 128, 192
PSNR_MIN = 40.0  # dB, float32


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def tiny_sdxl(folder):
    """A tiny random SDXL pipeline built with diffusers/transformers and saved with save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = str(resources.files("distrifusion_jax").joinpath("assets/clip-tokenizer"))
    text = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        eos_token_id=2,
        bos_token_id=0,
        pad_token_id=1,
    )
    enc1 = CLIPTextModel(CLIPTextConfig(**text, hidden_act="quick_gelu"))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_act="gelu", projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        attention_head_dim=[1, 2],
        block_out_channels=[8, 16],
        cross_attention_dim=32,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=16 + 6 * 4,
        transformer_layers_per_block=[1, 1],
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    with torch.no_grad():
        for model in (enc1, enc2, unet, vae):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05 + 0.01)
    import json

    sched_cfg = json.loads(
        resources.files("distrifusion_jax")
        .joinpath("configs/sdxl-base-1.0/scheduler/scheduler_config.json")
        .read_text()
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=enc1.eval(),
        text_encoder_2=enc2.eval(),
        unet=unet.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"),
        scheduler=EulerDiscreteScheduler.from_config(sched_cfg),
    )
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    return folder, tiny_sdxl(folder)


def reference(pipe, scheduler: str, latents, steps=4, **kw):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm-solver": DPMSolverMultistepScheduler}
    pipe.scheduler = cls[scheduler].from_config(pipe.scheduler.config)
    with torch.no_grad():
        return pipe(
            prompt="a red cube on a table",
            negative_prompt="blurry",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=steps,
            guidance_scale=5.0,
            latents=torch.from_numpy(latents),
            output_type="np",
            **kw,
        ).images


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("devices, mode", [(1, "full_sync"), (8, "full_sync")])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm-solver"])
def test_images_equal_diffusers(checkpoint, latents, scheduler, devices, mode):
    folder, pipe = checkpoint
    ref = reference(pipe, scheduler, latents)
    ours = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT, WIDTH, devices=devices, mode=mode), dtype=jnp.float32
    )
    out = ours(
        "a red cube on a table",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=latents,
        output_type="np",
        scheduler=scheduler,
    )
    value = psnr(out.images, ref)
    print(f"{scheduler}, {devices} device(s) {mode}: PSNR {value:.1f} dB")
    assert out.images.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    assert value >= PSNR_MIN


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_batch_rescale_micro_conditioning_equal_diffusers(checkpoint, devices):
    """Two prompts, no negative prompt (zeros, as SDXL forces), guidance_rescale, custom size conditioning."""
    folder, pipe = checkpoint
    lat = np.random.default_rng(1).standard_normal((2, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    kw = dict(
        guidance_rescale=0.5, original_size=(512, 768), target_size=(128, 192), crops_coords_top_left=(8, 0)
    )
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(
            prompt=["a red cube", "a green sphere"],
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=3,
            guidance_scale=6.0,
            latents=torch.from_numpy(lat),
            output_type="np",
            **kw,
        ).images
    ours = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT, WIDTH, devices=devices, mode="full_sync"), dtype=jnp.float32
    )
    out = ours(
        ["a red cube", "a green sphere"],
        num_inference_steps=3,
        guidance_scale=6.0,
        latents=lat,
        output_type="np",
        **kw,
    )
    value = psnr(out.images, ref)
    print(f"batch of 2, guidance_rescale 0.5, {devices} device(s): PSNR {value:.1f} dB")
    assert value >= PSNR_MIN
    assert psnr(out.images[0], out.images[1]) < 30  # two prompts, two different images


def test_displaced_pipeline_reuses_its_program_and_returns_pil(checkpoint):
    folder, _ = checkpoint
    ours = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT, WIDTH, devices=8, warmup_steps=1), dtype=jnp.float32
    )
    seen = []
    first = ours("a cube", num_inference_steps=4, seed=3, progress=lambda i, n: seen.append((i, n)))
    second = ours("a sphere", num_inference_steps=4, seed=3, guidance_scale=7.0, progress=lambda i, n: None)
    assert first.timings["compiled"] and not second.timings["compiled"]
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # 0: compiled, denoising starts
    assert len(first.images) == 1 and first.images[0].size == (WIDTH, HEIGHT)
    single = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT, WIDTH, devices=1), dtype=jnp.float32
    )
    a = ours("a cube", num_inference_steps=4, seed=3, output_type="np").images
    b = single("a cube", num_inference_steps=4, seed=3, output_type="np").images
    print(f"corrected_async_gn, warmup 1, 8 devices vs 1 device: PSNR {psnr(a, b):.1f} dB")
    assert psnr(a, b) > 25


def test_bad_pipeline_inputs(checkpoint, tmp_path, monkeypatch):
    folder, _ = checkpoint
    ours = DistriSDXLPipeline.from_pretrained(
        folder, dj.DistriConfig(HEIGHT, WIDTH, devices=1), dtype=jnp.float32
    )
    with pytest.raises(
        dj.DistriFusionError, match=r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 24\)"
    ):
        ours("x", num_inference_steps=2, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(dj.DistriFusionError, match="unknown output_type 'jpeg'"):
        ours("x", num_inference_steps=2, output_type="jpeg")
    with pytest.raises(dj.ConfigError, match="unknown scheduler 'heun'"):
        ours("x", num_inference_steps=2, scheduler="heun")
    with pytest.warns(UserWarning, match="at most 77 tokens"):
        ours("a cube " * 60, num_inference_steps=1, output_type="latent")
    with pytest.raises(dj.CheckpointError, match="no model_index.json"):
        DistriSDXLPipeline.from_pretrained(folder / "unet")
    with pytest.raises(dj.CheckpointError, match="does not exist"):
        DistriSDXLPipeline.from_pretrained(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(dj.CheckpointError, match="not in the local Hugging Face cache"):
        DistriSDXLPipeline.from_pretrained("someone/not-cached-sdxl")


@pytest.mark.slow
def test_converted_pipeline_gives_the_same_images(checkpoint, latents, tmp_path):
    folder, _ = checkpoint
    converted = dj.convert_pipeline(folder, tmp_path / "converted", dtype="float32", progress=False)
    config = dj.DistriConfig(HEIGHT, WIDTH, devices=1)
    a = DistriSDXLPipeline.from_pretrained(folder, config, dtype=jnp.float32)
    b = DistriSDXLPipeline.from_pretrained(converted, config, dtype=jnp.float32)
    kw = dict(num_inference_steps=2, latents=latents, output_type="np", scheduler="euler")
    np.testing.assert_array_equal(a("a cube", **kw).images, b("a cube", **kw).images)


def test_row_sharded_decode_equals_one_device_decode(checkpoint, latents):
    """With several devices the VAE decodes row-sharded by default; the image equals one device's."""
    folder, _ = checkpoint
    config = dj.DistriConfig(HEIGHT, WIDTH, devices=8, mode="full_sync")
    sharded = DistriSDXLPipeline.from_pretrained(folder, config, dtype=jnp.float32)
    single = DistriSDXLPipeline.from_pretrained(folder, config, dtype=jnp.float32, parallel_decode=False)
    z = np.random.default_rng(3).standard_normal((2, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    assert sharded.decoder.parallel_for(z) and not single.decoder.parallel_for(z)
    a = np.asarray(sharded.decoder(sharded.vae_params, z))
    b = np.asarray(single.decoder(single.vae_params, z))
    print(f"row-sharded decode on 8 devices vs one: relative L2 {rel_l2(a, b):.1e}")
    assert rel_l2(a, b) <= 1e-5
