"""Diffusion schedulers as pure functions of a small pytree state: DDIM, Euler and DPM-Solver++ 2M."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .base import Scheduler
from .ddim import DDIMScheduler, DDIMState
from .dpm_solver import DPMSolverScheduler, DPMSolverState
from .euler import EulerScheduler, EulerState

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "euler": EulerScheduler,
    "dpm-solver": DPMSolverScheduler,
}
# diffusers `_class_name` -> our name.
CLASS_NAMES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm-solver",
}
# diffusers classes we do not implement, run as the nearest one we do. PNDM (SD 1.x's and SD 2.x base's
# published scheduler; with skip_prk_steps, PLMS) is a linear multistep method over DDIM's update (Liu et al.
# 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", Sec. 3); its first-order case is DDIM,
# which reads the same fields (betas, steps_offset, set_alpha_to_one, clip_sample, prediction_type).
FALLBACKS = {"PNDMScheduler": "ddim"}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """The scheduler `name` ("ddim" | "euler" | "dpm-solver") configured from a diffusers scheduler config dict.

    The config may have been written for another scheduler class (SDXL ships an Euler config); fields the
    chosen scheduler does not use are ignored, as diffusers' `from_config` does.
    """
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}: supported {', '.join(repr(k) for k in SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler a diffusers scheduler config describes, chosen by its `_class_name` (a class in FALLBACKS
    runs as the scheduler named there: PNDMScheduler as DDIM)."""
    cls_name = config.get("_class_name") if isinstance(config, Mapping) else None
    name = CLASS_NAMES.get(cls_name) or FALLBACKS.get(cls_name)
    if name is None:
        raise ConfigError(
            f"unsupported scheduler _class_name={cls_name!r}: supported "
            f"{', '.join(repr(k) for k in (*CLASS_NAMES, *FALLBACKS))}"
        )
    return make_scheduler(name, config)


__all__ = [
    "Scheduler",
    "SCHEDULERS",
    "CLASS_NAMES",
    "FALLBACKS",
    "make_scheduler",
    "scheduler_from_config",
    "DDIMScheduler",
    "DDIMState",
    "EulerScheduler",
    "EulerState",
    "DPMSolverScheduler",
    "DPMSolverState",
]
