"""Per-device communication and stale-state memory of one displaced step, ours and distrifuser's.

From the shapes of a traced step (tools/abstract.py): abstract evaluation only, no weights, no data.
`python -m distrifusion_jax.tools.comm_report` prints it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import jax
from jax.extend.core import jaxprs_in_params

from ..errors import ConfigError
from ..models.unet import UNetConfig
from ..parallel import CFG, PATCH, PatchPlan
from .abstract import (
    Case,
    abstract_inputs,
    abstract_model,
    flops,
    make_denoiser,
    nbytes,
    single_device_flops,
    trace_displaced_step,
)

KINDS = ("halo", "kv", "gn", "cfg")  # "cfg": our CFG exchange; the reference's per-step output all-gather
# stale leaf name -> layer type ("hidden": stale_kv="hidden"; "*_scale": stale_kv_dtype float8 / int8)
STATE_KINDS = {
    "halo": "halo",
    "stats": "gn",
    **{name + suffix: "kv" for name in ("k", "v", "hidden") for suffix in ("", "_scale")},
}


# ---- bytes from the stale state ----
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
    return {
        "halo": k * conv_in + halo_bytes(by_kind["halo"], i, patches, sent) * on["halo"],
        "kv": gathered(by_kind["kv"]) * on["kv"],
        "gn": gathered(by_kind["gn"]) * on["gn"],
        "cfg": nbytes(out) * (cfg_size - 1),
    }


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
    return {
        "halo": (patches - 1) * both_rows(by_kind["halo"]) * on["halo"],
        "kv": (patches - 1) * sum(nbytes(a) for a in by_kind["kv"]) // patches * on["kv"],
        "gn": (2 * (patches - 1) * gn_chunk // patches if all_reduce else (patches - 1) * gn_chunk)
        * on["gn"],
        "cfg": nbytes(out) * (devices - 1),
    }


def reference_stale_bytes(seen: dict, patches: int) -> int:
    """distrifuser's buffer memory per device: P copies of every device's registered slices, activation dtype."""
    if patches == 1:
        return 0
    by_kind, act = state_by_kind(seen["state"]), seen["out"].dtype.itemsize
    return (
        patches * both_rows(by_kind["halo"])
        + sum(nbytes(a) for a in by_kind["kv"])
        + sum(math.prod(a.shape) for a in by_kind["gn"]) * act
    )


# ---- cross-check against the traced program's collectives ----
def collectives(closed_jaxpr) -> list:
    """Every collective in a jaxpr (nested ones included): dicts of primitive, axis, operand bytes, perm/size,
    `tiled` (an all_gather that concatenates, as the token gathers do, rather than stacks, as the statistics'
    do), `times` (how often one run of the program runs it: the product of the lengths of the scans around
    it) and `scan` (the outermost scan holding it: (its number in program order, its length); None outside
    every scan)."""
    found, outer = [], itertools.count()

    def walk(jaxpr, times, scan):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in ("ppermute", "all_gather", "all_gather_invariant"):
                if times is None:
                    raise NotImplementedError(f"{name} inside a while loop or cond is not accounted")
                axes = eqn.params["axis_name"]
                axes = axes if isinstance(axes, tuple) else (axes,)
                if len(axes) != 1:
                    raise NotImplementedError(f"{name} over several axes {axes} is not accounted")
                found.append(
                    dict(
                        primitive=name,
                        axis=axes[0],
                        bytes=nbytes(eqn.invars[0].aval),
                        perm=eqn.params.get("perm"),
                        size=eqn.params.get("axis_size"),
                        tiled=bool(eqn.params.get("tiled", False)),
                        times=times,
                        scan=scan,
                    )
                )
            elif name in ("psum", "psum_invariant", "all_to_all", "reduce_scatter", "pmax", "pmin"):
                raise NotImplementedError(f"collective {name} in the program is not accounted")
            if name == "scan":  # its body runs `length` times
                length = eqn.params["length"]
                inner = (times and times * length, (next(outer), length) if scan is None else scan)
            else:  # a while loop's or cond's body runs an unknown number of times
                inner = (None if name in ("while", "cond") else times, scan)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub, *inner)

    walk(closed_jaxpr.jaxpr, 1, None)
    return found


def collective_bytes(found: list, index: dict) -> tuple:
    """(sent, received) bytes of the device at mesh `index` {axis: position} for collectives `found`, each
    counted as often as it runs (`times`)."""
    sent = received = 0
    for c in found:
        i, times = index[c["axis"]], c.get("times", 1)
        if c["primitive"] == "ppermute":
            sent += times * c["bytes"] * sum(src == i for src, _ in c["perm"])
            received += times * c["bytes"] * sum(dst == i for _, dst in c["perm"])
        else:  # all_gather: this device's operand goes to size - 1 others, theirs come here
            sent += times * c["bytes"] * (c["size"] - 1)
            received += times * c["bytes"] * (c["size"] - 1)
    return sent, received


# ---- one row ----
def analyze(
    case: Case, unet=None, params=None, baseline: Optional[float] = None, with_flops: bool = True
) -> dict:
    """All numbers of one case (bytes per device per displaced step; see `format_table` for the layout).

    `baseline`: the single-device FLOPs if already known; `with_flops=False` skips lowering (bytes only).
    """
    if unet is None:
        unet, params = abstract_model(case.config, case.dtype)
    row = case.row()
    try:
        d = make_denoiser(unet, case)
    except ConfigError as e:
        return dict(row, error=str(e))
    traced, seen = trace_displaced_step(d, params, abstract_inputs(case))
    p, g = d.patches, d.cfg_size
    # every layer's exchanged shapes, from a mode that keeps state of every kind (the case's mode may
    # exchange some synchronously, keeping nothing); the case's mode says which of them move
    seen_of = lambda c: (
        seen if c == case else trace_displaced_step(make_denoiser(unet, c), params, abstract_inputs(case))[1]
    )
    layers = seen_of(dataclasses.replace(case, mode="corrected_async_gn"))
    per_band = [ours_per_device(layers, i, p, g, case.mode) for i in range(p)]
    sent = [ours_per_device(layers, i, p, g, case.mode, sent=True) for i in range(p)]
    busiest = max(range(p), key=lambda i: sum(per_band[i].values()))
    # the reference keeps K and V in the activation dtype whatever our stale K/V options are
    seen_ref = seen_of(
        dataclasses.replace(case, mode="corrected_async_gn", stale_kv="kv", stale_kv_dtype=None)
    )
    ours, ref = per_band[busiest], reference_per_device(seen_ref, p, case.devices, case.mode)
    found = collectives(traced.jaxpr)
    check = all(
        collective_bytes(found, {CFG: c, PATCH: i}) == (sum(sent[i].values()), sum(per_band[i].values()))
        for c in range(g)
        for i in range(p)
    )
    counts = {k: len(v) for k, v in state_by_kind(seen["state"]).items()}
    if with_flops:
        baseline = single_device_flops(unet, params, case) if baseline is None else baseline
        per_device = flops(traced.lower())
        row.update(
            flops_per_device=per_device, flops_single_device=baseline, flops_ratio=per_device / baseline
        )
    return dict(
        row,
        cfg_size=g,
        patches=p,
        busiest_band=busiest,
        layers_with_state=counts,
        ours=dict(
            received=_with_total(ours),
            sent=_with_total(sent[busiest]),
            total_by_band=[sum(v.values()) for v in per_band],
            stale_bytes=sum(nbytes(a) for a in jax.tree.leaves(seen["state"])),
        ),
        reference=dict(
            received=_with_total(ref), sent=_with_total(ref), stale_bytes=reference_stale_bytes(seen_ref, p)
        ),
        collectives_match=check,
    )


def _with_total(v: dict) -> dict:
    return dict(v, total=sum(v.values()))


def report(
    config: UNetConfig,
    sizes,
    devices,
    cfg_splits=(True,),
    dtype="bfloat16",
    mode="corrected_async_gn",
    batch: int = 1,
    progress=None,
    stale_kv: str = "kv",
    stale_kv_dtype: Optional[str] = None,
) -> list:
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
