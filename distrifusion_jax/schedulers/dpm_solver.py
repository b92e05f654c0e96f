"""DPM-Solver++ 2M (Lu et al. 2022) matching diffusers' `DPMSolverMultistepScheduler` step for step."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from .base import Scheduler, karras_sigmas, sigma_to_t


class DPMSolverState(NamedTuple):
    """Tables of a DPM-Solver++ run plus the previous step's data prediction (the multistep history)."""

    sigmas: jnp.ndarray  # (steps + 1,) float32, sigmas[i] at step i plus the final level
    order: jnp.ndarray  # (steps,) int32, 1 or 2: the solver order used at step i
    prev_x0: jnp.ndarray  # sample-shaped float32: x0 predicted at the previous step (zeros before step 0)


@dataclasses.dataclass(frozen=True)
class DPMSolverScheduler(Scheduler):
    """Multistep DPM-Solver++ of order 1 or 2 (no SDE variant), configured like diffusers' scheduler."""

    name: ClassVar[str] = "dpm-solver"
    fixed_fields: ClassVar[dict] = {
        # Dynamic thresholding needs a quantile over all pixels of a sample: not computable on a row band.
        "thresholding": (False, None),
        "variance_type": (None,),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None),
    }

    timestep_spacing: str = "linspace"
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: Optional[bool] = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("solver_order", (1, 2))
        self.check_choice("solver_type", ("midpoint", "heun", "logrho", "bh1", "bh2"))
        self.check_choice("final_sigmas_type", ("zero", "sigma_min"))
        # diffusers runs "deis" as DPM-Solver++ (and the UniPC / DEIS solver types as midpoint); the SDE and
        # noise-prediction (non-++) variants are not implemented.
        self.check_choice("algorithm_type", ("dpmsolver++", "deis"))
        if self.algorithm_type == "deis" and self.final_sigmas_type == "zero":
            raise ConfigError(
                "unsupported dpm-solver scheduler config value final_sigmas_type='zero' with "
                "algorithm_type='deis' (diffusers refuses it): supported 'sigma_min'"
            )

    @property
    def _heun(self) -> bool:
        # diffusers treats the UniPC / DEIS solver types ("logrho", "bh1", "bh2") as midpoint.
        return self.solver_type == "heun"

    def _train(self):
        ac = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            ac[-1] = 2.0**-24  # as diffusers: keeps sigma and lambda finite at the last training timestep
        # Variance-exploding noise levels in float32 arithmetic, as diffusers.
        return ac, np.sqrt((np.float32(1) - ac) / ac)

    def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(int64 timesteps, float32 sigmas with the final level appended), as diffusers' `set_timesteps`."""
        n = self.check_steps(num_inference_steps)
        t = self.num_train_timesteps
        ac, train = self._train()
        # Half log-SNR lambda = log(alpha / sigma); timesteps whose lambda is below lambda_min_clipped are
        # dropped from the top of the range (for cosine schedules, where lambda diverges at t = T).
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
        last = t - int(np.searchsorted(lam[::-1], self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.steps_offset
        else:
            ts = np.arange(last, 0, -t / n).round() - 1
        if self.use_karras_sigmas:
            lo = self.sigma_min if self.sigma_min is not None else float(train[0])
            hi = self.sigma_max if self.sigma_max is not None else float(train[-1])
            sigmas = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sigmas, np.log(train))
            if self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(t), train)
        final = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        return np.ascontiguousarray(ts).astype(np.int64), sigmas

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The int64 UNet timesteps of each step, as diffusers' `DPMSolverMultistepScheduler.set_timesteps`."""
        return self._schedule(num_inference_steps)[0]

    def init_noise_sigma(self, num_inference_steps: int) -> float:
        """DPM-Solver works in the variance-preserving parameterisation: unit initial noise."""
        self.check_steps(num_inference_steps)
        return 1.0

    def init(self, num_inference_steps: int, sample, start: int = 0) -> DPMSolverState:
        """Tables for `num_inference_steps` steps and a zero history shaped like `sample` (float32).

        A run starting at step `start` (img2img) has no history there: that step is first order, as
        diffusers' lower-order count starts from the first step it runs.
        """
        ts, sigmas = self._schedule(num_inference_steps)
        n = len(ts)
        # The first step run has no history (first order). diffusers' last step is first order when
        # euler_at_final, when lower_order_final with fewer than 15 steps (stabilises short runs), or when
        # the final sigma is 0 (where the second-order correction has h = inf).
        final_first = (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        order = np.full(n, self.solver_order, np.int32)
        order[start] = 1
        if final_first:
            order[-1] = 1
        # zeros_like (not zeros(shape)) so that inside shard_map the history is typed as varying over the
        # mesh axes like the sample band it shadows; scan requires the carry's type to be stable.
        history = jnp.zeros_like(sample, dtype=jnp.float32)
        return DPMSolverState(jnp.asarray(sigmas), jnp.asarray(order), history)

    def add_noise(self, num_inference_steps: int, sample, noise, step_index: int):
        """`sample` noised to step `step_index`'s level in the variance-preserving form: alpha_t x0 + sigma_t
        noise (float32), as diffusers' `DPMSolverMultistepScheduler.add_noise` with its begin index."""
        sigma = self._schedule(num_inference_steps)[1][step_index]
        alpha_t = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return alpha_t * sample + (sigma * alpha_t) * noise

    def scale_model_input(self, state: DPMSolverState, sample, step_index):
        """DPM-Solver feeds the sample to the UNet unscaled."""
        del state, step_index
        return sample

    @staticmethod
    def _alpha_sigma_lambda(sigma):
        # VE sigma -> VP (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1, and lambda_t = log(alpha_t / sigma_t).
        alpha_t = 1 / jnp.sqrt(sigma * sigma + 1)
        sigma_t = sigma * alpha_t
        return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)

    def step(self, state: DPMSolverState, model_output, step_index, sample):
        """One DPM-Solver++ multistep update; elementwise in the sample.

        `step_index` may be a traced int32 scalar. Returns `(prev_sample, new_state)`, prev_sample in sample's
        dtype; the new state records this step's data prediction for the next step.
        """
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(state.sigmas[step_index + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(state.sigmas[step_index])
        # DPM-Solver++ integrates in the data prediction x0 (Lu et al. 2022b, eq. 9).
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s0 * out) / alpha_s0
        elif self.prediction_type == "sample":
            x0 = out
        else:
            x0 = alpha_s0 * x - sigma_s0 * out
        h = lambda_t - lambda_s0
        phi = alpha_t * (jnp.exp(-h) - 1.0)
        # First order (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0.
        first = sigma_t / sigma_s0 * x - phi * x0
        if self.solver_order == 1:
            return first.astype(sample.dtype), state._replace(prev_x0=x0)
        # Second order (Algorithm 2 of Lu et al. 2022b): D1 is the finite difference of x0 over lambda,
        # scaled by r0 = h_prev / h. At step 0 the history is unused (order 1), so clamp the index.
        _, _, lambda_s1 = self._alpha_sigma_lambda(state.sigmas[jnp.maximum(step_index - 1, 0)])
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = 1.0 / r0 * (x0 - state.prev_x0)
        if self._heun:
            second = first + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1
        else:
            second = first - 0.5 * phi * d1
        # Both branches are elementwise; select (never NaN-mixing: `where` drops the unused branch).
        prev = jnp.where(state.order[step_index] == 2, second, first)
        return prev.astype(sample.dtype), state._replace(prev_x0=x0)
