"""SDXL text-to-image: prompts -> embeddings -> sharded latents -> DistriFusion loop -> VAE decode -> images."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import enable_compilation_cache
from .config import DistriConfig, UNetConfig
from .decode import Decoder
from .denoise import Denoiser
from .distributed import check_local_share, replicate, spans_processes, to_host
from .errors import CheckpointError, DistriFusionError
from .parallel import make_mesh
from .prompts import PromptEncoder, as_list
from .schedulers import make_scheduler, scheduler_from_config
from .weights import load_text_encoder, load_unet
from .weights.vae import load_vae

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclasses.dataclass
class PipelineOutput:
    """`images`: PIL images, an array [B, H, W, 3] in [0, 1] ("np"), or latents [B, 4, h, w] ("latent");
    `timings`: seconds spent in text encoding, denoising (with compilation on a first call) and decoding."""

    images: Any
    timings: dict


def resolve_model_path(path_or_hub_id) -> Path:
    """A local pipeline folder, or a hub id looked up in huggingface_hub's local cache (then the network)."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder {name} does not exist (and it is not a hub id like "
                              "'stabilityai/stable-diffusion-xl-base-1.0')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise CheckpointError(f"{name} is not a local folder and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not cached: try the network unless told not to
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise CheckpointError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                                  f"download it first (huggingface-cli download {name}) or pass a folder") from None
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{name} is not in the local Hugging Face cache and could not be downloaded "
                              f"({type(e).__name__}); download it where the network is reachable or pass a "
                              "local folder") from None


class DistriSDXLPipeline:
    """Stable Diffusion XL with displaced patch parallelism over the devices of a DistriConfig."""

    def __init__(self, unet, unet_params, vae, vae_params, text_encoders, text_params, tokenizers,
                 scheduler_config: dict, distri_config: DistriConfig, force_zeros_for_empty_prompt: bool = True,
                 scheduler: Optional[str] = None, parallel_decode: bool = True, decode_tile_rows=None):
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.prompt_encoder = PromptEncoder(tokenizers, text_encoders, text_params)
        self.scheduler_config = scheduler_config
        self.default_scheduler = scheduler
        self.scheduler_for(scheduler)  # fail now on an unknown name or class
        self.distri_config = distri_config
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._denoisers: dict = {}
        devices = distri_config.resolve_devices()
        self.decoder = Decoder(vae, devices if parallel_decode else devices[:1], tile_rows=decode_tile_rows)
        if spans_processes(devices):  # several processes: weights placed once, replicated on all their devices
            check_local_share(devices)
            mesh = make_mesh(devices, 1)
            self.unet_params, self.vae_params = replicate(unet_params, mesh), replicate(vae_params, mesh)

    # ---- loading ----
    @classmethod
    def from_pretrained(cls, path_or_hub_id, distri_config: Optional[DistriConfig] = None, dtype=jnp.bfloat16,
                        variant: Optional[str] = None, scheduler: Optional[str] = None, vae_dtype=None,
                        attention_impl: Optional[str] = None, vae_attention_impl: Optional[str] = "auto",
                        compilation_cache=None,
                        parallel_decode: bool = True, decode_tile_rows=None) -> "DistriSDXLPipeline":
        """Load a diffusers SDXL pipeline folder (or its fp16/bf16 variant, or our converted folder).

        `attention_impl` (UNet) and `vae_attention_impl` (VAE): None (jax.nn.dot_product_attention's
        choice), "xla", "cudnn", "chunked" (blockwise, bounded memory on any backend) or "auto" ("chunked"
        for attentions whose scores would exceed 1 GiB; at 3840^2 the UNet's and the VAE's need it). The
        VAE defaults to "auto": its one-head mid-block attention over every latent pixel would otherwise
        store 17 GB of scores at 2048^2 and 212 GB at 3840^2 (the UNet's default stays None; on GPU
        pass "cudnn" for speed, "chunked" or "auto" for memory).
        `dtype`: UNet and text encoders; `vae_dtype`: default float32 when the VAE's config asks for
        `force_upcast` (SDXL's does), else `dtype`. `scheduler`: "ddim" | "euler" | "dpm-solver"
        overrides the class in scheduler/scheduler_config.json. `compilation_cache`: a directory for
        JAX's persistent compilation cache, or "off" (default: $DISTRIFUSION_JAX_CACHE, else
        ~/.cache/distrifusion-jax/xla), so a new process reuses compiled programs. `parallel_decode`:
        decode row-sharded over the DistriConfig's devices (exact; default) rather than on one device.
        `decode_tile_rows`: where the decode runs on one device, decode in overlapping tiles of this many
        latent rows one after another (memory of one tile; approximate, like diffusers' VAE tiling).
        """
        from transformers import CLIPTokenizer

        enable_compilation_cache(compilation_cache)
        root = resolve_model_path(path_or_hub_id)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise CheckpointError(f"{root}: no model_index.json; pass an SDXL pipeline folder (with unet/, vae/, "
                                  "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
        index = json.loads(index_path.read_text())
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: missing component folder(s) {', '.join(missing)} of an SDXL pipeline")
        distri_config = distri_config or DistriConfig()
        # a size or device count that does not fit fails before any weight is read
        distri_config.check_model(UNetConfig.from_json(root / "unet" / "config.json"),
                                  len(distri_config.resolve_devices()))
        unet, unet_params = load_unet(root / "unet", dtype=dtype, variant=variant, attention_impl=attention_impl)
        vae_probe = json.loads((root / "vae" / "config.json").read_text())
        vae_dtype = vae_dtype or (jnp.float32 if vae_probe.get("force_upcast", True) else dtype)
        vae, vae_params = load_vae(root / "vae", dtype=vae_dtype, variant=variant, attention_impl=vae_attention_impl)
        encoders, text_params = [], []
        for name in ("text_encoder", "text_encoder_2"):
            model, params = load_text_encoder(root / name, dtype=dtype, variant=variant)
            encoders.append(model)
            text_params.append(params)
        tokenizers = [CLIPTokenizer.from_pretrained(str(root / name)) for name in ("tokenizer", "tokenizer_2")]
        sched_path = root / "scheduler" / "scheduler_config.json"
        if not sched_path.is_file():
            raise CheckpointError(f"{sched_path} is missing")
        return cls(unet, unet_params, vae, vae_params, encoders, text_params, tokenizers,
                   json.loads(sched_path.read_text()), distri_config,
                   index.get("force_zeros_for_empty_prompt", True), scheduler, parallel_decode, decode_tile_rows)

    def scheduler_for(self, name: Optional[str] = None):
        name = name or self.default_scheduler
        return make_scheduler(name, self.scheduler_config) if name else scheduler_from_config(self.scheduler_config)

    def denoiser(self, distri_config: DistriConfig, scheduler, steps: int, guidance_rescale: float,
                 progress=None) -> Denoiser:
        """The compiled loop for this (config, scheduler, steps, rescale), built once and reused."""
        key = (distri_config, scheduler, steps, float(guidance_rescale), progress is not None)
        if key not in self._denoisers:
            self._denoisers[key] = Denoiser(self.unet, distri_config, scheduler, steps,
                                            guidance_rescale=guidance_rescale, progress=progress)
        d = self._denoisers[key]
        d.progress = progress
        return d

    # ---- generation ----
    def __call__(self, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
                 seed: int = 0, latents=None, num_images_per_prompt: int = 1,
                 original_size: Optional[Sequence[int]] = None, crops_coords_top_left: Sequence[int] = (0, 0),
                 target_size: Optional[Sequence[int]] = None, output_type: str = "pil",
                 scheduler: Optional[str] = None, progress=None) -> PipelineOutput:
        """Generate images; the size and the device layout come from the DistriConfig.

        `latents`: diffusers' layout (B, 4, H/8, W/8) and semantics (unit noise, multiplied here by the
        scheduler's initial sigma), so a diffusers image can be reproduced exactly. `progress(i, n)`
        is called as denoising steps complete. In a multi-process run (`distributed.initialize`) every
        process calls this with the same arguments and gets the same images (gathered from the
        global mesh; only process 0 needs to use them).
        """
        if output_type not in ("pil", "np", "latent"):
            raise DistriFusionError(f"unknown output_type {output_type!r}: use 'pil', 'np' or 'latent'")
        timings = {}
        t0 = time.perf_counter()
        dc = self.distri_config
        do_cfg = guidance_scale > 1.0
        if dc.do_classifier_free_guidance != do_cfg:
            dc = dataclasses.replace(dc, do_classifier_free_guidance=do_cfg)
        batch = len(as_list(prompt))
        embeds, pooled = self.prompt_encoder(prompt, prompt_2, negative_prompt, negative_prompt_2, batch, do_cfg,
                                             self.force_zeros_for_empty_prompt, num_images_per_prompt)
        n_images = batch * num_images_per_prompt
        h, w = dc.latent_height, dc.latent_width
        time_ids = list(original_size or (dc.height, dc.width)) + list(crops_coords_top_left) + \
            list(target_size or (dc.height, dc.width))
        time_ids = jnp.tile(jnp.asarray([time_ids], jnp.float32), (embeds.shape[0], 1))
        sched = self.scheduler_for(scheduler)
        sigma = sched.init_noise_sigma(num_inference_steps)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), (n_images, h, w, 4), jnp.float32)
        else:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n_images, 4, h, w):
                raise DistriFusionError(f"latents have shape {latents.shape}; expected ({n_images}, 4, {h}, {w}) "
                                        f"for {n_images} image(s) of {dc.height}x{dc.width}")
            noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        d = self.denoiser(dc, sched, num_inference_steps, guidance_rescale, progress)
        out = d(self.unet_params, noise * sigma, embeds, {"text_embeds": pooled, "time_ids": time_ids},
                guidance_scale=guidance_scale)
        out = jax.block_until_ready(out)
        timings["compile_s"] = d.last_compile_s
        timings["denoise_s"] = time.perf_counter() - t0 - d.last_compile_s
        timings["compiled"] = d.last_compile_s > 0
        if output_type == "latent":
            return PipelineOutput(to_host(out).transpose(0, 3, 1, 2), timings)

        t0 = time.perf_counter()
        image = np.asarray(to_host(self.decoder(self.vae_params, out / self.vae.config.scaling_factor)), np.float32)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        timings["decode_s"] = time.perf_counter() - t0
        if output_type == "np":
            return PipelineOutput(image, timings)
        from PIL import Image

        return PipelineOutput([Image.fromarray((im * 255).round().astype(np.uint8)) for im in image], timings)


