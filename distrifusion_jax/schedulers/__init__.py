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


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """The scheduler `name` ("ddim" | "euler" | "dpm-solver") configured from a diffusers scheduler config dict.

    The config may have been written for another scheduler class (SDXL ships an Euler config); fields the
    chosen scheduler does not use are ignored, as diffusers' `from_config` does.
    """
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}: supported {', '.join(repr(k) for k in SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler a diffusers scheduler config describes, chosen by its `_class_name`."""
    cls_name = config.get("_class_name") if isinstance(config, Mapping) else None
    if cls_name not in CLASS_NAMES:
        raise ConfigError(
            f"unsupported scheduler _class_name={cls_name!r}: supported "
            f"{', '.join(repr(k) for k in CLASS_NAMES)}"
        )
    return make_scheduler(CLASS_NAMES[cls_name], config)


__all__ = [
    "Scheduler",
    "SCHEDULERS",
    "make_scheduler",
    "scheduler_from_config",
    "DDIMScheduler",
    "DDIMState",
    "EulerScheduler",
    "EulerState",
    "DPMSolverScheduler",
    "DPMSolverState",
]
