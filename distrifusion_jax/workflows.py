"""What the pipelines do besides one generation: LoRA adapters fused into the weights, and the high-res fix
(a base pass at the model's native size, upscaled, refined by img2img on the mesh)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

from PIL import Image

from .arguments import check_output_type, float_arg, int_arg
from .config import DistriConfig
from .weights import fuse_lora, read_lora, unfuse_lora


class Workflows:
    """Mixed into the pipelines (`pipeline.DistriPipeline`), which provide the weights, `distri_config`,
    `encoder_names`, `prompt_encoder` and `__call__`."""

    # ---- LoRA ----
    def _lora_params(self) -> dict:
        return {"unet": self.unet_params, **dict(zip(self.encoder_names, self.prompt_encoder.params))}

    def _set_lora_params(self, params: dict) -> None:
        self.unet_params = params["unet"]
        self.prompt_encoder.params = [params[name] for name in self.encoder_names]

    def load_lora(self, path, scale: float = 1.0) -> "Workflows":
        """Fuse a LoRA (kohya or diffusers/peft safetensors; UNet and both text encoders, linear and conv
        layers) into the weights: W + scale * alpha / rank * up @ down, in float32, cast back to the weights'
        dtype and placement. No per-step cost and no recompilation (the weights are the programs'
        arguments). Several adapters stack; `unload_lora()` restores the weights before all of them, bit for
        bit. A LoRA that fits no layer of this model, or with a wrong rank, is one CheckpointError line."""
        scale = float_arg("scale", scale)
        params, self._lora_undo = fuse_lora(self._lora_params(), read_lora(path), scale, self._lora_undo)
        self._set_lora_params(params)
        return self

    def unload_lora(self) -> "Workflows":
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
    ):
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
