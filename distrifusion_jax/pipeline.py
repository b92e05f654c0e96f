"""SDXL text-to-image (and image-to-image: image -> row-sharded VAE encode -> noised latents): prompts ->
embeddings -> sharded latents -> DistriFusion loop -> VAE decode -> images."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from .arguments import (
    SEED_LIMIT,
    check_image,
    check_latents,
    check_output_type,
    check_prompts,
    check_strength,
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
from .errors import ConfigError, OutOfMemoryError
from .guards import check_decoded, check_denoised, is_out_of_memory, out_of_memory_message
from .parallel import make_mesh
from .preflight import check_pretrained, check_schedule
from .prompts import PromptEncoder, short_repr
from .schedulers import make_scheduler, scheduler_from_config
from .weights import fuse_lora, load_text_encoder, load_unet, read_lora, unfuse_lora
from .weights.vae import load_vae


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


class DistriSDXLPipeline:
    """Stable Diffusion XL with displaced patch parallelism over the devices of a DistriConfig."""

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
    ):
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.prompt_encoder = PromptEncoder(tokenizers, text_encoders, text_params)
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
    ) -> "DistriSDXLPipeline":
        """Load a diffusers SDXL pipeline folder (or its fp16/bf16 variant, or our converted folder).

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
        )
        enable_compilation_cache(compilation_cache)
        root = files.root
        # weights go straight from the file to every device that uses them (one process: several processes
        # place theirs in __init__)
        devices = distri_config.resolve_devices()
        replicated = None
        if len(devices) > 1 and not spans_processes(devices):
            replicated = NamedSharding(make_mesh(devices, 1), P())
        unet_sharding = (
            None if distri_config.parallelism == "tensor" else replicated
        )  # TensorPlan splits them
        unet, unet_params = load_unet(
            root / "unet", dtype=dtype, variant=variant, attention_impl=attention_impl, sharding=unet_sharding
        )
        vae_dtype = vae_dtype or (jnp.float32 if files.vae.get("force_upcast", True) else dtype)
        vae, vae_params = load_vae(
            root / "vae",
            dtype=vae_dtype,
            variant=variant,
            attention_impl=vae_attention_impl,
            sharding=replicated if parallel_decode else None,
        )
        encoders, text_params = [], []
        for name in ("text_encoder", "text_encoder_2"):
            model, params = load_text_encoder(root / name, dtype=dtype, variant=variant)
            encoders.append(model)
            text_params.append(params)
        return cls(
            unet,
            unet_params,
            vae,
            vae_params,
            encoders,
            text_params,
            files.tokenizers,
            files.scheduler,
            distri_config,
            files.index.get("force_zeros_for_empty_prompt", True),
            scheduler,
            parallel_decode,
            decode_tile_rows,
        )

    # ---- LoRA ----
    def _lora_params(self) -> dict:
        texts = self.prompt_encoder.params
        return {"unet": self.unet_params, "text_encoder": texts[0], "text_encoder_2": texts[1]}

    def _set_lora_params(self, params: dict) -> None:
        self.unet_params = params["unet"]
        self.prompt_encoder.params = [params["text_encoder"], params["text_encoder_2"]]

    def load_lora(self, path, scale: float = 1.0) -> "DistriSDXLPipeline":
        """Fuse a LoRA (kohya or diffusers/peft safetensors; UNet and both text encoders, linear and conv
        layers) into the weights: W + scale * alpha / rank * up @ down, in float32, cast back to the weights'
        dtype and placement. No per-step cost and no recompilation (the weights are the programs'
        arguments). Several adapters stack; `unload_lora()` restores the weights before all of them, bit for
        bit. A LoRA that fits no layer of this model, or with a wrong rank, is one CheckpointError line."""
        scale = float_arg("scale", scale)
        params, self._lora_undo = fuse_lora(self._lora_params(), read_lora(path), scale, self._lora_undo)
        self._set_lora_params(params)
        return self

    def unload_lora(self) -> "DistriSDXLPipeline":
        """Every fused LoRA taken out: the weights as loaded, bit for bit (a no-op without one)."""
        if self._lora_undo is not None:
            self._set_lora_params(unfuse_lora(self._lora_params(), self._lora_undo))
            self._lora_undo = None
        return self

    # ---- the high-res fix ----
    def hires_fix(
        self,
        prompt,
        base_size,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        base_steps: Optional[int] = None,
        progress=None,
        base_progress=None,
        output_type: str = "pil",
        **kwargs,
    ) -> PipelineOutput:
        """The "high-res fix": a base pass at `base_size` (an int, or (height, width): the model's native size,
        where it composes well), its images upscaled in pixels (Lanczos) to the DistriConfig's size, then
        refined by img2img there (`strength`, `num_inference_steps`): the refine pass at high resolution is
        where patch parallelism pays. Both passes run on the DistriConfig's devices (the base one in the same
        layout at its own size). `kwargs`: the rest of `__call__`'s arguments (prompt_2, negative prompts,
        guidance, seed, scheduler, ...), used by both passes; `base_steps` defaults to `num_inference_steps`;
        `progress` / `base_progress` as `__call__`'s. Timings of the base pass come back prefixed `base_`."""
        check_output_type(output_type)
        height, width = (base_size, base_size) if isinstance(base_size, int) else tuple(base_size)
        base_config = dataclasses.replace(self.distri_config, height=height, width=width)
        base_config.check_model(self.unet.config, len(base_config.resolve_devices()))
        steps = int_arg("base_steps", num_inference_steps if base_steps is None else base_steps, 1)
        with self._using(base_config):
            base = self(prompt, num_inference_steps=steps, progress=base_progress, **kwargs)
        dc = self.distri_config
        images = [im.resize((dc.width, dc.height), Image.LANCZOS) for im in base.images]
        out = self(
            prompt,
            image=images,
            strength=strength,
            num_inference_steps=num_inference_steps,
            progress=progress,
            output_type=output_type,
            **kwargs,
        )
        out.timings = {**{f"base_{k}": v for k, v in base.timings.items()}, **out.timings}
        return out

    @contextlib.contextmanager
    def _using(self, config: DistriConfig):
        """This pipeline with another DistriConfig (another size) inside the block."""
        kept, self.distri_config = self.distri_config, config
        try:
            yield
        finally:
            self.distri_config = kept

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
    ) -> Denoiser:
        """The loop for this (config, scheduler, steps, rescale, first step), built once and reused.

        Building it checks the device layout and the size against the UNet but compiles nothing: the
        program is compiled on the first call with given input shapes.
        """
        key = (distri_config, scheduler, steps, float(guidance_rescale), progress is not None, first_step)
        if key not in self._denoisers:
            self._denoisers[key] = Denoiser(
                self.unet,
                distri_config,
                scheduler,
                steps,
                guidance_rescale=guidance_rescale,
                progress=progress,
                first_step=first_step,
            )
        d = self._denoisers[key]
        d.progress = progress
        return d

    # ---- generation ----
    def __call__(
        self,
        prompt,
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
    ) -> PipelineOutput:
        """Generate images; the size and the device layout come from the DistriConfig.

        `latents`: diffusers' layout (B, 4, H/8, W/8) and semantics (unit noise, multiplied here by the scheduler's
        initial sigma), so a diffusers image can be reproduced exactly. `seed`: an int in [0, 2**63). img2img
        (diffusers' StableDiffusionXLImg2ImgPipeline): `image` (a PIL image or a list of them, or an array [H, W, 3]
        / [B, H, W, 3] of uint8 or floats in [0, 1], at the DistriConfig's size; B divides the number of images) is
        VAE-encoded (row-sharded like the decode), its posterior sampled with `image_noise` (B, 4, H/8, W/8) (None:
        drawn from the seed; zeros: the posterior mean), noised to the level of step t_start = steps - min(int(steps
        * strength), steps) with `latents` (the unit noise diffusers draws after the posterior sample; None: from
        the seed), and denoised from there (the last steps - t_start steps of the schedule, the warmup counted from
        t_start; `strength` and `image_noise` are used only with an image). `progress(i, n)` is called with i = 0 when
        denoising starts (after compiling) and then as each step completes (i = 1 .. n, n the steps run); the loop
        then runs as one compiled program per step. Every argument is checked before any encoding or compiling (a
        one-line ConfigError); latents or an image that went NaN or infinite raise NonFiniteError, a device out of
        memory OutOfMemoryError. In a multi-process run (`distributed.initialize`) every process calls this with the
        same arguments and gets the same images (gathered from the global mesh; only process 0 needs to use them).
        """
        check_output_type(output_type)
        batch = check_prompts(prompt, prompt_2, negative_prompt, negative_prompt_2)
        per_prompt = int_arg("num_images_per_prompt", num_images_per_prompt, 1)
        seed = int_arg("seed", seed, 0, SEED_LIMIT, "2**63")
        guidance_scale = float_arg("guidance_scale", guidance_scale)
        guidance_rescale = float_arg("guidance_rescale", guidance_rescale, 0.0, 1.0)
        if progress is not None and not callable(progress):
            raise ConfigError(
                f"progress={short_repr(progress)} is not callable: pass a function progress(i, n) or None"
            )
        dc = self.distri_config
        do_cfg = guidance_scale > 1.0
        if dc.do_classifier_free_guidance != do_cfg:
            dc = dataclasses.replace(dc, do_classifier_free_guidance=do_cfg)
        n_images = batch * per_prompt
        time_ids = micro_conditioning(dc, original_size, crops_coords_top_left, target_size)
        sched = self.scheduler_for(scheduler)
        steps = check_schedule(sched, num_inference_steps)
        latent_shape = (4, dc.latent_height, dc.latent_width)
        latents = check_latents(latents, (n_images, *latent_shape), dc)
        first, pixels = 0, None
        if image is not None:
            first = check_strength(strength, steps)
            pixels = check_image(image, n_images, dc)
            image_noise = check_latents(image_noise, (len(pixels), *latent_shape), dc, "image_noise")
        # layout checks; nothing compiled yet
        d = self.denoiser(dc, sched, steps, guidance_rescale, progress, first)

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
        )
        time_ids = jnp.tile(jnp.asarray([time_ids], jnp.float32), (embeds.shape[0], 1))
        if latents is None:
            noise = jax.random.normal(
                prng_key(seed), (n_images, dc.latent_height, dc.latent_width, 4), jnp.float32
            )
        else:
            noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
        timings["encode_s"], compile_s = self._lap(t0, clock, 0.0)

        if pixels is None:
            start = noise * sched.init_noise_sigma(steps)
        else:
            t0 = time.perf_counter()
            with self.out_of_memory_as_error("the VAE encode", dc, len(pixels), False, self.encoder.devices):
                start = self._image_latents(pixels, image_noise, noise, sched, steps, first, seed)
                start = jax.block_until_ready(start)
            if spans_processes(d.devices):  # every process holds the same values: placed by the Denoiser
                start = to_host(start)
            timings["image_encode_s"], compile_s = self._lap(t0, clock, compile_s)

        t0 = time.perf_counter()
        with self.out_of_memory_as_error("denoising", dc, n_images, do_cfg, d.devices):
            out = d(
                self.unet_params,
                start,
                embeds,
                {"text_embeds": pooled, "time_ids": time_ids},
                guidance_scale=guidance_scale,
            )
            out = jax.block_until_ready(out)
            host_latents = to_host(out)
        check_denoised(d, host_latents, sched, self.unet.dtype, guidance_scale)
        timings["denoise_s"], compile_s = self._lap(t0, clock, compile_s)
        timings["compiled"] = d.last_compile_s > 0
        if output_type == "latent":
            return PipelineOutput(host_latents.transpose(0, 3, 1, 2), self._summary(timings, clock))

        t0 = time.perf_counter()
        with self.out_of_memory_as_error("the VAE decode", dc, n_images, False, self.decoder.devices):
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

    def _image_latents(self, pixels, image_noise, noise, sched, steps: int, first: int, seed: int):
        """img2img's starting latents [n, h, w, 4]: the image encoded (its posterior sampled with image_noise,
        else with noise drawn from the seed), repeated to the batch as diffusers repeats it, and noised to step
        `first`'s level with `noise` (the scheduler's `add_noise`)."""
        shape = (len(pixels), noise.shape[1], noise.shape[2], noise.shape[3])
        if image_noise is None:
            sample = jax.random.normal(jax.random.fold_in(prng_key(seed), 1), shape, jnp.float32)
        else:
            sample = jnp.asarray(image_noise.transpose(0, 2, 3, 1))
        z = self.encoder(self.vae_params, pixels, sample)
        if noise.shape[0] > z.shape[0]:  # diffusers concatenates copies of the whole batch
            z = jnp.tile(z, (noise.shape[0] // z.shape[0], 1, 1, 1))
        return sched.add_noise(steps, z, noise, first)

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

    @contextlib.contextmanager
    def out_of_memory_as_error(self, stage: str, dc: DistriConfig, n_images: int, do_cfg: bool, devices):
        """Turn a device's RESOURCE_EXHAUSTED inside the block into one OutOfMemoryError line (size, devices,
        options that use less); any other runtime error passes through unchanged."""
        try:
            yield
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            weights = ("UNet", self.unet_params) if stage == "denoising" else ("VAE", self.vae_params)
            raise OutOfMemoryError(
                out_of_memory_message(
                    stage, dc, n_images, do_cfg, devices, str(e), weights, self.memory_options(stage, dc)
                )
            ) from None

    def memory_options(self, stage: str, dc: DistriConfig) -> list:
        """The options that lower `stage`'s per-device memory and are not in effect already."""
        if stage == "the VAE encode":
            return [
                "more devices (the encode is row-sharded over them)",
                "vae_attention_impl='chunked' (--vae-attention chunked)",
            ]
        if stage != "denoising":
            return [
                "more devices (the decode is row-sharded over them)",
                "decode_tile_rows=64 (--decode-tile-rows 64) where it runs on one device",
                "vae_attention_impl='chunked' (--vae-attention chunked)",
            ]
        opts = ["more devices", "attention_impl='chunked' (--attention chunked)"]
        if dc.stale_kv != "hidden":
            opts.append("DistriConfig(stale_kv='hidden') (--stale-kv hidden)")
        if dc.stale_kv_dtype != "int8":
            opts.append("stale_kv_dtype='int8' (--stale-kv-dtype int8)")
        if jnp.dtype(self.unet.dtype).itemsize > 2:
            opts.append("dtype=jnp.bfloat16 (--dtype bfloat16)")
        return opts
