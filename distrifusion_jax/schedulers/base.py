"""Scheduler protocol, diffusers-config parsing and the training noise schedule shared by all schedulers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def fmt_allowed(allowed) -> str:
    """Render the accepted values of a field for an error message."""
    return ", ".join(repr(a) for a in allowed)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Base of the schedulers: the diffusers config fields every one of them reads.

    A scheduler is an immutable, hashable description (so it can be a static argument of `jax.jit`);
    the per-run data lives in the pytree returned by `init`. Subclasses implement `timesteps`,
    `init_noise_sigma`, `init`, `scale_model_input`, `step` and `add_noise` (img2img: the noised latents
    a run starting at a later step begins from), and may redefine the defaults below (diffusers'
    defaults differ per scheduler class). Step indices always index the whole schedule of
    `num_inference_steps` steps, also in a run that starts later (`init(..., start=)`).
    """

    name: ClassVar[str] = ""
    # Fields diffusers' class accepts but we only support at one value: {field: (accepted values)}.
    fixed_fields: ClassVar[dict[str, tuple]] = {}

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    # ---- construction ----
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Scheduler":
        """Build from a diffusers `scheduler_config.json` dict, possibly written for another scheduler class.

        Like diffusers' `from_config`, only the fields this scheduler uses are read (the rest are ignored)
        and keys listed in `_use_default_values` fall back to this class's defaults.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"scheduler config must be a dict, got {type(config).__name__}")
        defaults = set(config.get("_use_default_values", ()) or ())
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and k not in defaults}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        for key, allowed in cls.fixed_fields.items():
            if key in config and key not in defaults and config[key] not in allowed:
                raise ConfigError(
                    f"unsupported {cls.name} scheduler config value {key}={config[key]!r}: "
                    f"supported {fmt_allowed(allowed)}"
                )
        return cls(**kwargs)

    def __post_init__(self):
        self.check_choice("beta_schedule", BETA_SCHEDULES)
        self.check_choice("timestep_spacing", TIMESTEP_SPACINGS)
        self.check_choice("prediction_type", PREDICTION_TYPES)
        for key in ("num_train_timesteps", "steps_offset"):
            value = getattr(self, key)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or (key == "num_train_timesteps" and value < 2)
            ):
                raise ConfigError(
                    f"unsupported {self.name} scheduler config value {key}={value!r}: expected an int"
                    + (" >= 2" if key == "num_train_timesteps" else "")
                )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(
                f"{self.name} scheduler config: trained_betas has {len(self.trained_betas)} entries "
                f"but num_train_timesteps={self.num_train_timesteps}"
            )

    def check_choice(self, key: str, allowed: tuple) -> None:
        """Raise ConfigError naming `key` unless its value is one of `allowed`."""
        value = getattr(self, key)
        if value not in allowed:
            raise ConfigError(
                f"unsupported {self.name} scheduler config value {key}={value!r}: "
                f"supported {fmt_allowed(allowed)}"
            )

    def check_steps(self, num_inference_steps) -> int:
        """Validate the number of denoising steps (diffusers refuses more steps than training timesteps)."""
        n = num_inference_steps
        if (
            not isinstance(n, (int, np.integer))
            or isinstance(n, bool)
            or not 1 <= n <= self.num_train_timesteps
        ):
            raise ConfigError(
                f"num_inference_steps={n!r} must be an int in [1, num_train_timesteps="
                f"{self.num_train_timesteps}]"
            )
        return int(n)

    # ---- training noise schedule ----
    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative product of (1 - beta) over the training timesteps, float32 (diffusers' `alphas_cumprod`).

        Rounded like diffusers: betas and 1 - beta are float32, the running product is accumulated in
        float64 (as torch's CPU cumprod does) and rounded to float32.
        """
        t = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, t).astype(np.float32)
        elif self.beta_schedule == "scaled_linear":
            # Stable Diffusion's schedule: linear in sqrt(beta), squared.
            root = np.linspace(self.beta_start**0.5, self.beta_end**0.5, t).astype(np.float32)
            betas = (root.astype(np.float64) ** 2).astype(np.float32)
        else:
            # Glide's cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999.
            def alpha_bar(x):
                return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array(
                [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)], np.float32
            )
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas = np.float32(1) - betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    float32 throughout, like diffusers (the product accumulated in float64 as torch does).
    """
    one = np.float32(1)
    root = np.sqrt(np.cumprod((one - betas).astype(np.float64)).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return one - alphas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The n noise levels of Karras et al. 2022 (eq. 5, rho = 7), from sigma_max down to sigma_min, float64."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`: linear interpolation in log-sigma between the two
    neighbouring training sigmas (what diffusers' `_sigma_to_t` does for Karras schedules)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # Index of the last training sigma <= sigma (training sigmas increase with t), kept one short of the end
    # so that [low, low + 1] is always a valid interval; the weight is clipped to it.
    low = np.clip((log_sigma[None, :] >= log_train_sigmas[:, None]).sum(0) - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
