"""SDXL text-to-image (and image-to-image: image -> row-sharded VAE encode -> noised latents): prompts ->
embeddings -> sharded latents -> DistriFusion loop -> VAE decode -> images."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .arguments import (
    SEED_LIMIT,
    check_image_or_latents,
    check_latents,
    check_output_type,
    check_prompts,
    check_strength,
    denoising_first,
    denoising_stop,
    float_arg,
    int_arg,
    micro_conditioning,
    prng_key,
)
from .cache import CompileClock, enable_compilation_cache
from .config import DistriConfig
from .decode import Decoder, Encoder
from .denoise import Denoiser
from .distributed import check_local_share, replicate, spans_processes, to_host
from .errors import ConfigError
from .guards import check_decoded, check_denoised, out_of_memory_as_error
from .parallel import make_mesh
from .preflight import check_pretrained, check_schedule
from .prompts import PromptEncoder, check_given_embeds, short_repr
from .schedulers import make_scheduler, scheduler_from_config
from .weights.pipeline_weights import load_pipeline_weights
from .workflows import Workflows


@dataclasses.dataclass
class PipelineOutput:
    """`images`: PIL images, an array [B, H, W, 3] in [0, 1] ("np"), or latents [B, 4, h, w] ("latent"); `timings`:
    seconds spent in text encoding (`encode_s`), the image's VAE encode (img2img: `image_encode_s`), denoising
    (`denoise_s`) and decoding (`decode_s`), each without compilation; `compile_s`: seconds spent tracing, compiling
    or loading compiled programs from the persistent cache, all stages together; `programs_compiled` /
    `programs_loaded`: how many programs XLA compiled and how many came from the cache; `compiled`: whether the
    denoising loop's programs were compiled or loaded in this call (False when an earlier call's are reused)."""

    images: Any
    timings: dict


class DistriPipeline(Workflows):
    """A diffusion pipeline with displaced patch parallelism over the devices of a DistriConfig: SDXL (base or
    refiner: `DistriSDXLPipeline`) or SD 1.x / 2.x (`DistriSDPipeline`), told apart by the UNet's
    micro-conditioning. `DistriPipeline.from_pretrained` returns whichever class the folder holds."""

    family: Optional[str] = None  # "sdxl" | "sd" in the subclasses; None here: any

    def __init__(
        self,
        unet,
        unet_params,
        vae,
        vae_params,
        text_encoders,
        text_params,
        tokenizers,
        scheduler_config: dict,
        distri_config: DistriConfig,
        force_zeros_for_empty_prompt: bool = True,
        scheduler: Optional[str] = None,
        parallel_decode: bool = True,
        decode_tile_rows=None,
        encoder_names=("text_encoder", "text_encoder_2"),
        requires_aesthetics_score: bool = False,
    ):
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        layer = "penultimate" if self.is_sdxl else "last"
        self.prompt_encoder = PromptEncoder(tokenizers, text_encoders, text_params, layer)
        self.encoder_names = tuple(encoder_names)  # the text encoders' folders (LoRA names them so)
        self.requires_aesthetics_score = requires_aesthetics_score  # the refiner's time ids
        self.scheduler_config = scheduler_config
        self.default_scheduler = scheduler
        self.scheduler_for(scheduler)  # fail now on an unknown name or class
        self.distri_config = distri_config
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._denoisers: dict = {}
        self._lora_undo = None  # the weights a fused LoRA changed, as they were (unload_lora restores them)
        devices = distri_config.resolve_devices()
        vae_devices = devices if parallel_decode else devices[:1]
        self.decoder = Decoder(vae, vae_devices, tile_rows=decode_tile_rows)
        self.encoder = Encoder(vae, vae_devices)  # img2img: row-sharded where the decode is
        if spans_processes(
            devices
        ):  # several processes: weights placed once, replicated on all their devices
            check_local_share(devices)
            mesh = make_mesh(devices, 1)
            self.unet_params, self.vae_params = replicate(unet_params, mesh), replicate(vae_params, mesh)

    # ---- loading ----
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id,
        distri_config: Optional[DistriConfig] = None,
        dtype=jnp.bfloat16,
        variant: Optional[str] = None,
        scheduler: Optional[str] = None,
        vae_dtype=None,
        attention_impl: Optional[str] = "auto",
        vae_attention_impl: Optional[str] = "auto",
        compilation_cache=None,
        parallel_decode: bool = True,
        decode_tile_rows=None,
        single_file_config: Optional[str] = None,
    ) -> "DistriPipeline":
        """Load a pipeline folder (SDXL or SD 1.x / 2.x: diffusers', its fp16/bf16 variant, or our converted one),
        a single-file checkpoint (converted once into the cache; `single_file_config` names the bundled config it
        was trained with, e.g. "sd-2.1-base" for a 512 epsilon SD 2.x file; default: detected from its keys), a
        bundled model's name ("demo") or a hub id.

        `attention_impl` (UNet) and `vae_attention_impl` (VAE): "auto" (the default: per attention,
        cuDNN's fused kernel on NVIDIA GPUs where its dtype and head-dim limits allow, "chunked" where
        XLA's float32 scores would exceed 1 GiB, XLA's otherwise; `nn.attention.choose_implementation`),
        None (jax.nn.dot_product_attention's choice), "xla", "cudnn" or "chunked" (blockwise, bounded
        memory on any backend). Without "chunked" the VAE's one-head mid-block attention over every
        latent pixel would store 17 GB of scores at 2048^2 and 212 GB at 3840^2.
        `dtype`: UNet and text encoders; `vae_dtype` (decode, img2img's encode): default float32 when the
        VAE's config asks for `force_upcast` (SDXL's does), else `dtype`. `scheduler`: "ddim" | "euler" | "dpm-solver"
        overrides the class in scheduler/scheduler_config.json. `compilation_cache`: a directory for
        JAX's persistent compilation cache, or "off" (default: $DISTRIFUSION_JAX_CACHE, else
        ~/.cache/distrifusion-jax/xla), so a new process reuses compiled programs. `parallel_decode`:
        decode (and img2img's encode) row-sharded over the DistriConfig's devices (exact; default) rather than
        on one device.
        `decode_tile_rows`: where the decode runs on one device, decode in overlapping tiles of this many
        latent rows (at least 16) one after another (memory of one tile; approximate, like diffusers' VAE
        tiling); refused where the decode is row-sharded, as it would not apply.
        Everything that needs no weight is checked before any is read (`preflight.check_pretrained`): the
        folder's config files, the size and devices against the UNet (in a layout a call may use: the
        CFG split only applies to calls with guidance_scale > 1), tiles, kernels, scheduler, cache folder.
        """
        # everything that needs no weight is checked first, so a mistake costs no load
        files, distri_config = check_pretrained(
            path_or_hub_id,
            distri_config,
            scheduler,
            attention_impl,
            vae_attention_impl,
            compilation_cache,
            parallel_decode,
            decode_tile_rows,
            cls.family,
            single_file_config,
        )
        enable_compilation_cache(compilation_cache)
        unet, unet_params, vae, vae_params, encoders, text_params = load_pipeline_weights(
            files,
            distri_config,
            dtype,
            variant,
            vae_dtype,
            attention_impl,
            vae_attention_impl,
            parallel_decode,
        )
        return FAMILIES[files.family](
            unet,
            unet_params,
            vae,
            vae_params,
            encoders,
            text_params,
            files.tokenizers,
            files.scheduler,
            distri_config,
            files.index.get("force_zeros_for_empty_prompt", files.family == "sdxl"),
            scheduler,
            parallel_decode,
            decode_tile_rows,
            files.encoders,
            files.aesthetic,
        )

    def scheduler_for(self, name: Optional[str] = None):
        name = name or self.default_scheduler
        return (
            make_scheduler(name, self.scheduler_config)
            if name
            else scheduler_from_config(self.scheduler_config)
        )

    def denoiser(
        self,
        distri_config: DistriConfig,
        scheduler,
        steps: int,
        guidance_rescale: float,
        progress=None,
        first_step: int = 0,
        stop_step: Optional[int] = None,
    ) -> Denoiser:
        """The loop for this (config, scheduler, steps, rescale, first step), built once and reused.

        Building it checks the device layout and the size against the UNet but compiles nothing: the
        program is compiled on the first call with given input shapes.
        """
        key = (
            distri_config,
            scheduler,
            steps,
            float(guidance_rescale),
            progress is not None,
            first_step,
            stop_step,
        )
        if key not in self._denoisers:
            self._denoisers[key] = Denoiser(
                self.unet,
                distri_config,
                scheduler,
                steps,
                guidance_rescale=guidance_rescale,
                progress=progress,
                first_step=first_step,
                stop_step=stop_step,
            )
        d = self._denoisers[key]
        d.progress = progress
        return d

    # ---- generation ----
    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        seed: int = 0,
        latents=None,
        num_images_per_prompt: int = 1,
        original_size: Optional[Sequence[int]] = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Optional[Sequence[int]] = None,
        output_type: str = "pil",
        scheduler: Optional[str] = None,
        progress=None,
        image=None,
        strength: float = 0.3,
        image_noise=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        denoising_start: Optional[float] = None,
        denoising_end: Optional[float] = None,
        aesthetic_score: Optional[float] = None,
        negative_aesthetic_score: Optional[float] = None,
        callback=None,
    ) -> PipelineOutput:
        """Generate images; the size and the device layout come from the DistriConfig (every argument: docs/usage.md).

        `latents`: diffusers' layout (B, 4, H/8, W/8) and semantics (unit noise, multiplied here by the scheduler's
        initial sigma), so a diffusers image can be reproduced exactly. `seed`: an int in [0, 2**63). img2img
        (diffusers' StableDiffusionXLImg2ImgPipeline): `image` (PIL image(s), or an array [H, W, 3] / [B, H, W, 3] of
        uint8 or floats in [0, 1], at the DistriConfig's size; B divides the number of images) is VAE-encoded
        (row-sharded like the decode), its posterior sampled with `image_noise` (None: from the seed; zeros: the
        mean), noised to the level of step t_start = steps - min(int(steps * strength), steps) with `latents`, and
        denoised from there (the warmup counted from t_start). `image` may also be latents (B, 4, H/8, W/8), used
        as they are. SDXL's base + refiner (as diffusers): `denoising_end` in (0, 1) stops the base where the
        timesteps fall below (1 - denoising_end) x the training timesteps; `denoising_start` with `image=` its
        latents starts the refiner there without adding noise; `aesthetic_score` / `negative_aesthetic_score`
        condition a refiner. `prompt_embeds` & co.: embeddings as diffusers' `encode_prompt` returns them, in place
        of the prompts. `progress(i, n)`: i = 0 when denoising starts (after compiling), then as each step
        completes (n: the steps run); `callback(i, t, latents)`: after each step, its index in the schedule, its
        timestep and a float32 numpy copy of the latents; with either the loop runs one compiled program per step.
        Every argument is checked before any encoding or compiling (a one-line ConfigError); latents or an image
        that went NaN or infinite raise NonFiniteError, a device out of memory OutOfMemoryError. In a multi-process
        run every process calls this with the same arguments and gets the same images.
        """
        check_output_type(output_type)
        dc = self.distri_config
        kind = ("refiner" if self.requires_aesthetics_score else "sdxl") if self.is_sdxl else "sd"
        time_ids = micro_conditioning(
            dc,
            original_size,
            crops_coords_top_left,
            target_size,
            kind,
            aesthetic_score,
            negative_aesthetic_score,
        )
        c = self.unet.config  # the pooled text embedding fills what the time ids leave of the class embedding
        pooled_width = (
            None
            if time_ids is None
            else (c.projection_class_embeddings_input_dim - len(time_ids[0]) * c.addition_time_embed_dim)
        )
        given_embeds, given = check_given_embeds(
            {
                "embeds": prompt_embeds,
                "pooled": pooled_prompt_embeds,
                "negative_embeds": negative_prompt_embeds,
                "negative_pooled": negative_pooled_prompt_embeds,
            },
            {
                "prompt": prompt,
                "prompt_2": prompt_2,
                "negative_prompt": negative_prompt,
                "negative_prompt_2": negative_prompt_2,
            },
            c.cross_attention_dim[0],
            pooled_width,
        )
        batch = check_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, given_embeds)
        per_prompt = int_arg("num_images_per_prompt", num_images_per_prompt, 1)
        seed = int_arg("seed", seed, 0, SEED_LIMIT, "2**63")
        guidance_scale = float_arg("guidance_scale", guidance_scale)
        guidance_rescale = float_arg("guidance_rescale", guidance_rescale, 0.0, 1.0)
        for name, fn, signature in (
            ("progress", progress, "progress(i, n)"),
            ("callback", callback, "callback(i, t, latents)"),
        ):
            if fn is not None and not callable(fn):
                raise ConfigError(
                    f"{name}={short_repr(fn)} is not callable: pass a function {signature} or None"
                )
        do_cfg = guidance_scale > 1.0
        if dc.do_classifier_free_guidance != do_cfg:
            dc = dataclasses.replace(dc, do_classifier_free_guidance=do_cfg)
        n_images = batch * per_prompt
        sched = self.scheduler_for(scheduler)
        steps = check_schedule(sched, num_inference_steps)
        latent_shape = (4, dc.latent_height, dc.latent_width)
        latents = check_latents(latents, (n_images, *latent_shape), dc)
        first, stop = 0, denoising_stop(sched, steps, denoising_end)
        pixels = given_latents = None
        if denoising_start is not None and image is None:
            raise ConfigError(
                "denoising_start without image: pass the latents the base pipeline returned (output_type="
                "'latent', denoising_end) as image="
            )
        if image is not None:
            if denoising_start is not None:
                first = denoising_first(sched, steps, denoising_start)
            else:
                first = check_strength(strength, steps)
            if stop <= first:
                raise ConfigError(
                    f"denoising_end={denoising_end} ends the schedule at step {stop}, before the first step run "
                    f"({first}): no step would run; raise denoising_end, or lower strength / denoising_start"
                )
            pixels, given_latents = check_image_or_latents(image, n_images, dc)
            if given_latents is not None and image_noise is not None:
                raise ConfigError(
                    "image_noise samples a pixel image's VAE posterior; image= holds latents: leave it out"
                )
            if pixels is not None:
                image_noise = check_latents(image_noise, (len(pixels), *latent_shape), dc, "image_noise")
        # layout checks; nothing compiled yet
        stepwise = progress if progress is not None else (None if callback is None else (lambda i, n: None))
        d = self.denoiser(dc, sched, steps, guidance_rescale, stepwise, first, stop)
        d.on_step = None if callback is None else d.host_callback(callback)

        timings, clock, t0 = {}, CompileClock(), time.perf_counter()
        embeds, pooled = self.prompt_encoder(
            prompt,
            prompt_2,
            negative_prompt,
            negative_prompt_2,
            batch,
            do_cfg,
            self.force_zeros_for_empty_prompt,
            per_prompt,
            given,
        )
        added = None
        if self.is_sdxl:
            rows = [time_ids[1]] * (embeds.shape[0] // (2 if do_cfg else 1))
            rows = [time_ids[0]] * len(rows) + rows if do_cfg else rows
            added = {"text_embeds": pooled, "time_ids": jnp.asarray(rows, jnp.float32)}
        if latents is None:
            noise = jax.random.normal(
                prng_key(seed), (n_images, dc.latent_height, dc.latent_width, 4), jnp.float32
            )
        else:
            noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
        timings["encode_s"], compile_s = self._lap(t0, clock, 0.0)

        if image is None:
            start = noise * sched.init_noise_sigma(steps)
        else:
            t0 = time.perf_counter()
            with out_of_memory_as_error(self, "the VAE encode", dc, n_images, False, self.encoder.devices):
                start = self._image_latents(
                    pixels,
                    given_latents,
                    image_noise,
                    noise,
                    sched,
                    steps,
                    first,
                    seed,
                    denoising_start is None,
                )
                start = jax.block_until_ready(start)
            if spans_processes(d.devices):  # every process holds the same values: placed by the Denoiser
                start = to_host(start)
            timings["image_encode_s"], compile_s = self._lap(t0, clock, compile_s)

        t0 = time.perf_counter()
        with out_of_memory_as_error(self, "denoising", dc, n_images, do_cfg, d.devices):
            out = d(self.unet_params, start, embeds, added, guidance_scale=guidance_scale)
            out = jax.block_until_ready(out)
            host_latents = to_host(out)
        check_denoised(d, host_latents, sched, self.unet.dtype, guidance_scale)
        timings["denoise_s"], compile_s = self._lap(t0, clock, compile_s)
        timings["compiled"] = d.last_compile_s > 0
        if output_type == "latent":
            return PipelineOutput(host_latents.transpose(0, 3, 1, 2), self._summary(timings, clock))

        t0 = time.perf_counter()
        with out_of_memory_as_error(self, "the VAE decode", dc, n_images, False, self.decoder.devices):
            image = np.asarray(
                to_host(self.decoder(self.vae_params, out / self.vae.config.scaling_factor)), np.float32
            )
        check_decoded(image, self.vae.dtype)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        timings["decode_s"], _ = self._lap(t0, clock, compile_s)
        if output_type == "np":
            return PipelineOutput(image, self._summary(timings, clock))
        images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]
        return PipelineOutput(images, self._summary(timings, clock))

    def _image_latents(self, pixels, given, image_noise, noise, sched, steps, first, seed, add_noise: bool):
        """img2img's starting latents [n, h, w, 4]: the image encoded (its posterior sampled with image_noise, else
        with noise drawn from the seed) or the latents given (diffusers' layout), repeated to the batch as
        diffusers repeats it, and noised to step `first`'s level with `noise` (the scheduler's `add_noise`) unless
        `add_noise` is False (the refiner's denoising_start: the base left them at that level)."""
        if given is not None:
            z = jnp.asarray(given.transpose(0, 2, 3, 1))
        else:
            shape = (len(pixels), noise.shape[1], noise.shape[2], noise.shape[3])
            if image_noise is None:
                sample = jax.random.normal(jax.random.fold_in(prng_key(seed), 1), shape, jnp.float32)
            else:
                sample = jnp.asarray(image_noise.transpose(0, 2, 3, 1))
            z = self.encoder(self.vae_params, pixels, sample)
        if noise.shape[0] > z.shape[0]:  # diffusers concatenates copies of the whole batch
            z = jnp.tile(z, (noise.shape[0] // z.shape[0], 1, 1, 1))
        return sched.add_noise(steps, z, noise, first) if add_noise else z

    @staticmethod
    def _lap(t0: float, clock: CompileClock, compiled_before: float) -> tuple:
        """(seconds since t0 less the compilation in them, the clock's compilation seconds so far)."""
        compiled = clock.seconds
        return time.perf_counter() - t0 - (compiled - compiled_before), compiled

    @staticmethod
    def _summary(timings: dict, clock: CompileClock) -> dict:
        return {
            **timings,
            "compile_s": clock.seconds,
            "programs_compiled": clock.compiled,
            "programs_loaded": clock.loaded,
        }


class DistriSDXLPipeline(DistriPipeline):
    """Stable Diffusion XL (base, or the refiner: `text_encoder_2` only, aesthetic-score time ids) with displaced
    patch parallelism over the devices of a DistriConfig."""

    family = "sdxl"


class DistriSDPipeline(DistriPipeline):
    """Stable Diffusion 1.x / 2.x (one text encoder, no micro-conditioning; epsilon or v-prediction as its
    scheduler config says) with displaced patch parallelism over the devices of a DistriConfig."""

    family = "sd"


FAMILIES = {"sdxl": DistriSDXLPipeline, "sd": DistriSDPipeline}
