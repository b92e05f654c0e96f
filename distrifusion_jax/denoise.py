"""The jitted denoising loop: single device, or displaced patch parallelism under `jax.shard_map`."""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .config import DistriConfig
from .distributed import place, spans_processes, to_host
from .errors import DistriFusionError
from .parallel import CFG, PATCH, STALE, PatchPlan, make_mesh, vary
from .parallel import collectives as C
from .tensor_parallel import TensorPlan


def guided(eps_uncond, eps_cond, scale, rescale: float = 0.0, axis=None):
    """Classifier-free guidance in float32, with diffusers' optional `guidance_rescale`.

    Rescaling (Lin et al. 2023, section 3.4) matches the guided prediction's per-sample standard
    deviation to the conditional one's; on a band the statistics come from the whole image (`axis`).
    """
    u, c = eps_uncond.astype(jnp.float32), eps_cond.astype(jnp.float32)
    out = u + scale * (c - u)
    if rescale:
        ratio = C.sample_std(c, axis) / C.sample_std(out, axis)
        out = rescale * out * ratio + (1.0 - rescale) * out
    return out


class Denoiser:
    """The pieces of one denoising run on a mesh, shared by the loop, the tests and the reports.

    Built once per (model, DistriConfig, scheduler, steps, guidance); `__call__` is jitted, so a
    second call with the same shapes reuses the compiled program.
    """

    def __init__(
        self,
        unet,
        distri_config: DistriConfig,
        scheduler,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        progress=None,
    ):
        self.unet, self.config, self.scheduler = unet, distri_config, scheduler
        self.guidance_scale = float(guidance_scale)  # default; each call may pass another (traced)
        self.guidance_rescale = float(guidance_rescale)  # static: 0 compiles no rescaling
        self.cfg = distri_config.do_classifier_free_guidance
        self.timesteps = jnp.asarray(scheduler.timesteps(num_inference_steps))
        self.num_steps = int(self.timesteps.shape[0])
        self.devices = distri_config.resolve_devices()
        self.cfg_size, self.patches = distri_config.layout(len(self.devices))
        distri_config.check_model(unet.config, len(self.devices))
        # parallelism="tensor": GSPMD on its own (CFG, TENSOR) mesh; self.mesh stays None (no shard_map)
        self.tensor = (
            TensorPlan(unet.config, self.devices, self.cfg_size)
            if (distri_config.parallelism == "tensor" and len(self.devices) > 1)
            else None
        )
        # steps 0 .. warmup_steps are synchronous (the reference's `counter <= warmup_steps`)
        self.num_sync = min(self.num_steps, distri_config.warmup_steps + 1)
        self.mesh = (
            make_mesh(self.devices, self.cfg_size) if len(self.devices) > 1 and self.tensor is None else None
        )
        # mesh axes per-device state varies over: the guidance branch only when the CFG split gives each
        # half its own; without it the state must stay invariant over the (size-1) cfg axis like the latents
        self.varying = (CFG, PATCH) if self.cfg_size == 2 else (PATCH,)
        # progress(i, n) is called from the host as steps finish; with None no callback is compiled in
        self.progress = progress
        self._report = progress is not None
        self._done = -1
        self._jitted = jax.jit(self._run)
        self._executables: dict = {}  # input shapes/dtypes -> compiled program
        self._finite = None  # per step and band of the last call: were the latents after that step finite?
        self.last_compile_s = 0.0  # seconds the last call spent compiling (0 when it reused a program)

    @property
    def compiled(self) -> bool:
        """Whether a program has been compiled already (a later call with the same shapes reuses it)."""
        return bool(self._executables)

    def _executable(self, *args):
        """The compiled program for these argument shapes and placements, compiled (and timed) on first use.

        The placement is part of the key: a compiled program only accepts inputs laid out as it was
        compiled for (a row-sharded latent from an earlier call differs from a host array).
        """
        key = (
            jax.tree_util.tree_structure(args),
            tuple((a.shape, jnp.result_type(a), getattr(a, "sharding", None)) for a in jax.tree.leaves(args)),
        )
        self.last_compile_s = 0.0
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = self._jitted.lower(*args).compile()
            self.last_compile_s = time.perf_counter() - t0
        return self._executables[key]

    def _tick(self, i):
        i = int(i)
        if i > self._done:  # under shard_map every device reports each step: count it once
            self._done = i
            if self.progress is not None:
                self.progress(i + 1, self.num_steps)

    def __call__(self, params, latents, encoder_hidden_states, added_cond_kwargs=None, guidance_scale=None):
        """latents [B, h, w, C] (NHWC, as the scheduler expects them at the first step) -> final latents.

        With guidance, encoder_hidden_states and added_cond_kwargs are batched [uncond; cond] (2B).
        `guidance_scale` overrides the default without recompiling. The result stays row-sharded
        over the mesh's patch axis (replicated under tensor parallelism). On a mesh spanning several
        processes every process passes the same values (host or its own arrays; `place_global`) and
        gets a global array back (`distributed.to_host` reads it).
        """
        self._check_inputs(latents, encoder_hidden_states)
        self._done = -1
        scale = jnp.float32(self.guidance_scale if guidance_scale is None else guidance_scale)
        args = (params, latents, encoder_hidden_states, added_cond_kwargs, scale)
        if self.tensor is not None:  # parameters split over the tensor axis, the rest replicated
            args = self.tensor.place(*args)
        elif self.mesh is not None and spans_processes(self.devices):
            args = self.place_global(*args)
        latents, self._finite = self._executable(*args)(*args)
        return latents

    def nonfinite_step(self) -> Optional[int]:
        """The first step (0-based) of the last call after which the latents held a NaN or an infinity, or None.

        Every step records whether its band's latents are all finite (one flag per step and band,
        no communication), so a run that diverged can say where.
        """
        if self._finite is None:
            return None
        ok = np.asarray(to_host(self._finite)).reshape(self.num_steps, -1).all(axis=1)
        return None if ok.all() else int(np.argmin(ok))

    def in_specs(self) -> tuple:
        """PartitionSpecs of (params, latents, encoder_hidden_states, added_cond_kwargs, scale) on the mesh."""
        batch_spec = P(CFG) if self.cfg_size == 2 else P()
        return P(), P(None, PATCH), batch_spec, batch_spec, P()

    def place_global(self, *args) -> tuple:
        """Inputs as global arrays on a mesh that spans processes (jit takes no process-local data there).

        Every process holds the same host values (same weights, prompts and seed); each places only
        its own devices' slices. Leaves that already span processes (parameters replicated once by
        the pipeline) are kept, so the compiled program's input placements stay the same.
        """
        return tuple(place(a, NamedSharding(self.mesh, spec)) for a, spec in zip(args, self.in_specs()))

    # ---- one noise prediction ----
    def plan(self, phase: str) -> PatchPlan:
        """The leaf-layer plan of a step phase ("sync" | "displaced") from the DistriConfig."""
        c = self.config
        return PatchPlan(phase, c.mode, stale_kv=c.stale_kv, stale_kv_dtype=c.stale_kv_dtype)

    def model(self, plan: Optional[PatchPlan]):
        """The UNet with the leaf-layer plan of a step phase (None: plain, no exchange)."""
        return self.unet.clone(parallel=plan)

    def eps(self, unet, params, stale, x, t, ehs, added, scale=None):
        """Guided noise prediction for latents x (a band under shard_map) and the new stale state."""
        scale = self.guidance_scale if scale is None else scale
        axis = PATCH if self.mesh is not None else None
        variables = {"params": params}
        if stale is not None:
            variables[STALE] = stale

        def apply(inp, e, a):
            out, state = unet.apply(variables, inp, t, e, a, mutable=[STALE])
            return out, (vary(state[STALE], self.varying) if STALE in state else None)

        if not self.cfg:
            return apply(x, ehs, added)
        if self.cfg_size == 2 and self.mesh is not None:  # shard_map: this device runs one branch on its band
            out, new = apply(x, ehs, added)
            both = C.cfg_exchange(out, CFG)
            return guided(both[0], both[1], scale, self.guidance_rescale, axis), new
        out, new = apply(jnp.concatenate([x, x]), ehs, added)
        u, c = jnp.split(out, 2)
        return guided(u, c, scale, self.guidance_rescale, axis), new

    # ---- the loop ----
    def _loop(self, params, latents, ehs, added, scale, step_fns):
        """lax.scan over step indices for each (phase function, first, last) in step_fns.

        Returns the final latents and, per step, whether this device's latents were finite after it [steps, 1].
        """
        sched = self.scheduler
        latents = latents.astype(jnp.float32)
        carry = (latents, sched.init(self.num_steps, latents), None)
        finite = []
        for fn, start, stop, stale_init in step_fns:
            if stop <= start:
                continue
            lat, sstate, stale = carry
            if stale is None and stale_init is not None:
                stale = stale_init(params, lat, ehs, added)

            def body(c, i, fn=fn):
                lat, sstate, stale = c
                x = sched.scale_model_input(sstate, lat, i)
                eps, stale = fn(params, stale, x, self.timesteps[i], ehs, added, i, scale)
                lat, sstate = sched.step(sstate, eps, i, lat)
                if self._report:
                    jax.debug.callback(self._tick, i, ordered=False)
                return (lat, sstate, stale), jnp.isfinite(lat).all()

            carry, ok = lax.scan(body, (lat, sstate, stale), jnp.arange(start, stop))
            finite.append(ok)
        return carry[0], jnp.concatenate(finite)[:, None]

    def _run(self, params, latents, ehs, added, scale):
        if self.mesh is None:  # one device, or tensor parallelism (the same loop under GSPMD)
            unet = self.model(None) if self.tensor is None else self.tensor.wrap(self.model(None))
            fn = lambda p, s, x, t, e, a, i, g: (self.eps(unet, p, None, x, t, e, a, g)[0], None)
            return self._loop(params, latents, ehs, added, scale, [(fn, 0, self.num_steps, None)])
        local = shard_map_fn(
            self._local, self.mesh, in_specs=self.in_specs(), out_specs=(P(None, PATCH),) * 2
        )
        return local(params, latents, ehs, added, scale)

    def _local(self, params, latents, ehs, added, scale):
        """The whole loop on one device's band (inside shard_map)."""
        c = self.config
        if (
            c.parallelism == "naive_patch" or self.patches == 1
        ):  # one band per device group: nothing to exchange
            return self._loop(
                params, latents, ehs, added, scale, [(self._naive_step, 0, self.num_steps, None)]
            )
        sync, displaced = self.model(self.plan("sync")), self.model(self.plan("displaced"))
        sync_fn = lambda p, s, x, t, e, a, i, g: self.eps(sync, p, s, x, t, e, a, g)
        disp_fn = lambda p, s, x, t, e, a, i, g: self.eps(displaced, p, s, x, t, e, a, g)
        stale_init = functools.partial(self.initial_stale, sync)
        return self._loop(
            params,
            latents,
            ehs,
            added,
            scale,
            [(sync_fn, 0, self.num_sync, stale_init), (disp_fn, self.num_sync, self.num_steps, stale_init)],
        )

    def initial_stale(self, sync_unet, params, lat, ehs, added):
        """Zeros shaped like the stale state, from abstract evaluation of a synchronous step."""
        t = self.timesteps[0]
        shapes = jax.eval_shape(lambda: self.eps(sync_unet, params, None, lat, t, ehs, added)[1])
        return vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), self.varying)

    def _naive_step(self, params, stale, x, t, ehs, added, i, scale):
        """Independent patches: the plain UNet on this device's rows or columns, no exchange."""
        unet = self.model(None)
        rows = lambda: self.eps(unet, params, None, x, t, ehs, added, scale)[0]
        cols = lambda: C.cols_to_rows(
            self.eps(unet, params, None, C.rows_to_cols(x, PATCH), t, ehs, added, scale)[0], PATCH
        )
        scheme = self.config.split_scheme
        if scheme == "row":
            return rows(), stale
        if scheme == "col":
            return cols(), stale
        return lax.cond(i % 2 == 0, rows, cols), stale

    def _check_inputs(self, latents, ehs):
        c = self.config
        channels = self.unet.config.in_channels
        if getattr(latents, "ndim", 0) != 4:
            raise DistriFusionError(
                f"latents have shape {getattr(latents, 'shape', None)}; expected NHWC "
                f"[batch, {c.latent_height}, {c.latent_width}, {channels}]"
            )
        b, h, w, ch = latents.shape
        if ch != channels and latents.shape[1] == channels:
            raise DistriFusionError(
                f"latents have shape {latents.shape}, channels first (NCHW); this loop takes "
                f"NHWC [batch, {c.latent_height}, {c.latent_width}, {channels}]: pass "
                "latents.transpose(0, 2, 3, 1)"
            )
        if (h, w) != (c.latent_height, c.latent_width):
            raise DistriFusionError(
                f"latents are {h}x{w} but the DistriConfig is for {c.height}x{c.width} "
                f"pixels (latents {c.latent_height}x{c.latent_width}): make them agree"
            )
        if ch != channels:
            raise DistriFusionError(
                f"latents have {ch} channels but the UNet takes {channels} (NHWC "
                f"[batch, {c.latent_height}, {c.latent_width}, {channels}])"
            )
        want = 2 * b if self.cfg else b
        if ehs.shape[0] != want:
            raise DistriFusionError(
                f"encoder_hidden_states has batch {ehs.shape[0]}, expected {want} "
                + ("([uncond; cond] for guidance)" if self.cfg else "")
            )


def shard_map_fn(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def make_denoise_fn(
    unet,
    distri_config: DistriConfig,
    scheduler,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
) -> Denoiser:
    """`denoise(params, latents, encoder_hidden_states, added_cond_kwargs) -> latents`, jitted.

    See `Denoiser.__call__` for the arguments; one compilation per input shape.
    """
    return Denoiser(unet, distri_config, scheduler, num_inference_steps, guidance_scale, guidance_rescale)
