"""Euler sampler (Karras et al. 2022, Algorithm 2 without churn) matching diffusers' `EulerDiscreteScheduler`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from .base import Scheduler, karras_sigmas, sigma_to_t


class EulerState(NamedTuple):
    """Noise levels of an Euler run: sigmas[i] at step i, plus the final level (0 or sigma_min)."""

    sigmas: jnp.ndarray  # (steps + 1,) float32


@dataclasses.dataclass(frozen=True)
class EulerScheduler(Scheduler):
    """Deterministic Euler (s_churn = 0), configured like diffusers' `EulerDiscreteScheduler`."""

    name: ClassVar[str] = "euler"
    # Exponential and beta sigma spacings are not implemented.
    fixed_fields: ClassVar[dict] = {"use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None)}

    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"
    use_karras_sigmas: Optional[bool] = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("interpolation_type", ("linear", "log_linear"))
        self.check_choice("timestep_type", ("discrete", "continuous"))
        self.check_choice("final_sigmas_type", ("zero", "sigma_min"))
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            # diffusers then feeds 0.25 * log(sigma) to the UNet instead of a timestep (EDM-style models).
            raise ConfigError(
                "unsupported euler scheduler config value timestep_type='continuous' with "
                "prediction_type='v_prediction': supported 'discrete'"
            )

    def _train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            # diffusers replaces the zero alpha_bar of the last timestep by 2**-24 so its sigma stays finite.
            ac[-1] = 2.0**-24
        # Variance-exploding noise level of the VP process: x_t / sqrt(alpha_bar) = x0 + sigma * eps
        # (float32 arithmetic, as diffusers).
        return np.sqrt((np.float32(1) - ac) / ac)

    def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 timesteps, float32 sigmas with the final level appended), as diffusers' `set_timesteps`."""
        n = self.check_steps(num_inference_steps)
        t = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, t - 1, n, dtype=np.float32)[::-1].copy()
        elif self.timestep_spacing == "leading":
            ts = (np.arange(n) * (t // n)).round()[::-1].astype(np.float32) + self.steps_offset
        else:
            ts = np.arange(t, 0, -t / n).round().astype(np.float32) - 1
        train = self._train_sigmas()
        if self.interpolation_type == "linear":
            sigmas = np.interp(ts, np.arange(t), train)
        else:
            # Evenly spaced in log-sigma between the smallest and largest training sigma (float32 like diffusers).
            sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1, dtype=np.float32))
        if self.use_karras_sigmas:
            lo = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
            hi = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return ts, np.concatenate([sigmas, [last]]).astype(np.float32)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The float32 UNet timesteps of each step (fractional for linspace / Karras), as diffusers'."""
        return self._schedule(num_inference_steps)[0]

    def init_noise_sigma(self, num_inference_steps: int) -> float:
        """Standard deviation of the initial latent noise, as diffusers' `init_noise_sigma`.

        diffusers uses sqrt(sigma_max^2 + 1) for "leading" spacing and sigma_max otherwise.
        """
        sigma_max = self._schedule(num_inference_steps)[1].max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + np.float32(1)))

    def init(self, num_inference_steps: int, sample, start: int = 0) -> EulerState:
        """The sigma table of `num_inference_steps` steps; Euler keeps no sample history, so a run starting
        at step `start` reads the same table from sigmas[start] (diffusers' `set_begin_index`)."""
        del sample, start
        return EulerState(jnp.asarray(self._schedule(num_inference_steps)[1]))

    def add_noise(self, num_inference_steps: int, sample, noise, step_index: int):
        """`sample` noised to step `step_index`'s level: x0 + sigma noise (float32), as diffusers'
        `EulerDiscreteScheduler.add_noise` with its begin index (img2img's starting latents)."""
        return sample + noise * self._schedule(num_inference_steps)[1][step_index]

    def scale_model_input(self, state: EulerState, sample, step_index):
        """Divide by sqrt(sigma^2 + 1): the UNet expects unit-variance input (k-diffusion's c_in)."""
        sigma = state.sigmas[step_index]
        return (sample.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)

    def step(self, state: EulerState, model_output, step_index, sample):
        """One Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma; elementwise in the sample.

        `step_index` may be a traced int32 scalar. Returns `(prev_sample, state)`, prev_sample in sample's dtype.
        """
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        sigma = state.sigmas[step_index]
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif self.prediction_type == "sample":
            x0 = out
        else:
            # v-prediction in the sigma parameterisation: x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1).
            x0 = out * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
        derivative = (x - x0) / sigma
        dt = state.sigmas[step_index + 1] - sigma
        return (x + derivative * dt).astype(sample.dtype), state
