"""A model's abstract shapes, inputs and programs: no weights, no data, no compilation unless asked.

Shared by the reports (communication, memory, stale options) and the benchmark's dry run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..config import DistriConfig
from ..denoise import Denoiser
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..parallel import CFG, PATCH
from ..schedulers import make_scheduler
from ..tensor_parallel import to_layout
from ..tokenizer import CLIP_MAX_LENGTH

TEXT_TOKENS = CLIP_MAX_LENGTH  # prompt embeddings' length
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration to report: model, image size in pixels, device count, CFG split, dtype, mode,
    and the stale K/V options (DistriConfig.stale_kv, stale_kv_dtype)."""

    config: UNetConfig
    height: int
    width: int
    devices: int
    cfg_split: bool = True
    dtype: str = "bfloat16"
    mode: str = "corrected_async_gn"
    batch: int = 1
    stale_kv: str = "kv"
    stale_kv_dtype: Optional[str] = None

    def row(self) -> dict:
        """The case's fields as a report row starts (all but the model config)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}

    def distri_config(self, devices: Optional[int] = None) -> DistriConfig:
        """The DistriConfig of this case (guidance on), for `devices` devices (default: the case's)."""
        return DistriConfig(
            self.height,
            self.width,
            devices=devices or self.devices,
            split_batch=self.cfg_split,
            mode=self.mode,
            stale_kv=self.stale_kv,
            stale_kv_dtype=self.stale_kv_dtype,
        )


# ---- abstract model and inputs ----
def abstract_weights(model, dtype) -> dict:
    """A UNet's or VAE's parameters as ShapeDtypeStructs in `dtype`: no weights are created."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), model.abstract_params())


def abstract_model(config: UNetConfig, dtype: str):
    """(unet, params as ShapeDtypeStructs in `dtype`): no weights are created."""
    dt = jnp.dtype(dtype)
    unet = UNet2DConditionModel(config, dtype=dt, param_dtype=dt)
    return unet, abstract_weights(unet, dt)


def abstract_inputs(case: Case):
    """(latents [B, h, w, C] f32, encoder_hidden_states [2B, 77, D], added_cond_kwargs) as ShapeDtypeStructs."""
    cfg, dt, s = case.config, jnp.dtype(case.dtype), jax.ShapeDtypeStruct
    b, gb = case.batch, 2 * case.batch  # guidance: [uncond; cond]
    latents = s((b, case.height // 8, case.width // 8, cfg.in_channels), jnp.float32)
    ehs = s((gb, TEXT_TOKENS, cfg.cross_attention_dim[0]), dt)
    added = None
    if cfg.addition_embed_type == "text_time":
        total, per_id = cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim
        n = SDXL_TIME_IDS if total > SDXL_TIME_IDS * per_id else 1  # tiny configs: one time id
        text = total - n * per_id
        added = {"text_embeds": s((gb, text), dt), "time_ids": s((gb, n), dt)}
    return latents, ehs, added


def make_denoiser(unet, case: Case, devices: Optional[int] = None):
    """A Denoiser for the case (DDIM, 50 steps: the report does not depend on the scheduler)."""
    return Denoiser(unet, case.distri_config(devices), make_scheduler("ddim", {}), 50)


# ---- tracing the displaced step ----
def trace_displaced_step(denoiser, params, inputs):
    """Trace one displaced step under shard_map: (jax Traced, local shapes {"state", "band", "out"}).

    "band" is this device's latent rows [B, h, W, C]; "out" the UNet's prediction on it before the
    guidance combination [B_unet, h, W, C_out] (B_unet: B with the CFG split, 2B without).

    The stale state starts as the zeros Flax creates for a missing collection (what `initial_stale`
    gives), so one trace yields both the state's shapes and the program; its FLOPs equal those of the
    step with the state as an input (tests/test_comm_report.py checks it on a tiny model).
    """
    latents, ehs, added = inputs
    d, seen = denoiser, {}
    # as in the loop: with one band per device group nothing is exchanged and no state is kept
    unet = d.model(d.plan("displaced") if d.patches > 1 else None)
    t = d.timesteps[0]

    def local(p, x, e, a):  # runs at trace time with this device's shapes
        eps, state = d.eps(unet, p, None, x, t, e, a)
        state = {} if state is None else state
        b_unet = x.shape[0] * (1 if d.cfg_size == 2 or not d.cfg else 2)
        out = (b_unet,) + x.shape[1:3] + (unet.config.out_channels,)
        seen.update(state=shapes(state), band=shapes(x), out=jax.ShapeDtypeStruct(out, unet.dtype))
        return eps, state

    batch = P(CFG) if d.cfg_size == 2 else P()
    step = jax.shard_map(
        local,
        mesh=d.mesh,
        in_specs=(P(), P(None, PATCH), batch, batch),
        out_specs=(P(None, PATCH), P((CFG, PATCH))),
    )
    return jax.jit(step).trace(params, latents, ehs, added), seen


def lower_loop(denoiser, params, latents, ehs, added):
    """The Denoiser's whole loop lowered for abstract weights and inputs: what its first call compiles
    (tensor parallelism reads the weights in its own layout)."""
    if denoiser.tensor is not None:
        params = jax.eval_shape(to_layout, params)
    return denoiser._jitted.lower(params, latents, ehs, added, jax.ShapeDtypeStruct((), jnp.float32))


def single_device_flops(unet, params, case: Case) -> float:
    """XLA's FLOPs of one single-device noise prediction of the whole image, guidance batch [uncond; cond]."""
    d = make_denoiser(unet, case, devices=1)
    plain, t = d.model(None), d.timesteps[0]
    fn = lambda p, x, e, a: d.eps(plain, p, None, x, t, e, a)[0]
    return flops(jax.jit(fn).lower(params, *abstract_inputs(case)))


def flops(lowered) -> float:
    """FLOPs from XLA's cost analysis of a lowered (not compiled) program.

    For a `jax.shard_map` inside `jit` this is per device: the lowered module holds the shard_map
    body with local shapes (partitioning happens later, at compile). Verified in
    tests/test_comm_report.py: a shard_map'd [M, K] @ [K, N] with rows over 4 devices reports
    2 (M/4) K N, the compiled program agrees, and a shard_map'd tiny UNet on its band reports the
    same FLOPs as the unsharded UNet run on an image of the band's size.
    """
    return float(lowered.cost_analysis()["flops"])


# ---- sizes ----
def shapes(tree):
    """The ShapeDtypeStructs of a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def nbytes(a) -> int:
    """Bytes of one array (or ShapeDtypeStruct)."""
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def memory(compiled) -> dict:
    """Per-device bytes of a compiled program by XLA's memory analysis: argument, output, temp, alias,
    generated_code, and peak (arguments + outputs + temporaries - aliased)."""
    m = compiled.memory_analysis()
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
