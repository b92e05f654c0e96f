"""The pipelines beyond SDXL text-to-image, each equal to diffusers on tiny random checkpoints (float32, same
noise): SD 1.x (epsilon) and SD 2.x (v-prediction) as StableDiffusionPipeline on 1 and 8 devices; SDXL's base +
refiner split (denoising_end / denoising_start, the refiner's aesthetic-score time ids, text_encoder_2 only);
prompt_embeds computed by diffusers' encode_prompt; the per-step callback."""

from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_pipeline import PSNR_MIN, psnr, tiny_sdxl

import distrifusion_jax as dj
from distrifusion_jax.errors import ConfigError
from distrifusion_jax.pipeline import DistriPipeline, DistriSDPipeline, DistriSDXLPipeline
from helpers import REFINER_TINY, SD1_TINY, SD2_TINY, perturbed, sdxl_scheduler_config, torch_unet

PROMPT, NEGATIVE = "a red cube on a table", "blurry"
# SD's four-level UNet takes latents divisible by 2^3: 8 bands of 8 latent rows need 512 pixel rows
SD_HEIGHT, SD_WIDTH = 512, 64
# SDXL: the tiny base has two levels, the tiny refiner four (16 latent rows: 2 bands)
HEIGHT, WIDTH = 128, 192
TOKENIZER = str(resources.files("distrifusion_jax").joinpath("assets/clip-tokenizer"))
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
}


def clip_text(hidden: int, act: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act=act,
        projection_dim=hidden,
        eos_token_id=2,
        bos_token_id=0,
        pad_token_id=1,
    )
    return perturbed(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def tiny_vae():
    from diffusers import AutoencoderKL

    build = lambda: AutoencoderKL(  # noqa: E731
        block_out_channels=[8, 8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.18215,
    )
    return perturbed(build)


def tiny_sd(folder, version: str):
    """A tiny random SD 1.x (epsilon, CLIP-L-like text encoder) or 2.x (v-prediction, OpenCLIP-like: gelu, pad
    token '!', a centred input sample) pipeline, saved with save_pretrained."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    v2 = version == "sd2"
    scheduler = DDIMScheduler.from_config(
        {
            **sdxl_scheduler_config(),
            "prediction_type": "v_prediction" if v2 else "epsilon",
            "_class_name": "DDIMScheduler",
        }
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text(12, "gelu" if v2 else "quick_gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER, **({"pad_token": "!"} if v2 else {})),
        unet=torch_unet(SD2_TINY if v2 else SD1_TINY),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def tiny_refiner(folder, base):
    """A tiny random SDXL refiner (text_encoder_2 only, 5 time ids with the aesthetic score, no forced zeros for
    the empty prompt) sharing the base's VAE, as SDXL's does; saved with save_pretrained."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    width = REFINER_TINY["cross_attention_dim"]
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=clip_text(width, "gelu", projection=True),
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"),
        unet=torch_unet(REFINER_TINY, seed=1),
        scheduler=EulerDiscreteScheduler.from_config(sdxl_scheduler_config()),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def use_scheduler(pipe, name: str):
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """version -> (folder, diffusers pipeline), built once."""
    built = {}

    def get(version):
        if version not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{version}")
            built[version] = folder, tiny_sd(folder, version)
        return built[version]

    return get


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(base folder, base pipeline, refiner folder, refiner pipeline)."""
    base_dir, refiner_dir = tmp_path_factory.mktemp("tiny_base"), tmp_path_factory.mktemp("tiny_refiner")
    base = tiny_sdxl(base_dir)
    return base_dir, base, refiner_dir, tiny_refiner(refiner_dir, base)


def noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- SD 1.x / 2.x ----
@pytest.mark.parametrize(
    "version, devices, scheduler",
    [
        ("sd1", 8, "ddim"),
        pytest.param("sd1", 1, "dpm-solver", marks=pytest.mark.slow),
        pytest.param("sd2", 1, "ddim", marks=pytest.mark.slow),
        pytest.param("sd2", 8, "euler", marks=pytest.mark.slow),
    ],
)
def test_sd_pipeline_equals_diffusers(sd, version, devices, scheduler):
    folder, pipe = sd(version)
    lat = noise((1, 4, SD_HEIGHT // 8, SD_WIDTH // 8))
    use_scheduler(pipe, scheduler)
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=SD_HEIGHT,
            width=SD_WIDTH,
            num_inference_steps=3,
            guidance_scale=5.0,
            latents=torch.from_numpy(lat),
            output_type="np",
        ).images
    config = dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=devices, mode="full_sync")
    ours = DistriPipeline.from_pretrained(folder, config, dtype=jnp.float32, scheduler=scheduler)
    assert isinstance(ours, DistriSDPipeline)
    out = ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, latents=lat, output_type="np")
    value = psnr(out.images, ref)
    print(f"{version} {scheduler}, {devices} device(s) full_sync: PSNR {value:.1f} dB")
    assert out.images.shape == ref.shape == (1, SD_HEIGHT, SD_WIDTH, 3)
    assert value >= PSNR_MIN


def test_pipeline_classes_refuse_the_other_family_in_one_line(sd, sdxl):
    sd_folder, _ = sd("sd1")
    with pytest.raises(
        ConfigError, match="Stable Diffusion 1.x / 2.x pipeline: load it with DistriSDPipeline"
    ):
        DistriSDXLPipeline.from_pretrained(sd_folder, dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=1))
    with pytest.raises(ConfigError, match="SDXL pipeline: load it with DistriSDXLPipeline"):
        DistriSDPipeline.from_pretrained(sdxl[0], dj.DistriConfig(HEIGHT, WIDTH, devices=1))
    # the four-level UNet's height rule, before any weight is read
    with pytest.raises(ConfigError, match="height=128 does not split into 4 patches.*multiple of 256"):
        DistriPipeline.from_pretrained(sd_folder, dj.DistriConfig(128, SD_WIDTH, devices=8))
    ours = DistriSDPipeline.from_pretrained(sd_folder, dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=1))
    with pytest.raises(ConfigError, match="pooled_prompt_embeds given, but this model takes no pooled"):
        ours(prompt_embeds=np.zeros((1, 77, 12)), pooled_prompt_embeds=np.zeros((1, 12)))
    with pytest.raises(
        ConfigError, match="original_size: this SD 1.x / 2.x model takes no such conditioning"
    ):
        ours(PROMPT, original_size=(1024, 1024))


# ---- SDXL base + refiner ----
def base_then_refiner_diffusers(base, refiner, lat, steps, split, scheduler):
    use_scheduler(base, scheduler)
    use_scheduler(refiner, scheduler)
    with torch.no_grad():
        mid = base(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=steps,
            denoising_end=split,
            latents=torch.from_numpy(lat),
            output_type="latent",
        ).images
        out = refiner(
            PROMPT,
            negative_prompt=NEGATIVE,
            image=mid,
            num_inference_steps=steps,
            denoising_start=split,
            output_type="np",
        ).images
    return mid.numpy(), out


@pytest.mark.parametrize(
    "devices, scheduler",
    [
        (1, "euler"),
        pytest.param(2, "ddim", marks=pytest.mark.slow),
        pytest.param(1, "dpm-solver", marks=pytest.mark.slow),
    ],
)
def test_base_and_refiner_equal_diffusers(sdxl, devices, scheduler):
    base_dir, base, refiner_dir, refiner = sdxl
    steps, split = 5, 0.6
    lat = noise((1, 4, HEIGHT // 8, WIDTH // 8), 1)
    ref_mid, ref = base_then_refiner_diffusers(base, refiner, lat, steps, split, scheduler)
    config = dj.DistriConfig(HEIGHT, WIDTH, devices=devices, mode="full_sync")
    ours_base = DistriSDXLPipeline.from_pretrained(base_dir, config, dtype=jnp.float32, scheduler=scheduler)
    ours_refiner = DistriSDXLPipeline.from_pretrained(
        refiner_dir, config, dtype=jnp.float32, scheduler=scheduler
    )
    assert ours_refiner.encoder_names == ("text_encoder_2",) and ours_refiner.requires_aesthetics_score
    seen = []
    mid = ours_base(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        denoising_end=split,
        latents=lat,
        output_type="latent",
        progress=lambda i, n: seen.append(n),
    ).images
    out = ours_refiner(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=mid,
        num_inference_steps=steps,
        denoising_start=split,
        output_type="np",
    ).images
    # 5 steps: timesteps 801, 601, 401 run in the base (>= the cutoff 400), 201 and 1 in the refiner (< 400)
    assert seen[-1] == 3
    mid_err = float(np.abs(mid - ref_mid).max() / np.abs(ref_mid).max())
    value = psnr(out, ref)
    print(
        f"base + refiner ({scheduler}, {devices} device(s)): base latents max rel err {mid_err:.1e}, "
        f"image {value:.1f} dB"
    )
    assert mid_err <= 1e-4
    assert value >= PSNR_MIN


def test_refiner_aesthetic_score_is_conditioning(sdxl):
    """The aesthetic score reaches the refiner's UNet (a different score, a different image), and
    denoising_start / denoising_end mistakes are one line before any work."""
    _, _, refiner_dir, _ = sdxl
    ours = DistriSDXLPipeline.from_pretrained(
        refiner_dir, dj.DistriConfig(HEIGHT, WIDTH, devices=1), dtype=jnp.float32
    )
    lat = noise((1, 4, HEIGHT // 8, WIDTH // 8), 2)

    def run(**kw):
        kw = {"num_inference_steps": 4, "denoising_start": 0.5, **kw}
        return ours(PROMPT, image=lat, output_type="latent", **kw).images

    assert np.abs(run(aesthetic_score=6.0) - run(aesthetic_score=2.0)).max() > 1e-4
    with pytest.raises(
        ConfigError, match=r"denoising_start=1.5 is not supported: pass a fraction in \(0, 1\)"
    ):
        run(denoising_start=1.5)
    with pytest.raises(ConfigError, match="target_size: SDXL's refiner takes no such conditioning"):
        run(target_size=(HEIGHT, WIDTH))
    with pytest.raises(ConfigError, match="denoising_start without image"):
        ours(PROMPT, num_inference_steps=4, denoising_start=0.5)
    with pytest.raises(ConfigError, match="image_noise samples a pixel image's VAE posterior"):
        run(image_noise=lat)


# ---- prompt_embeds, callback ----
def test_prompt_embeds_from_diffusers_equal_the_prompt(sdxl):
    """diffusers' encode_prompt output given as prompt_embeds & co. gives the image of the prompt (ours, exact up
    to float rounding), equal to diffusers' own; mistakes are one line."""
    base_dir, base, _, _ = sdxl
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = base.encode_prompt(
            PROMPT,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE,
        )
    ours = DistriSDXLPipeline.from_pretrained(
        base_dir, dj.DistriConfig(HEIGHT, WIDTH, devices=1), dtype=jnp.float32
    )
    lat = noise((1, 4, HEIGHT // 8, WIDTH // 8), 3)
    kw = dict(num_inference_steps=2, latents=lat, output_type="np")
    text = ours(PROMPT, negative_prompt=NEGATIVE, **kw).images
    given = ours(
        prompt_embeds=embeds.numpy(),
        pooled_prompt_embeds=pooled.numpy(),
        negative_prompt_embeds=neg.numpy(),
        negative_pooled_prompt_embeds=neg_pooled.numpy(),
        **kw,
    ).images
    print(f"prompt_embeds from diffusers vs our text encoding: max abs diff {np.abs(given - text).max():.1e}")
    assert np.abs(given - text).max() <= 1e-4
    # without negative embeddings: SDXL's zeros, as for no negative prompt
    zeros = ours(prompt_embeds=embeds.numpy(), pooled_prompt_embeds=pooled.numpy(), **kw).images
    assert np.abs(zeros - ours(PROMPT, **kw).images).max() <= 1e-4
    with pytest.raises(ConfigError, match="aesthetic_score: SDXL's base takes no such conditioning"):
        ours(PROMPT, aesthetic_score=7.0, **kw)
    with pytest.raises(ConfigError, match="prompt_embeds without pooled_prompt_embeds: SDXL needs both"):
        ours(prompt_embeds=embeds.numpy(), **kw)
    with pytest.raises(ConfigError, match="both prompt and prompt_embeds given"):
        ours(PROMPT, prompt_embeds=embeds.numpy(), pooled_prompt_embeds=pooled.numpy(), **kw)
    with pytest.raises(
        ConfigError, match=r"prompt_embeds has shape \(1, 77, 8\); this model takes \[batch, tokens, 32\]"
    ):
        ours(prompt_embeds=np.zeros((1, 77, 8)), pooled_prompt_embeds=pooled.numpy(), **kw)


def test_callback_sees_every_step_and_changes_nothing(sdxl):
    """callback(i, t, latents) after each step of a displaced run on 4 devices (img2img: the steps run), with the
    schedule's timesteps; its last latents are the result, and the images equal those of a run without it."""
    base_dir = sdxl[0]
    ours = DistriSDXLPipeline.from_pretrained(
        base_dir, dj.DistriConfig(HEIGHT, WIDTH, devices=4, warmup_steps=1), dtype=jnp.float32
    )
    lat = noise((1, 4, HEIGHT // 8, WIDTH // 8), 4)
    kw = dict(num_inference_steps=5, latents=lat, output_type="latent", image=lat, strength=0.8)
    seen = []
    with_cb = ours(PROMPT, callback=lambda i, t, x: seen.append((i, t, x.copy())), **kw).images
    plain = ours(PROMPT, **kw).images
    timesteps = np.asarray(ours.scheduler_for().timesteps(5))
    assert [i for i, _, _ in seen] == [1, 2, 3, 4]  # int(5 * 0.8) = 4 steps run: 1 .. 4
    assert [t for _, t, _ in seen] == [timesteps[i].item() for i in range(1, 5)]
    assert all(x.shape == (1, 4, HEIGHT // 8, WIDTH // 8) and x.dtype == np.float32 for _, _, x in seen)
    np.testing.assert_array_equal(seen[-1][2], with_cb)
    np.testing.assert_array_equal(with_cb, plain)
    assert np.abs(seen[0][2] - seen[1][2]).max() > 0


def test_generate_picks_the_class_and_runs_the_refiner(sd, sdxl, tmp_path, monkeypatch, capsys):
    """`generate --model` an SD folder (DistriSDPipeline, picked from the folder) and `--refiner` after SDXL's base;
    --refiner mistakes are one line before any weight is read."""
    import jax
    from PIL import Image

    from distrifusion_jax import cli, pipeline

    jax.devices()  # the session's 8 fake devices start before the CLI's --devices could ask for fewer
    base_dir, _, refiner_dir, _ = sdxl
    common = [
        "--prompt",
        "x",
        "--steps",
        "3",
        "--dtype",
        "float32",
        "--compile-cache",
        "off",
        "--no-progress",
    ]
    sd_folder, _ = sd("sd1")
    out = tmp_path / "sd.png"
    sd_args = ["--height", str(SD_HEIGHT), "--width", str(SD_WIDTH), "--devices", "2", "--output", str(out)]
    assert cli.main(["generate", "--model", str(sd_folder), *common, *sd_args]) == 0
    assert Image.open(out).size == (SD_WIDTH, SD_HEIGHT)
    out = tmp_path / "refined.png"
    size = ["--height", str(HEIGHT), "--width", str(WIDTH), "--devices", "2"]
    args = ["generate", "--model", str(base_dir), *common, *size, "--refiner", str(refiner_dir)]
    assert cli.main([*args, "--refiner-start", "0.5", "--output", str(out)]) == 0
    assert Image.open(out).size == (WIDTH, HEIGHT)

    def fail(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.DistriPipeline, "from_pretrained", classmethod(fail))
    bad = [
        (["--refiner-start", "1.2"], "--refiner-start=1.2 is not supported"),
        (["--config", "sd-1.5"], "applies to single-file checkpoints"),  # --model is a folder
        (["--refiner", str(sd_folder)], "not an SDXL pipeline"),
        (["--hires-size", "256", "--hires-strength", "0.7"], "--refiner with --image or --hires-size"),
        # the base takes 80 rows, the refiner's four levels do not
        (["--height", "80"], "the latent height 10 must be divisible by 2^3"),
    ]
    for extra, message in bad:
        capsys.readouterr()
        rc = cli.main([*args, *extra, "--output", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (extra, err)


def test_sd_lora_fuses_as_diffusers(sd, tmp_path, monkeypatch):
    """A kohya LoRA for SD 1.x (`lora_te_` for its one text encoder, `lora_unet_`, LoCon convs) fused by the
    SD pipeline equals diffusers' StableDiffusionPipeline load_lora_weights + fuse_lora (relative error <= 1e-5
    in float32); a LoRA for SDXL's second encoder is one line."""
    import test_lora
    from diffusers import StableDiffusionPipeline

    from distrifusion_jax import keymap
    from distrifusion_jax.errors import CheckpointError
    from distrifusion_jax.weights.clip import text_encoder_key_map

    folder, _ = sd("sd1")
    ours = DistriSDPipeline.from_pretrained(
        folder, dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=1), dtype=jnp.float32
    )
    base = {"unet": ours.unet_params, "text_encoder": ours.prompt_encoder.params[0]}
    base = {k: jax.tree.map(np.asarray, v) for k, v in base.items()}
    monkeypatch.setitem(test_lora.KOHYA, "text_encoder", "lora_te_")
    lora = test_lora.kohya_file(tmp_path / "sd.safetensors", base)
    ours.load_lora(lora, 0.6)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.6)
    worst = 0.0
    for name, tree in (("unet", ours.unet_params), ("text_encoder", ours.prompt_encoder.params[0])):
        key_map = keymap.torch_to_flax if name == "unet" else text_encoder_key_map
        flat = keymap.flatten(tree)
        for key, value in getattr(pipe, name).state_dict().items():
            if "lora_" in key or keymap.is_ignored(key):
                continue
            path, _, perm = key_map(key.replace(".base_layer.", "."), tuple(value.shape))
            ref = value.detach().numpy()
            ref = ref.transpose(perm) if perm else ref
            got = np.asarray(flat[path])
            worst = max(worst, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
    print(f"SD 1.x kohya LoRA vs diffusers: worst relative error {worst:.1e}")
    assert worst <= 1e-5
    for name, tree in (("unet", ours.unet_params), ("text_encoder", ours.prompt_encoder.params[0])):
        moved = [
            k
            for k, v in keymap.flatten(base[name]).items()
            if np.abs(np.asarray(keymap.flatten(tree)[k]) - v).max() > 1e-3
        ]
        assert len(moved) > 4, name  # the LoRA did change both models' layers
    monkeypatch.setitem(test_lora.KOHYA, "text_encoder", "lora_te2_")
    other = test_lora.kohya_file(tmp_path / "te2.safetensors", {"text_encoder": base["text_encoder"]})
    with pytest.raises(CheckpointError, match="adapts text_encoder_2, which this model does not have"):
        ours.load_lora(other)


@pytest.mark.parametrize("version", ["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def test_sd_single_file_generates_the_diffusers_folder_image(sd, tmp_path, monkeypatch, version):
    """A tiny SD 1.x / 2.x pipeline written as an original-layout single file (SD 2.x: OpenCLIP's fused in_proj)
    and converted generates the image of the diffusers folder it came from (float32, 2 devices). The tiny models'
    configs stand in for the bundled ones (`_component_config`): the layout's rule tables, reading and writing
    run as for a real file; detecting the published configs is tested in test_single_file.py."""
    from safetensors.numpy import save_file
    from test_single_file import numpy_state, original_layout

    from distrifusion_jax.convert import convert
    from distrifusion_jax.weights import single_file

    folder, pipe = sd(version)
    configs = {
        "unet": dict(pipe.unet.config),
        "vae": dict(pipe.vae.config),
        "text_encoder": pipe.text_encoder.config.to_dict(),
    }
    states = {name: numpy_state(getattr(pipe, name)) for name in configs}
    save_file(original_layout(states, configs, version), str(tmp_path / "tiny.safetensors"))
    monkeypatch.setattr(single_file, "_component_config", lambda name, *a: (configs[name], False))
    converted = convert(tmp_path / "tiny.safetensors", tmp_path / "converted", progress=False)
    config = dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=2, mode="full_sync")
    run = lambda path: (
        DistriPipeline.from_pretrained(  # noqa: E731
            path, config, dtype=jnp.float32, scheduler="ddim"
        )(PROMPT, num_inference_steps=3, seed=5, output_type="np").images
    )
    from_file, from_folder = run(converted), run(folder)
    diff = float(np.abs(from_file - from_folder).max())
    print(f"{version} single file vs its diffusers folder: max abs diff {diff:.1e}")
    assert diff <= 1e-5 and from_file.std() > 0.01  # the same image, and an image


def test_sd_pipeline_on_every_parallelism(sd):
    """SD 1.x's four-level UNet through tensor parallelism (2 devices: equal to one device), displaced patches
    (8 devices, warmup 1: close) and naive patches (4 devices: runs, and differs as naive patches do)."""
    folder, _ = sd("sd1")
    lat = noise((1, 4, SD_HEIGHT // 8, SD_WIDTH // 8), 6)

    def run(**kw):
        config = dj.DistriConfig(SD_HEIGHT, SD_WIDTH, **kw)
        pipe = DistriPipeline.from_pretrained(folder, config, dtype=jnp.float32)
        return pipe(PROMPT, num_inference_steps=3, latents=lat, output_type="np").images

    one = run(devices=1)
    tensor, displaced = run(devices=2, parallelism="tensor"), run(devices=8, warmup_steps=1)
    naive = run(devices=4, parallelism="naive_patch")
    print(
        f"SD 1.x vs one device: tensor {psnr(tensor, one):.1f} dB, displaced 8 {psnr(displaced, one):.1f} dB"
    )
    assert psnr(tensor, one) >= PSNR_MIN and psnr(displaced, one) >= 30
    assert np.isfinite(naive).all() and psnr(naive, one) < psnr(displaced, one)


def test_convert_sd_and_refiner_folders_with_a_lora(sd, sdxl, tmp_path, monkeypatch):
    """`convert` takes the components model_index.json lists: an SD 1.x folder (one encoder) and SDXL's refiner
    (text_encoder_2 only) convert, and load and generate as their diffusers folders do (exactly); a LoRA fused at
    conversion equals the one the pipeline fuses."""
    import test_lora

    from distrifusion_jax import keymap
    from distrifusion_jax.convert import convert

    sd_folder, _ = sd("sd1")
    config = dj.DistriConfig(SD_HEIGHT, SD_WIDTH, devices=1)
    plain = DistriPipeline.from_pretrained(sd_folder, config, dtype=jnp.float32)
    base = {"unet": plain.unet_params, "text_encoder": plain.prompt_encoder.params[0]}
    monkeypatch.setitem(test_lora.KOHYA, "text_encoder", "lora_te_")
    lora = test_lora.kohya_file(
        tmp_path / "sd.safetensors", {k: jax.tree.map(np.asarray, v) for k, v in base.items()}
    )
    converted = convert(sd_folder, tmp_path / "sd-jax", progress=False)
    fused = convert(sd_folder, tmp_path / "sd-jax-lora", progress=False, loras=[(lora, 0.5)])
    ours = DistriPipeline.from_pretrained(converted, config, dtype=jnp.float32)
    kw = dict(num_inference_steps=2, seed=1, output_type="np")
    np.testing.assert_array_equal(ours(PROMPT, **kw).images, plain(PROMPT, **kw).images)
    from_fused = DistriPipeline.from_pretrained(fused, config, dtype=jnp.float32)
    plain.load_lora(lora, 0.5)
    for got, want in (
        (from_fused.unet_params, plain.unet_params),
        (from_fused.prompt_encoder.params[0], plain.prompt_encoder.params[0]),
    ):
        a, b = keymap.flatten(got), keymap.flatten(want)
        assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    refiner_dir = sdxl[2]
    refiner = convert(refiner_dir, tmp_path / "refiner-jax", progress=False)
    assert not (refiner / "text_encoder").exists() and (refiner / "text_encoder_2").is_dir()
    config = dj.DistriConfig(HEIGHT, WIDTH, devices=1)
    lat = noise((1, 4, HEIGHT // 8, WIDTH // 8), 7)
    run = lambda path: (
        DistriSDXLPipeline.from_pretrained(path, config, dtype=jnp.float32)(  # noqa: E731
            PROMPT, image=lat, denoising_start=0.5, num_inference_steps=4, output_type="latent"
        ).images
    )
    np.testing.assert_array_equal(run(refiner), run(refiner_dir))
