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

from .cache import compile_program
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

    Built once per (model, DistriConfig, scheduler, steps, guidance, first step); `__call__` is jitted, so
    a second call with the same shapes reuses the compiled program. `first_step` > 0 starts the schedule
    of `num_inference_steps` steps there (img2img: the latents given are noised to that step's level),
    running steps first_step .. num_inference_steps - 1; the warmup counts from the first step run. `stop_step`
    (default: the whole schedule) ends the run before that step (SDXL's base + refiner split, diffusers'
    `denoising_end`): the latents come back as the scheduler leaves them after step stop_step - 1.
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
        first_step: int = 0,
        stop_step: Optional[int] = None,
    ):
        self.unet, self.config, self.scheduler = unet, distri_config, scheduler
        self.guidance_scale = float(guidance_scale)  # default; each call may pass another (traced)
        self.guidance_rescale = float(guidance_rescale)  # static: 0 compiles no rescaling
        self.cfg = distri_config.do_classifier_free_guidance
        self.timesteps = jnp.asarray(scheduler.timesteps(num_inference_steps))
        self.num_steps = int(self.timesteps.shape[0])
        is_int = isinstance(first_step, (int, np.integer)) and not isinstance(first_step, bool)
        if not (is_int and 0 <= first_step < self.num_steps):
            raise DistriFusionError(
                f"first_step={first_step!r} is not a step of the {self.num_steps}-step schedule: pass an int "
                f"in [0, {self.num_steps})"
            )
        self.first_step = int(first_step)
        stop = self.num_steps if stop_step is None else stop_step
        is_int = isinstance(stop, (int, np.integer)) and not isinstance(stop, bool)
        if not (is_int and self.first_step < stop <= self.num_steps):
            raise DistriFusionError(
                f"stop_step={stop_step!r} does not end a run that starts at step {self.first_step} of the "
                f"{self.num_steps}-step schedule: pass an int in ({self.first_step}, {self.num_steps}]"
            )
        self.stop_step = int(stop)
        self.num_run = self.stop_step - self.first_step  # steps this loop runs
        self.devices = distri_config.resolve_devices()
        self.cfg_size, self.patches = distri_config.layout(len(self.devices))
        distri_config.check_model(unet.config, len(self.devices))
        # parallelism="tensor": GSPMD on its own (CFG, TENSOR) mesh; self.mesh stays None (no shard_map)
        self.tensor = (
            TensorPlan(unet.config, self.devices, self.cfg_size)
            if (distri_config.parallelism == "tensor" and len(self.devices) > 1)
            else None
        )
        # the first warmup_steps + 1 steps run are synchronous (the reference's `counter <= warmup_steps`,
        # its counter starting at the first step it runs)
        self.num_sync = min(self.num_run, distri_config.warmup_steps + 1)
        self.mesh = (
            make_mesh(self.devices, self.cfg_size) if len(self.devices) > 1 and self.tensor is None else None
        )
        # mesh axes per-device state varies over: the guidance branch only when the CFG split gives each
        # half its own; without it the state must stay invariant over the (size-1) cfg axis like the latents
        self.varying = (CFG, PATCH) if self.cfg_size == 2 else (PATCH,)
        # progress(i, n): with None the whole loop is one program (lax.scan); otherwise the host calls one
        # program per step and reports each as it finishes (`_stepwise`), so no program holds a host callback
        self.progress = progress
        # on_step(i, latents): with progress, called after step i with its latents, before the next step's
        # program takes (and donates) them; set by the pipeline for a per-step callback
        self.on_step: Optional[Callable] = None
        self._jitted = jax.jit(self._run)  # the whole loop, for abstract lowering (tools/abstract.py)
        self._executables: dict = {}  # (program, input shapes/dtypes/placements) -> compiled program
        self._finite = None  # per step and band of the last call: were the latents after that step finite?
        self.last_compile_s = 0.0  # seconds the last call spent compiling (0 when it reused its programs)

    @property
    def compiled(self) -> bool:
        """Whether a program has been compiled already (a later call with the same shapes reuses it)."""
        return bool(self._executables)

    def _executable(self, name, *args):
        """The compiled program `name` ("loop", "start", "step0", "step1") for these argument shapes and
        placements: compiled (and timed) on first use, or read from the persistent caches (`compile_program`).

        The placement is part of the key: a compiled program only accepts inputs laid out as it was
        compiled for (a row-sharded latent from an earlier call differs from a host array).
        """
        key = (
            name,
            jax.tree_util.tree_structure(args),
            tuple((a.shape, jnp.result_type(a), getattr(a, "sharding", None)) for a in jax.tree.leaves(args)),
        )
        if key not in self._executables:
            fn, specs, donate = self._program(name)
            shardings = None
            if self.mesh is not None:  # explicit, so that a traced program kept on disk records them
                shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs)
            mesh = self.mesh if self.tensor is None else self.tensor.mesh
            t0 = time.perf_counter()
            self._executables[key] = compile_program(
                f"denoise-{name}", fn, args, self._identity(), mesh, shardings, donate
            )
            self.last_compile_s += time.perf_counter() - t0
        return self._executables[key]

    def _program(self, name: str) -> tuple:
        """(function, PartitionSpecs of its arguments on the mesh, donated argument indices) of a program."""
        if name == "loop":
            return self._run, self.in_specs(), ()
        if name == "start":
            return self._start_program(), self.in_specs(), ()
        params_spec, _, ehs_spec, added_spec, scale_spec = self.in_specs()
        specs = (params_spec, *self._carry_specs(), ehs_spec, added_spec, scale_spec)
        return (
            self._advance_program(int(name[len("step") :])),
            specs,
            (1, 2, 3),
        )  # the old carry holds the new

    def _identity(self) -> str:
        """Everything the traced programs depend on besides their arguments (the key of `compile_program`)."""
        return repr(
            (
                self.unet,
                self.config,
                self.scheduler,
                self.num_steps,
                self.guidance_rescale,
                self.cfg,
                self.first_step,
                self.stop_step,
            )
        )

    def __call__(self, params, latents, encoder_hidden_states, added_cond_kwargs=None, guidance_scale=None):
        """latents [B, h, w, C] (NHWC, as the scheduler expects them at the first step) -> final latents.

        With guidance, encoder_hidden_states and added_cond_kwargs are batched [uncond; cond] (2B).
        `guidance_scale` overrides the default without recompiling. The result stays row-sharded
        over the mesh's patch axis (replicated under tensor parallelism). On a mesh spanning several
        processes every process passes the same values (host or its own arrays; `place_global`) and
        gets a global array back (`distributed.to_host` reads it).
        """
        self._check_inputs(latents, encoder_hidden_states)
        self.last_compile_s = 0.0
        scale = jnp.float32(self.guidance_scale if guidance_scale is None else guidance_scale)
        args = (params, latents, encoder_hidden_states, added_cond_kwargs, scale)
        if self.tensor is not None:  # parameters split over the tensor axis, the rest replicated
            args = self.tensor.place(*args)
        elif self.mesh is not None and spans_processes(self.devices):
            args = self.place_global(*args)
        elif self.mesh is not None:  # where the programs take them (weights placed once stay where they are)
            args = tuple(
                jax.device_put(a, NamedSharding(self.mesh, s)) for a, s in zip(args, self.in_specs())
            )
        if self.progress is not None:
            latents, self._finite = self._stepwise(*args)
        else:
            latents, self._finite = self._executable("loop", *args)(*args)
        return latents

    def nonfinite_step(self) -> Optional[int]:
        """The first step (0-based, in the whole schedule) of the last call after which the latents held a NaN
        or an infinity, or None.

        Every step records whether its band's latents are all finite (one flag per step and band,
        no communication), so a run that diverged can say where.
        """
        if self._finite is None:
            return None
        flags = (
            self._finite if isinstance(self._finite, list) else [self._finite]
        )  # per step, or the whole loop's
        ok = (
            np.concatenate([np.asarray(to_host(f)).ravel() for f in flags])
            .reshape(self.num_run, -1)
            .all(axis=1)
        )
        return None if ok.all() else self.first_step + int(np.argmin(ok))

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
    def _phases(self) -> list:
        """[(step function, first step, stop, stale_init)] of the run: on one device's band when there is a mesh
        (called inside shard_map), else the whole latents. A step function maps (params, stale, x, t, ehs,
        added, i, scale) to (eps, stale); stale_init makes the first stale state (None: there is none)."""
        first, n = self.first_step, self.stop_step
        if self.mesh is None:  # one device, or tensor parallelism (the same loop under GSPMD)
            unet = self.model(None) if self.tensor is None else self.tensor.wrap(self.model(None))
            fn = lambda p, s, x, t, e, a, i, g: (self.eps(unet, p, None, x, t, e, a, g)[0], None)
            return [(fn, first, n, None)]
        if self.config.parallelism == "naive_patch" or self.patches == 1:  # nothing to exchange
            return [(self._naive_step, first, n, None)]
        sync, displaced = self.model(self.plan("sync")), self.model(self.plan("displaced"))
        sync_fn = lambda p, s, x, t, e, a, i, g: self.eps(sync, p, s, x, t, e, a, g)
        disp_fn = lambda p, s, x, t, e, a, i, g: self.eps(displaced, p, s, x, t, e, a, g)
        stale_init = functools.partial(self.initial_stale, sync)
        warm = first + self.num_sync
        return [(sync_fn, first, warm, stale_init), (disp_fn, warm, n, stale_init)]

    def _step(self, fn, params, carry, i, ehs, added, scale):
        """One denoising step: carry (latents, scheduler state, stale state) after step i."""
        lat, sstate, stale = carry
        x = self.scheduler.scale_model_input(sstate, lat, i)
        eps, stale = fn(params, stale, x, self.timesteps[i], ehs, added, i, scale)
        lat, sstate = self.scheduler.step(sstate, eps, i, lat)
        return lat, sstate, stale

    def _first_carry(self, params, latents, ehs, added):
        """(latents in float32, the scheduler's state at the first step run, the initial stale state or None)."""
        lat = latents.astype(jnp.float32)
        init = next((ph[3] for ph in self._phases() if ph[3] is not None), None)
        stale = init(params, lat, ehs, added) if init is not None else None
        return lat, self.scheduler.init(self.num_steps, lat, start=self.first_step), stale

    def _loop(self, params, latents, ehs, added, scale):
        """All steps as lax.scan, one per phase. Returns the final latents and, per step, whether this device's
        latents were finite after it [steps, 1]."""
        carry, finite = self._first_carry(params, latents, ehs, added), []
        for fn, start, stop, _ in self._phases():
            if stop <= start:
                continue

            def body(c, i, fn=fn):
                c = self._step(fn, params, c, i, ehs, added, scale)
                return c, jnp.isfinite(c[0]).all()

            carry, ok = lax.scan(body, carry, jnp.arange(start, stop))
            finite.append(ok)
        return carry[0], jnp.concatenate(finite)[:, None]

    def _run(self, params, latents, ehs, added, scale):
        if self.mesh is None:
            return self._loop(params, latents, ehs, added, scale)
        local = shard_map_fn(self._loop, self.mesh, in_specs=self.in_specs(), out_specs=(P(None, PATCH),) * 2)
        return local(params, latents, ehs, added, scale)

    # ---- step by step, for progress: one program per phase, called from the host ----
    # The carry crosses program boundaries as (latents, scheduler state, stale state, next step index). On a
    # mesh the per-device scheduler and stale leaves travel stacked on a leading device axis, so they stay on
    # their devices, sharded, between calls; the latents keep their row sharding.
    def _carry_specs(self) -> tuple:
        return P(None, PATCH), P(PATCH), P(self.varying), P()

    def _pack(self, sstate, stale):
        """The scheduler state as a list of its leaves (its classes need not be known to jax.export); on a mesh
        both states stacked on a leading device axis."""
        sstate = jax.tree.leaves(sstate)
        if self.mesh is None:
            return sstate, stale
        stack = lambda tree, axes: jax.tree.map(lambda x: x[None], vary(tree, axes))
        return stack(sstate, (PATCH,)), stack(stale, self.varying)

    def _unpack(self, sstate, stale):
        if self.mesh is not None:
            sstate, stale = jax.tree.map(lambda x: x[0], (sstate, stale))
        like = jax.ShapeDtypeStruct(
            (1, 1, 1, 1), jnp.float32
        )  # the state's structure does not depend on shapes
        tree = jax.tree.structure(
            jax.eval_shape(functools.partial(self.scheduler.init, self.num_steps), like)
        )
        return jax.tree.unflatten(tree, sstate), stale

    def _on_mesh(self, fn, in_specs, out_specs):
        return (
            fn if self.mesh is None else shard_map_fn(fn, self.mesh, in_specs=in_specs, out_specs=out_specs)
        )

    def _start_program(self):
        def start(params, latents, ehs, added, scale):
            lat, sstate, stale = self._first_carry(params, latents, ehs, added)
            return (lat, *self._pack(sstate, stale), jnp.int32(self.first_step))

        return self._on_mesh(start, self.in_specs(), self._carry_specs())

    def _advance_program(self, phase: int):
        """One step of phase `phase`: (params, *carry, ehs, added, scale) -> (*carry, finite [1] per band)."""

        def advance(params, lat, sstate, stale, i, ehs, added, scale):
            fn = self._phases()[phase][0]
            lat, sstate, stale = self._step(
                fn, params, (lat, *self._unpack(sstate, stale)), i, ehs, added, scale
            )
            return (lat, *self._pack(sstate, stale), i + 1, jnp.isfinite(lat).all()[None])

        params_spec, _, ehs_spec, added_spec, scale_spec = self.in_specs()
        specs = (params_spec, *self._carry_specs(), ehs_spec, added_spec, scale_spec)
        return self._on_mesh(advance, specs, (*self._carry_specs(), P(PATCH)))

    def _stepwise(self, params, latents, ehs, added, scale):
        """The loop as host calls of compiled one-step programs, reporting each step as it finishes.

        Every program is compiled (or loaded from the persistent cache) before the first step, then
        progress(0, n) marks the start (n: the steps this loop runs, `num_run`); step i + 1 is queued before
        waiting for step i, so the device is never idle waiting for the host.
        """
        rest = (ehs, added, scale)
        carry = self._executable("start", params, latents, *rest)(params, latents, *rest)
        programs = []
        for k, (_, first, stop, _) in enumerate(self._phases()):
            if stop > first:
                programs.append((self._executable(f"step{k}", params, *carry, *rest), first, stop))
        self.progress(0, self.num_run)
        finite = []
        for program, first, stop in programs:
            for _ in range(first, stop):
                *carry, ok = program(params, *carry, *rest)
                finite.append(ok)
                if self.on_step is not None:  # before the next step donates the latents
                    self.on_step(self.first_step + len(finite) - 1, carry[0])
                if len(finite) > 1:
                    self._finished(finite[-2], len(finite) - 1)
        self._finished(finite[-1], self.num_run)
        return carry[0], finite

    def host_callback(self, callback) -> Callable:
        """An `on_step` hook calling callback(i, t, latents) with the step's index in the schedule, its timestep
        and a float32 host copy of the latents in diffusers' layout (B, C, h, w)."""
        timesteps = np.asarray(self.timesteps)

        def on_step(i: int, lat) -> None:
            callback(i, timesteps[i].item(), np.asarray(to_host(lat), np.float32).transpose(0, 3, 1, 2))

        return on_step

    def _finished(self, flag, done: int) -> None:
        jax.block_until_ready(flag)
        self.progress(done, self.num_run)

    def initial_stale(self, sync_unet, params, lat, ehs, added):
        """Zeros shaped like the stale state, from abstract evaluation of a synchronous step."""
        t = self.timesteps[self.first_step]
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
