"""What img2img moves over the links per device: the row-sharded VAE encode and the refine pass's loop.

Bytes from the collectives of the traced programs themselves (`comm.collectives`): the `Encoder`'s
row-sharded program, and the `Denoiser`'s whole loop from the refine's first step, each scan's body
counted once per step it runs (the warmup counted from the first step run). Abstract shapes only: no
weights, no data, no compilation. `python -m distrifusion_jax.tools.comm_report --img2img` prints it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..arguments import check_strength
from ..decode import Encoder
from ..denoise import Denoiser
from ..errors import ConfigError
from ..parallel import CFG
from ..schedulers import make_scheduler
from .abstract import Case, abstract_inputs
from .comm import KINDS, collective_bytes, collectives
from .fmt import fmt_bytes, ruled


@dataclasses.dataclass(frozen=True)
class Refine:
    """The refine pass: `strength` of a `steps`-step schedule (diffusers' img2img), `warmup_steps` as DistriConfig's."""

    steps: int = 50
    strength: float = 0.3
    warmup_steps: int = 4

    def __post_init__(self):
        check_strength(self.strength, self.steps)  # ConfigError for a strength that runs no step

    @property
    def first_step(self) -> int:
        return check_strength(self.strength, self.steps)


# ---- bytes by layer type, per device ----
def kind(c: dict) -> str:
    """The layer type a traced collective serves: anything over the cfg axis is the guidance exchange; conv
    halos are ppermutes, attention tokens concatenating all_gathers, GroupNorm statistics stacking ones."""
    if c["axis"] == CFG:
        return "cfg"
    if c["primitive"] == "ppermute":
        return "halo"
    return "kv" if c["tiled"] else "gn"


def per_device(found: list, mesh) -> dict:
    """{device id: bytes received by kind} for the collectives `found` of a program on `mesh`."""
    out = {}
    for index, device in np.ndenumerate(mesh.devices):
        at = dict(zip(mesh.axis_names, index))
        out[device.id] = dict.fromkeys(KINDS, 0)
        for c in found:
            out[device.id][kind(c)] += collective_bytes([c], at)[1]
    return out


def _total(v: dict) -> dict:
    return dict(v, total=sum(v[k] for k in KINDS))


# ---- the two programs ----
def encode_traffic(vae, params, height: int, width: int, devices, batch: int = 1) -> dict:
    """{device id: bytes received by kind} in one encode of a [batch, height, width, 3] image on `devices`
    ({} where the encode runs on one device: the devices do not divide the latent height)."""
    enc, cfg, f = Encoder(vae, devices), vae.config, vae.config.downsample_factor
    image = jax.ShapeDtypeStruct((batch, height, width, cfg.in_channels), vae.dtype)
    noise = jax.ShapeDtypeStruct((batch, height // f, width // f, cfg.latent_channels), jnp.float32)
    if not enc.parallel_for(image):
        return {}
    return per_device(collectives(jax.jit(enc._banded_fn).trace(params, image, noise).jaxpr), enc._mesh)


def refine_traffic(unet, params, case: Case, refine: Refine) -> dict:
    """The refine loop's bytes: {"phases": [(name, steps, {device id: per step by kind})], "total": {device
    id: by kind}}, from the collectives of the Denoiser's traced loop (one scan per phase)."""
    dc = dataclasses.replace(case.distri_config(), warmup_steps=refine.warmup_steps)
    d = Denoiser(unet, dc, make_scheduler("ddim", {}), refine.steps, first_step=refine.first_step)
    scale = jax.ShapeDtypeStruct((), jnp.float32)
    found = collectives(d._jitted.trace(params, *abstract_inputs(case), scale).jaxpr)
    ran = [stop - start for _, start, stop, _ in d._phases() if stop > start]
    names = ("sync", "displaced") if len(d._phases()) == 2 else ("every",)
    scans = sorted({c["scan"] for c in found if c["scan"] is not None})
    if [length for _, length in scans] != ran or any(c["scan"] is None for c in found):
        raise NotImplementedError(
            f"the loop's collectives lie in scans {scans}, not one per phase of {ran} steps"
        )
    phases = []
    for name, (number, length) in zip(names, scans):
        one = [dict(c, times=c["times"] // length) for c in found if c["scan"] == (number, length)]
        phases.append((name, length, per_device(one, d.mesh)))
    return {"phases": phases, "total": per_device(found, d.mesh), "mesh": f"{d.cfg_size}x{d.patches}"}


# ---- one row ----
def analyze(case: Case, unet, params, vae, vae_params, refine: Refine = Refine()) -> dict:
    """Bytes received by the busiest device (most over encode + refine) in one img2img of `case`'s size."""
    row = dict(
        case.row(),
        vae_dtype=str(jnp.dtype(vae.dtype)),
        steps=refine.steps,
        strength=refine.strength,
        warmup_steps=refine.warmup_steps,
        first_step=refine.first_step,
    )
    devices = jax.devices()[: case.devices]
    try:
        loop = refine_traffic(unet, params, case, refine)
    except ConfigError as e:
        return dict(row, error=str(e))
    encode = encode_traffic(vae, vae_params, case.height, case.width, devices, case.batch)
    zero = dict.fromkeys(KINDS, 0)
    total = lambda d: sum(encode.get(d.id, zero).values()) + sum(loop["total"][d.id].values())
    busiest = max(devices, key=total).id
    return dict(
        row,
        mesh=loop["mesh"],
        busiest_device=busiest,
        encode=dict(row_sharded=bool(encode), received=_total(encode.get(busiest, zero))),
        refine=dict(
            steps_run=refine.steps - refine.first_step,
            phases=[
                dict(name=name, steps=steps, per_step=_total(by_device[busiest]))
                for name, steps, by_device in loop["phases"]
            ],
            received=_total(loop["total"][busiest]),
        ),
        total=total(next(d for d in devices if d.id == busiest)),
    )


def report(cases, unet, params, vae, vae_params, refine: Refine = Refine(), progress=None) -> list:
    """Rows of `analyze` for every case."""
    rows = []
    for case in cases:
        rows.append(analyze(case, unet, params, vae, vae_params, refine))
        if progress:
            progress(rows[-1])
    return rows


# ---- text output ----
COLUMNS = ("halo", "GN", "K/V", "encode", "sync/step", "displ/step", "refine", "total")
NOTES = """\
  Bytes received by the busiest device (most over encode + refine; a middle band) in one img2img of one image.
  encode: the VAE encode row-sharded over all N devices, exact (synchronous): halo = 2 ppermutes per 3x3 conv
    (the stride-2 downsamplers' too), GN = float32 statistics all_gathers, K/V = the mid-block attention's.
  refine: the denoising loop from the refine's first step on the (cfg, patch) mesh, the same programs as
    text-to-image: per synchronous (warmup) step, per displaced step, and the whole refine; "every" where
    one band per guidance half makes every step alike (only the guidance exchange moves).
  Measured from the traced programs' collectives (scan bodies counted once per step run), never by formula.
  MB/GB = 10^6/10^9 bytes."""


def _phase(row: dict, name: str):
    return next((p["per_step"]["total"] for p in row["refine"]["phases"] if p["name"] in (name, "every")), 0)


def format_table(rows: list, unet_name: str = "UNet", vae_name: str = "VAE") -> str:
    """One table per image size, then the notes."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["height"], r["width"]), []).append(r)
    for (h, w), group in groups.items():
        r = group[0]
        run = r["steps"] - r["first_step"]
        out.append(
            f"img2img {w}x{h} (latent {w // 8}x{h // 8}), batch {r['batch']}: {vae_name} encode in "
            f"{r['vae_dtype']}; refine: strength {r['strength']:g} of {r['steps']} steps = {run} steps run "
            f"(warmup {r['warmup_steps']}), {unet_name} in {r['dtype']}, "
            f"{'CFG split' if r['cfg_split'] else 'no CFG split'}, mode {r['mode']}"
        )
        out += ruled(f"{'N':>3} {'mesh':>5} {'steps':>6}" + "".join(f"{c:>11}" for c in COLUMNS))
        for r in group:
            if "error" in r:
                out.append(f"{r['devices']:>3}        n/a: {r['error']}")
                continue
            enc, ref = r["encode"]["received"], r["refine"]
            counts = "+".join(str(p["steps"]) for p in ref["phases"])
            cells = [enc["halo"], enc["gn"], enc["kv"], enc["total"], _phase(r, "sync")]
            cells += [_phase(r, "displaced"), ref["received"]["total"], r["total"]]
            out.append(
                f"{r['devices']:>3} {r['mesh']:>5} {counts:>6}"
                + "".join(f"{fmt_bytes(c):>11}" for c in cells)
            )
        out.append("")
    return "\n".join(out + [NOTES])
