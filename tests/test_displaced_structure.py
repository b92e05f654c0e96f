"""The algorithm's structure, read from traced programs: which exchanges each mode makes, which ones a
displaced step consumes, the real loop's sequence of synchronous and displaced steps, and state that
is only kept where something reads it. These fail when DistriFusion is silently off or wrong."""

from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distrifusion_jax as dj
from distrifusion_jax.parallel import CFG, PATCH, PatchPlan
from helpers import micro_setup, output_taints, shard_map_body

HEIGHT, WIDTH = 128, 64  # latents 16 x 8


@pytest.fixture(scope="module")
def setup():
    return micro_setup(HEIGHT, WIDTH)


def kind(eqn) -> str:
    """What a collective of patch parallelism carries, from its primitive and operand."""
    name, aval = eqn.primitive.name, eqn.invars[0].aval
    if name == "ppermute":
        return "conv_in halo" if aval.shape[-1] == 4 else "halo"
    if name == "all_gather_invariant" or eqn.params.get("axis_name") in (CFG, (CFG,)):
        return "cfg"
    if name == "all_gather":
        return "gn stats" if aval.shape[-1] == 2 and aval.dtype == jnp.float32 else "tokens"
    return name


class Wrapped(nn.Module):
    """The UNet as a submodule of another model: its conv_in's path is no longer ('conv_in',)."""

    unet: dj.UNet2DConditionModel

    def __call__(self, *args):
        return self.unet(*args)


def trace_step(setup, mode, phase="displaced", split_batch=True, wrap=False, **plan_options):
    """One step of `phase` on a fresh state, under shard_map on 8 devices: (collectives by kind, kinds of
    those feeding the prediction, taints of the outputs, the collectives)."""
    unet, params, (latents, ehs, added), sched = setup
    d = dj.Denoiser(
        unet, dj.DistriConfig(HEIGHT, WIDTH, devices=8, split_batch=split_batch, mode=mode), sched, 4
    )
    model = d.model(PatchPlan(phase, mode, **plan_options))
    sync = d.model(PatchPlan("sync", mode, **plan_options))
    if wrap:
        model, sync, params = Wrapped(model), Wrapped(sync), {"unet": params}

    def f(params, x, ehs, added):
        state = d.initial_stale(sync, params, x, ehs, added)
        return d.eps(model, params, state, x, jnp.float32(1.0), ehs, added)

    batch = P(CFG) if d.cfg_size == 2 else P()
    sharded = jax.shard_map(
        f, mesh=d.mesh, in_specs=(P(), P(None, PATCH), batch, batch), out_specs=(P(None, PATCH), P(d.varying))
    )
    body = shard_map_body(jax.make_jaxpr(sharded)(params, latents, ehs, added))
    found = []
    out = output_taints(body, [frozenset()] * len(body.invars), found)
    feeding = Counter(kind(e) for e in found if id(e) in out[0])
    return Counter(kind(e) for e in found), feeding, out, found


# expected collectives of a displaced step per mode: (kinds made, kinds consumed by this step's prediction)
ALL = ("conv_in halo", "halo", "tokens", "gn stats", "cfg")
EXPECTED = {
    "corrected_async_gn": (ALL, ("conv_in halo", "cfg")),
    "stale_gn": (ALL, ("conv_in halo", "cfg")),
    "sync_gn": (ALL, ("conv_in halo", "cfg", "gn stats")),
    "separate_gn": (("conv_in halo", "halo", "tokens", "cfg"), ("conv_in halo", "cfg")),
    "full_sync": (ALL, ALL),
    "no_sync": (("conv_in halo", "cfg"), ("conv_in halo", "cfg")),
}


@pytest.fixture(scope="module")
def sync_counts(setup):
    """Collectives of a synchronous step (every exchange, all consumed): the reference counts."""
    made, feeding, _, _ = trace_step(setup, "corrected_async_gn", phase="sync")
    assert made == feeding  # a synchronous step consumes all of them
    assert made["conv_in halo"] == 2 and made["cfg"] == 1 and min(made.values()) > 0
    return made


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_makes_and_consumes_the_expected_exchanges(setup, sync_counts, mode):
    made, feeding, _, _ = trace_step(setup, mode)
    kinds_made, kinds_fed = EXPECTED[mode]
    print(f"{mode}: made {dict(made)}, consumed in the same step {dict(feeding)}")
    assert made == Counter({k: sync_counts[k] for k in kinds_made})
    assert feeding == Counter({k: sync_counts[k] for k in kinds_fed})


@pytest.mark.parametrize(
    "stale_kv, dtype, per_tensor",
    [("hidden", None, 1), ("kv", "int8", 4), ("hidden", "int8", 2), ("kv", "float8_e4m3fn", 4)],
)
def test_stale_options_exchange_but_never_consume_their_tokens(
    setup, sync_counts, stale_kv, dtype, per_tensor
):
    """'hidden' gathers one tensor per self-attention instead of K and V; 8-bit codes come with scales."""
    made, feeding, _, _ = trace_step(setup, "corrected_async_gn", stale_kv=stale_kv, stale_kv_dtype=dtype)
    assert made["tokens"] == sync_counts["tokens"] // 2 * per_tensor
    assert feeding == Counter({"conv_in halo": 2, "cfg": 1})


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_every_kept_state_leaf_is_read(setup, mode):
    """No state is stored that the displaced step does not read (full_sync keeps none; the modes that
    normalise without stale statistics keep none of them; a stride-2 conv keeps no row below its band)."""
    unet, params, (latents, ehs, added), sched = setup
    d = dj.Denoiser(unet, dj.DistriConfig(HEIGHT, WIDTH, devices=8, mode=mode), sched, 4)
    disp, sync = d.model(PatchPlan("displaced", mode)), d.model(PatchPlan("sync", mode))

    def f(params, state, x, ehs, added):
        return d.eps(disp, params, state, x, jnp.float32(1.0), ehs, added)[0]

    def make_state(params, x, ehs, added):
        return d.initial_stale(sync, params, x, ehs, added)

    specs = (P(), P(None, PATCH), P(CFG), P(CFG))
    state = jax.jit(jax.shard_map(make_state, mesh=d.mesh, in_specs=specs, out_specs=P(d.varying)))(
        params, latents, ehs, added
    )
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if mode == "full_sync":
        assert leaves == []
        return
    names = {jax.tree_util.keystr(p).split("'")[-2] for p, _ in leaves}
    assert ("stats" in names) == (mode in ("corrected_async_gn", "stale_gn"))
    sharded = jax.shard_map(
        f, mesh=d.mesh, in_specs=(P(), P(d.varying)) + specs[1:], out_specs=P(None, PATCH)
    )
    body = shard_map_body(jax.make_jaxpr(sharded)(params, state, latents, ehs, added))
    n_params = len(jax.tree.leaves(params))
    taints = [
        frozenset({i - n_params}) if n_params <= i < n_params + len(leaves) else frozenset()
        for i in range(len(body.invars))
    ]
    read = output_taints(body, taints, [])[0]
    unread = [jax.tree_util.keystr(p) for i, (p, _) in enumerate(leaves) if i not in read]
    assert unread == []
    # a 3x3 conv keeps a row from each neighbour, the stride-2 downsampler only the one above its band
    rows = {
        jax.tree_util.keystr(p): a.shape[1] for p, a in leaves if jax.tree_util.keystr(p).endswith("['halo']")
    }
    assert rows and {k: 1 if "downsamplers" in k else 2 for k in rows} == rows


def loop_structure(setup, steps, warmup, split_batch=True, mode="corrected_async_gn"):
    """The real loop's traced program: per lax.scan of the shard_map body, (length, collectives by kind,
    kinds feeding the latents carried to the next step)."""
    unet, params, (latents, ehs, added), sched = setup
    d = dj.Denoiser(
        unet,
        dj.DistriConfig(HEIGHT, WIDTH, devices=8, split_batch=split_batch, mode=mode, warmup_steps=warmup),
        sched,
        steps,
    )
    body = shard_map_body(jax.make_jaxpr(d._run)(params, latents, ehs, added, jnp.float32(5.0)))
    scans = []
    for eqn in body.eqns:
        if eqn.primitive.name != "scan":
            continue
        inner = eqn.params["jaxpr"].jaxpr
        found = []
        out = output_taints(inner, [frozenset()] * len(inner.invars), found)
        fed = Counter(kind(e) for e in found if id(e) in out[0])  # out[0]: the latents carry
        scans.append((eqn.params["length"], Counter(kind(e) for e in found), fed))
    return scans


@pytest.mark.parametrize(
    "steps, warmup, split_batch", [(5, 0, True), (5, 2, False), (4, 3, True), (3, 4, False)]
)
def test_loop_runs_warmup_plus_one_synchronous_steps_then_displaced(
    setup, sync_counts, steps, warmup, split_batch
):
    """Steps 0..warmup_steps consume every exchange of their own step; the rest only conv_in's halo and
    the guidance exchange (the reference's `counter <= warmup_steps`)."""
    scans = loop_structure(setup, steps, warmup, split_batch)
    n_sync = min(steps, warmup + 1)
    expected_lengths = [n for n in (n_sync, steps - n_sync) if n]
    assert [length for length, _, _ in scans] == expected_lengths
    cfg = {"cfg": 1} if split_batch else {}
    for i, (length, made, fed) in enumerate(scans):
        made = made - Counter(cfg)  # without the split there is no guidance exchange
        assert made == Counter({k: v for k, v in sync_counts.items() if k != "cfg"})
        if i == 0 and n_sync:
            assert fed == made + Counter(cfg)
        else:
            assert fed == Counter({"conv_in halo": 2, **cfg})


def test_conv_in_stays_exact_wherever_the_unet_sits(setup):
    """conv_in's halo is exchanged in its own step and kept nowhere, also inside another module."""
    made, feeding, _, _ = trace_step(setup, "corrected_async_gn", wrap=True)
    assert made["conv_in halo"] == 2 and feeding == Counter({"conv_in halo": 2, "cfg": 1})


class Probe(nn.Module):
    """One self-attention's whole-image tokens and one 3x3 conv's padded band, as the plan provides them."""

    parallel: PatchPlan

    @nn.compact
    def __call__(self, x):  # x: this device's band [B, h, W, C]
        tokens = self.parallel.whole_image_tokens(self, "k", x.reshape(x.shape[0], -1, x.shape[-1]))
        return tokens, self.parallel.pad_rows(self, x, 1, 1)


def test_displaced_layers_see_stale_neighbours_and_their_own_fresh_band():
    """Against a plain full-array construction: in a displaced step device i attends to the previous
    step's tokens of every other band and its own band's fresh tokens, pads its rows with the previous
    step's neighbour rows, and stores this step's exchange for the next step."""
    bands, rows = 4, 2
    mesh = dj.parallel.make_mesh(jax.devices()[:bands], 1)
    rng = np.random.default_rng(0)
    x1, x2 = (jnp.asarray(rng.standard_normal((1, bands * rows, 3, 2)), jnp.float32) for _ in range(2))

    def step(phase, x, state):
        probe = Probe(PatchPlan(phase, "corrected_async_gn"))
        variables = {} if state is None else {"stale": state}
        (tokens, padded), new = probe.apply(variables, x, mutable=["stale"])
        return tokens[None], padded[None], dj.parallel.vary(new["stale"], (PATCH,))

    def run(x1, x2):
        _, _, state = step("sync", x1, None)
        tokens, padded, state = step("displaced", x2, state)
        return tokens, padded, jax.tree.map(lambda a: a[None], state)

    stacked = P(PATCH)
    tokens, padded, state = jax.jit(
        jax.shard_map(
            run, mesh=mesh, in_specs=(P(None, PATCH), P(None, PATCH)), out_specs=(stacked, stacked, stacked)
        )
    )(x1, x2)
    band = lambda x, i: np.asarray(x)[:, i * rows : (i + 1) * rows]
    flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
    zero_row = np.zeros((1, 1, 3, 2), np.float32)
    for i in range(bands):
        seen = np.concatenate([band(x2 if j == i else x1, j) for j in range(bands)], axis=1)
        np.testing.assert_array_equal(np.asarray(tokens)[i], flat(seen))
        above = band(x1, i - 1)[:, -1:] if i > 0 else zero_row
        below = band(x1, i + 1)[:, :1] if i < bands - 1 else zero_row
        np.testing.assert_array_equal(
            np.asarray(padded)[i], np.concatenate([above, band(x2, i), below], axis=1)
        )
        # what the next step will read: this step's exchange of x2
        np.testing.assert_array_equal(np.asarray(state["k"])[i], flat(np.asarray(x2)))
        above = band(x2, i - 1)[:, -1:] if i > 0 else zero_row
        below = band(x2, i + 1)[:, :1] if i < bands - 1 else zero_row
        np.testing.assert_array_equal(np.asarray(state["halo"])[i], np.concatenate([above, below], axis=1))
