"""Per-device communication, stale-state memory and FLOPs of one displaced step, by abstract evaluation only."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.extend.core import jaxprs_in_params
from jax.sharding import PartitionSpec as P

from ..config import DistriConfig
from ..models.unet import UNetConfig
from ..errors import ConfigError
from .mesh import CFG, PATCH
from .plan import PatchPlan

KINDS = ("halo", "kv", "gn", "cfg")  # "cfg": our CFG exchange; the reference's per-step output all-gather
# stale leaf name -> layer type ("hidden": stale_kv="hidden"; "*_scale": stale_kv_dtype float8 / int8)
STATE_KINDS = {"halo": "halo", "stats": "gn", **{name + suffix: "kv" for name in ("k", "v", "hidden")
                                                for suffix in ("", "_scale")}}
TEXT_TOKENS = 77  # CLIP prompt length
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

    def distri_config(self, devices: Optional[int] = None) -> DistriConfig:
        """The DistriConfig of this case (guidance on), for `devices` devices (default: the case's)."""
        return DistriConfig(self.height, self.width, devices=devices or self.devices, split_batch=self.cfg_split,
                            mode=self.mode, stale_kv=self.stale_kv, stale_kv_dtype=self.stale_kv_dtype)


# ---- abstract model and inputs ----
def abstract_model(config: UNetConfig, dtype: str):
    """(unet, params as ShapeDtypeStructs in `dtype`): no weights are created."""
    from ..models import UNet2DConditionModel

    dt = jnp.dtype(dtype)
    unet = UNet2DConditionModel(config, dtype=dt, param_dtype=dt)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), unet.abstract_params())
    return unet, params


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
    from ..denoise import Denoiser
    from ..schedulers import make_scheduler

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
        seen.update(state=_shapes(state), band=_shapes(x), out=jax.ShapeDtypeStruct(out, unet.dtype))
        return eps, state

    batch = P(CFG) if d.cfg_size == 2 else P()
    step = jax.shard_map(local, mesh=d.mesh, in_specs=(P(), P(None, PATCH), batch, batch),
                         out_specs=(P(None, PATCH), P((CFG, PATCH))))
    return jax.jit(step).trace(params, latents, ehs, added), seen


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


# ---- bytes from the stale state ----
def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def nbytes(a) -> int:
    """Bytes of one array (or ShapeDtypeStruct)."""
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def state_by_kind(state) -> dict:
    """Stale-state leaves grouped by layer type: {"halo" | "kv" | "gn": [ShapeDtypeStruct, ...]}."""
    out = {"halo": [], "kv": [], "gn": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = path[-1].key
        if name not in STATE_KINDS:
            raise ValueError(f"stale state leaf {jax.tree_util.keystr(path)} is of no known layer type")
        out[STATE_KINDS[name]].append(leaf)
    return out


def neighbours(i: int, p: int) -> int:
    """How many ppermute partners band i of p has (the first and last band have one, p = 1 none)."""
    return int(i > 0) + int(i < p - 1)


def exchanges(mode: str) -> dict:
    """Which layer types communicate in a displaced step of `mode` (conv_in's halo always does)."""
    plan = PatchPlan("displaced", mode)
    spatial = plan.spatial in ("sync", "displaced")
    return {"halo": spatial, "kv": spatial, "gn": plan.norm in ("sync", "corrected", "stale")}


def halo_bytes(halos: list, i: int, patches: int, sent: bool = False) -> int:
    """Bytes of halo rows band i receives (or sends): each conv's state [B, rows, W, C] holds the row
    from the band above and, unless the conv has stride 2 (rows = 1: it reads nothing below its band),
    the one below; band i sends its last row down for every conv, its first row up for the others."""
    every, two_row = (int(i < patches - 1), int(i > 0)) if sent else (int(i > 0), int(i < patches - 1))
    return sum(nbytes(a) // a.shape[1] * (every + two_row * (a.shape[1] - 1)) for a in halos)


def ours_per_device(seen: dict, i: int, patches: int, cfg_size: int, mode: str, sent: bool = False) -> dict:
    """Bytes received (or sent) by band i in one displaced step, by layer type.

    `seen` holds the layers' state shapes as a mode that keeps every kind has them; `mode` says which
    of them move in its displaced step (full_sync and sync_gn exchange synchronously what they keep
    no state of).
    halo: per conv, one row from each neighbour by two ppermutes (a stride-2 conv only the one from
    above), plus conv_in's synchronous one-row halo of the latent band (no state);
    kv: each K or V state [B, P T, N, Hd] is an all_gather of P - 1 other slices (likewise the
    `hidden` tokens of stale_kv="hidden" and the scales of stale_kv_dtype float8 / int8);
    gn: each stats state [P, B, G, 2] f32 likewise; cfg: the noise prediction [B, h, W, C] from the
    other guidance half.
    """
    by_kind, on = state_by_kind(seen["state"]), exchanges(mode)
    band, out, k = seen["band"], seen["out"], neighbours(i, patches)
    conv_in = out.shape[0] * 1 * band.shape[2] * band.shape[3] * out.dtype.itemsize  # one row, compute dtype
    gathered = lambda leaves: sum(nbytes(a) for a in leaves) * (patches - 1) // patches
    return {"halo": k * conv_in + halo_bytes(by_kind["halo"], i, patches, sent) * on["halo"],
            "kv": gathered(by_kind["kv"]) * on["kv"],
            "gn": gathered(by_kind["gn"]) * on["gn"],
            "cfg": nbytes(out) * (cfg_size - 1)}


def both_rows(halos: list) -> int:
    """Bytes of every conv's two boundary rows (the reference gathers both for every conv, stride 2 too)."""
    return sum(nbytes(a) // a.shape[1] * 2 for a in halos)


def reference_per_device(seen: dict, patches: int, devices: int, mode: str) -> dict:
    """distrifuser's bytes received per device in one displaced step, from the same state shapes
    (those of the default stale K/V options: K and V in the compute dtype).

    Its design (modules/pp/*.py, models/distri_sdxl_unet_pp.py): each conv's boundary rows
    [2, B, C, pad, W] are all-gathered from all P bands (conv_in none: the latent is replicated),
    K and V [B, T, 2 inner] all-gathered, GroupNorm [E x, E x^2] [2, B, G] all-gathered in the
    activation dtype (fp16; in sync_gn / full_sync an all-reduce, of which a ring receives
    2 (P - 1) / P), and the UNet output patch [B, C, h, W] all-gathered over all N devices every step
    (synchronously; this also combines the guidance halves). With one band per guidance half (P = 1)
    it keeps no buffers and only gathers the output.
    """
    by_kind, on = state_by_kind(seen["state"]), exchanges(mode)
    out, act = seen["out"], seen["out"].dtype.itemsize
    if patches == 1:
        return {"halo": 0, "kv": 0, "gn": 0, "cfg": nbytes(out) * (devices - 1)}
    gn_chunk = sum(math.prod(a.shape) for a in by_kind["gn"]) // patches * act
    all_reduce = PatchPlan("displaced", mode).norm == "sync"
    return {"halo": (patches - 1) * both_rows(by_kind["halo"]) * on["halo"],
            "kv": (patches - 1) * sum(nbytes(a) for a in by_kind["kv"]) // patches * on["kv"],
            "gn": (2 * (patches - 1) * gn_chunk // patches if all_reduce else (patches - 1) * gn_chunk) * on["gn"],
            "cfg": nbytes(out) * (devices - 1)}


def reference_stale_bytes(seen: dict, patches: int) -> int:
    """distrifuser's buffer memory per device: P copies of every device's registered slices, activation dtype."""
    if patches == 1:
        return 0
    by_kind, act = state_by_kind(seen["state"]), seen["out"].dtype.itemsize
    return (patches * both_rows(by_kind["halo"]) + sum(nbytes(a) for a in by_kind["kv"])
            + sum(math.prod(a.shape) for a in by_kind["gn"]) * act)


# ---- cross-check against the traced program's collectives ----
def collectives(closed_jaxpr) -> list:
    """Every collective in a jaxpr (nested ones included): dicts of primitive, axis, operand bytes, perm/size."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in ("ppermute", "all_gather", "all_gather_invariant"):
                axes = eqn.params["axis_name"]
                axes = axes if isinstance(axes, tuple) else (axes,)
                if len(axes) != 1:
                    raise NotImplementedError(f"{name} over several axes {axes} is not accounted")
                found.append(dict(primitive=name, axis=axes[0], bytes=nbytes(eqn.invars[0].aval),
                                  perm=eqn.params.get("perm"), size=eqn.params.get("axis_size")))
            elif name in ("psum", "psum_invariant", "all_to_all", "reduce_scatter", "pmax", "pmin"):
                raise NotImplementedError(f"collective {name} in the displaced step is not accounted")
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def collective_bytes(found: list, index: dict) -> tuple:
    """(sent, received) bytes of the device at mesh `index` {axis: position} for collectives `found`."""
    sent = received = 0
    for c in found:
        i = index[c["axis"]]
        if c["primitive"] == "ppermute":
            sent += c["bytes"] * sum(src == i for src, _ in c["perm"])
            received += c["bytes"] * sum(dst == i for _, dst in c["perm"])
        else:  # all_gather: this device's operand goes to size - 1 others, theirs come here
            sent += c["bytes"] * (c["size"] - 1)
            received += c["bytes"] * (c["size"] - 1)
    return sent, received


# ---- one row ----
def analyze(case: Case, unet=None, params=None, baseline: Optional[float] = None, with_flops: bool = True) -> dict:
    """All numbers of one case (bytes per device per displaced step; see `format_table` for the layout).

    `baseline`: the single-device FLOPs if already known; `with_flops=False` skips lowering (bytes only).
    """
    if unet is None:
        unet, params = abstract_model(case.config, case.dtype)
    row = dict(height=case.height, width=case.width, devices=case.devices, cfg_split=case.cfg_split,
               dtype=case.dtype, mode=case.mode, batch=case.batch, stale_kv=case.stale_kv,
               stale_kv_dtype=case.stale_kv_dtype)
    try:
        d = make_denoiser(unet, case)
    except ConfigError as e:
        return dict(row, error=str(e))
    traced, seen = trace_displaced_step(d, params, abstract_inputs(case))
    p, g = d.patches, d.cfg_size
    # every layer's exchanged shapes, from a mode that keeps state of every kind (the case's mode may
    # exchange some synchronously, keeping nothing); the case's mode says which of them move
    seen_of = lambda c: seen if c == case else trace_displaced_step(make_denoiser(unet, c), params,
                                                                  abstract_inputs(case))[1]
    layers = seen_of(dataclasses.replace(case, mode="corrected_async_gn"))
    per_band = [ours_per_device(layers, i, p, g, case.mode) for i in range(p)]
    sent = [ours_per_device(layers, i, p, g, case.mode, sent=True) for i in range(p)]
    busiest = max(range(p), key=lambda i: sum(per_band[i].values()))
    # the reference keeps K and V in the activation dtype whatever our stale K/V options are
    seen_ref = seen_of(dataclasses.replace(case, mode="corrected_async_gn", stale_kv="kv", stale_kv_dtype=None))
    ours, ref = per_band[busiest], reference_per_device(seen_ref, p, case.devices, case.mode)
    found = collectives(traced.jaxpr)
    check = all(collective_bytes(found, {CFG: c, PATCH: i}) == (sum(sent[i].values()), sum(per_band[i].values()))
                for c in range(g) for i in range(p))
    counts = {k: len(v) for k, v in state_by_kind(seen["state"]).items()}
    if with_flops:
        baseline = single_device_flops(unet, params, case) if baseline is None else baseline
        per_device = flops(traced.lower())
        row.update(flops_per_device=per_device, flops_single_device=baseline, flops_ratio=per_device / baseline)
    return dict(row, cfg_size=g, patches=p, busiest_band=busiest, layers_with_state=counts,
                ours=dict(received=_with_total(ours), sent=_with_total(sent[busiest]),
                          total_by_band=[sum(v.values()) for v in per_band],
                          stale_bytes=sum(nbytes(a) for a in jax.tree.leaves(seen["state"]))),
                reference=dict(received=_with_total(ref), sent=_with_total(ref),
                               stale_bytes=reference_stale_bytes(seen_ref, p)),
                collectives_match=check)


def _with_total(v: dict) -> dict:
    return dict(v, total=sum(v.values()))


def report(config: UNetConfig, sizes, devices, cfg_splits=(True,), dtype="bfloat16",
           mode="corrected_async_gn", batch: int = 1, progress=None, stale_kv: str = "kv",
           stale_kv_dtype: Optional[str] = None) -> list:
    """Rows of `analyze` for every (size, cfg split, device count); sizes are (height, width) pixels."""
    unet, params = abstract_model(config, dtype)
    rows = []
    for height, width in sizes:
        baseline = None
        for split in cfg_splits:
            for n in devices:
                case = Case(config, height, width, n, split, dtype, mode, batch, stale_kv, stale_kv_dtype)
                if baseline is None:
                    baseline = single_device_flops(unet, params, case)
                rows.append(analyze(case, unet, params, baseline))
                if progress:
                    progress(rows[-1])
    return rows


# ---- text output ----
COLUMNS = ("halo", "K/V", "GN", "CFG/out", "total", "stale mem")
NOTES = """\
  Per device and per displaced step, bytes received by the busiest device (a middle band; the first and
  last bands exchange halos with one neighbour only).
  ours (JAX): halo = 2 non-cyclic ppermutes per 3x3 conv (incl. conv_in's one latent row, synchronous;
    one for a stride-2 conv, which reads no row below its band),
    K/V and GN (float32) all_gathers over the patch axis, CFG/out = eps all_gather over the cfg axis;
    stale mem = bytes of the stale-state pytree; FLOPs/dev = XLA cost analysis of this device's displaced
    step / one single-device UNet step on the whole image, same guidance batch (ideal 1/N in brackets).
  distrifuser (reference, from its design): halo rows all-gathered from all P bands (no conv_in), K/V
    all-gathered, GN [E x, E x^2] all-gathered in the activation dtype, CFG/out = the UNet output patch
    all-gathered over all N devices every step (synchronous); stale mem = its P-fold buffer list.
  MB/GB = 10^6/10^9 bytes."""


def fmt_bytes(n: float) -> str:
    """Bytes as B, kB, MB or GB (powers of 10)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def _cells(volumes: dict, stale: int) -> list:
    return [fmt_bytes(volumes[k]) for k in ("halo", "kv", "gn", "cfg", "total")] + [fmt_bytes(stale)]


def format_rows(rows: list) -> list:
    """Table lines for rows of one (size, cfg split) group: an "ours" and a "distrifuser" line per N."""
    head = f"{'N':>3} {'mesh':>5}  {'':<11}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'FLOPs/dev (1/N)':>17}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['devices']:>3} {'':>5}  n/a: {r['error']}")
            continue
        mesh = f"{r['cfg_size']}x{r['patches']}"
        ratio = f"{r['flops_ratio']:.3f} ({1 / r['devices']:.3f})" if "flops_ratio" in r else "-"
        for who, key, rat in (("ours (JAX)", "ours", ratio), ("distrifuser", "reference", "-")):
            cells = _cells(r[key]["received"], r[key]["stale_bytes"])
            lines.append(f"{r['devices'] if key == 'ours' else '':>3} {mesh if key == 'ours' else '':>5}  "
                         f"{who:<11}" + "".join(f"{c:>10}" for c in cells) + f"{rat:>17}")
        if not r["collectives_match"]:
            lines.append("    WARNING: these byte counts differ from the collectives found in the traced program")
    return lines


def format_table(rows: list, model: str = "UNet") -> str:
    """Readable tables, one per (resolution, CFG split), then the notes."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["height"], r["width"], r["cfg_split"]), []).append(r)
    for (h, w, split), group in groups.items():
        r = group[0]
        options = "" if (r.get("stale_kv", "kv"), r.get("stale_kv_dtype")) == ("kv", None) else (
            f", stale {r['stale_kv']} in {r['stale_kv_dtype'] or r['dtype']}")
        out.append(f"{model}, {w}x{h} (latent {w // 8}x{h // 8}), batch {r['batch']}, {r['dtype']}, "
                   f"{'CFG split' if split else 'no CFG split'}, mode {r['mode']}{options}")
        out += format_rows(group) + [""]
    return "\n".join(out + [NOTES])
