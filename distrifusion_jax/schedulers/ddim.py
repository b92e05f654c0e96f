"""Deterministic DDIM (Song et al. 2021, eta = 0) matching diffusers' `DDIMScheduler` step for step."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
import numpy as np

from .base import Scheduler


class DDIMState(NamedTuple):
    """Per-step tables of a DDIM run: alpha_bar at the step's timestep and at the one it jumps to."""

    alpha_prod: jnp.ndarray  # (steps,) float32
    alpha_prod_prev: jnp.ndarray  # (steps,) float32


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(Scheduler):
    """DDIM with eta = 0, configured like diffusers' `DDIMScheduler` (same fields and defaults)."""

    name: ClassVar[str] = "ddim"
    # Dynamic thresholding takes a per-sample quantile over all pixels, which a row band cannot compute.
    fixed_fields: ClassVar[dict] = {"thresholding": (False, None)}

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    def init_noise_sigma(self, num_inference_steps: int) -> float:
        """DDIM starts from unit-variance noise."""
        self.check_steps(num_inference_steps)
        return 1.0

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The int64 UNet timesteps of each step, as diffusers' `DDIMScheduler.set_timesteps` makes them."""
        n = self.check_steps(num_inference_steps)
        t = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            steps = np.linspace(0, t - 1, n).round()[::-1]
        elif self.timestep_spacing == "leading":
            # Table 2 of Lin et al. 2023: multiples of floor(T / n) from 0, plus the model's offset.
            steps = (np.arange(n) * (t // n)).round()[::-1] + self.steps_offset
        else:
            steps = np.round(np.arange(t, 0, -t / n)) - 1
        return np.ascontiguousarray(steps).astype(np.int64)

    def init(self, num_inference_steps: int, sample, start: int = 0) -> DDIMState:
        """Schedule tables for `num_inference_steps` steps; DDIM keeps no sample history, so a run starting
        at step `start` needs the same tables."""
        del sample, start  # first-order and deterministic: nothing sample-shaped to carry
        ts = self.timesteps(num_inference_steps)
        ac = self.alphas_cumprod()
        # diffusers jumps by floor(T / n) whatever the spacing (so not always to the next listed timestep);
        # past t = 0 it uses 1 (set_alpha_to_one) or alpha_bar at t = 0.
        prev = ts - self.num_train_timesteps // len(ts)
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        return DDIMState(jnp.asarray(ac[ts]), jnp.asarray(alpha_prev))

    def add_noise(self, num_inference_steps: int, sample, noise, step_index: int):
        """`sample` noised to the timestep of step `step_index`: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise,
        float32, as diffusers' `DDIMScheduler.add_noise` (img2img's starting latents)."""
        a_t = self.alphas_cumprod()[self.timesteps(num_inference_steps)[step_index]]
        return np.sqrt(a_t) * sample + np.sqrt(np.float32(1) - a_t) * noise

    def scale_model_input(self, state: DDIMState, sample, step_index):
        """DDIM feeds the sample to the UNet unscaled."""
        del state, step_index
        return sample

    def step(self, state: DDIMState, model_output, step_index, sample):
        """One DDIM update x_t -> x_prev (eq. 12 of Song et al. with sigma_t = 0); elementwise in the sample.

        `step_index` may be a traced int32 scalar. Returns `(prev_sample, state)`, prev_sample in sample's dtype.
        """
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        a_t = state.alpha_prod[step_index]
        a_prev = state.alpha_prod_prev[step_index]
        b_t = 1 - a_t
        # Recover (x0, eps) from the parameterisation the UNet was trained with (v: Salimans & Ho 2022).
        if self.prediction_type == "epsilon":
            x0 = (x - jnp.sqrt(b_t) * out) / jnp.sqrt(a_t)
            eps = out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
        else:
            x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * out
            eps = jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps  (the "direction pointing to x_t").
        prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps
        return prev.astype(sample.dtype), state
