"""The communication report: byte counts against a hand count of the tiny UNet's layers, FLOPs per device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.models.presets import preset_dict, unet_preset
from distrifusion_jax.parallel import CFG, PATCH, PatchPlan
from distrifusion_jax.tools import abstract as A
from distrifusion_jax.tools import comm as R
from distrifusion_jax.tools import comm_report

TINY = preset_dict(
    "micro-sdxl"
)  # the smallest SDXL-shaped UNet: DownBlock2D + a cross-attention level, text_time
HEIGHT, WIDTH = 128, 96  # latent 16 x 12: four bands of 4 rows, 2 rows at the lower level
CONFIG = unet_preset("micro-sdxl")


@pytest.fixture(scope="module")
def model():
    return A.abstract_model(CONFIG, "bfloat16")


@pytest.fixture(scope="module")
def rows(model):
    """analyze() of the tiny UNet for 2 and 4 devices with and without the CFG split (traced once)."""
    unet, params = model
    baseline = A.single_device_flops(unet, params, A.Case(CONFIG, HEIGHT, WIDTH, 1))
    return {
        (n, split): R.analyze(A.Case(CONFIG, HEIGHT, WIDTH, n, split), unet, params, baseline)
        for n in (2, 4)
        for split in (True, False)
    }


def hand_count(cfg: dict, h: int, w: int):
    """The UNet's leaf layers from its config: 3x3 convs (input rows, W, C_in, stride), self-attentions
    (rows, W, inner), GroupNorm count; conv_in first. Written from diffusers' block structure."""
    ch, levels = cfg["block_out_channels"], len(cfg["block_out_channels"])
    convs, attns, gns = [(h, w, 4, 1)], [], 0
    skips, c = [ch[0]], ch[0]

    def resnet(cin, cout, rows, cols):
        nonlocal gns
        gns += 2
        convs.extend([(rows, cols, cin, 1), (rows, cols, cout, 1)])

    def transformer(cout, rows, cols):
        nonlocal gns
        gns += 1
        attns.append((rows, cols, cout))  # inner = heads * head_dim = channels

    for i, kind in enumerate(cfg["down_block_types"]):
        rows, cols = h >> i, w >> i
        for _ in range(cfg["layers_per_block"]):
            resnet(c, ch[i], rows, cols)
            c = ch[i]
            if kind == "CrossAttnDownBlock2D":
                transformer(c, rows, cols)
            skips.append(c)
        if i < levels - 1:
            convs.append((rows, cols, c, 2))  # downsampler, stride 2: its input rows
            skips.append(c)
    rows, cols = h >> (levels - 1), w >> (levels - 1)
    resnet(c, c, rows, cols)
    transformer(c, rows, cols)
    resnet(c, c, rows, cols)
    for j, kind in enumerate(cfg["up_block_types"]):
        level = levels - 1 - j
        rows, cols = h >> level, w >> level
        for _ in range(cfg["layers_per_block"] + 1):
            resnet(c + skips.pop(), ch[level], rows, cols)
            c = ch[level]
            if kind == "CrossAttnUpBlock2D":
                transformer(c, rows, cols)
        if j < levels - 1:
            convs.append((2 * rows, 2 * cols, c, 1))  # upsampler: conv after nearest 2x
    gns += 1  # conv_norm_out
    convs.append((h, w, ch[0], 1))  # conv_out
    return convs, attns, gns


def expected(cfg: dict, h: int, w: int, n: int, split: bool, itemsize: int = 2):
    """Bytes per displaced step of the busiest band (ours, the reference) and stale memory, by hand."""
    convs, attns, gns = hand_count(cfg, h, w)
    p = n // 2 if split else n
    b = 1 if split else 2  # the UNet's batch on one device: one guidance branch, or both
    groups = cfg["norm_num_groups"]
    middle = min(p - 1, 2)  # ppermute partners of the busiest band
    row_bytes = (
        sum(cols * cin for _, cols, cin, _ in convs[1:]) * b * itemsize
    )  # one row of every conv but conv_in
    # a stride-2 conv reads no row below its band: it takes (and keeps) only the one from above
    strided = sum(cols * cin for _, cols, cin, stride in convs[1:] if stride == 2) * b * itemsize
    conv_in_row = b * w * 4 * itemsize
    kv_band = 2 * sum((rows // p) * cols * inner for rows, cols, inner in attns) * b * itemsize  # K and V
    out_band = b * (h // p) * w * 4 * itemsize
    ours = dict(
        halo=middle * (row_bytes + conv_in_row) - max(middle - 1, 0) * strided,
        kv=(p - 1) * kv_band,
        gn=(p - 1) * gns * b * groups * 2 * 4,
        cfg=out_band if split else 0,
    )
    # one band per device group (N=2 with the CFG split): plain UNet, no exchange, no state
    ours_stale = 2 * row_bytes - strided + p * kv_band + gns * p * b * groups * 2 * 4 if p > 1 else 0
    ref = dict(
        halo=(p - 1) * 2 * row_bytes,
        kv=(p - 1) * kv_band,
        gn=(p - 1) * gns * b * groups * 2 * itemsize,
        cfg=(n - 1) * out_band,
    )
    ref_stale = p * (2 * row_bytes + kv_band + gns * b * groups * 2 * itemsize) if p > 1 else 0
    return ours, ours_stale, ref, ref_stale


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("n", [2, 4])
def test_bytes_match_hand_count(rows, n, split):
    row = rows[n, split]
    ours, ours_stale, ref, ref_stale = expected(TINY, HEIGHT // 8, WIDTH // 8, n, split)
    assert {k: row["ours"]["received"][k] for k in R.KINDS} == ours
    if 0 < row["busiest_band"] < row["patches"] - 1:  # a middle band sends what it receives
        assert row["ours"]["sent"] == row["ours"]["received"]
    assert row["ours"]["stale_bytes"] == ours_stale
    assert {k: row["reference"]["received"][k] for k in R.KINDS} == ref
    assert row["reference"]["stale_bytes"] == ref_stale
    assert row["collectives_match"]  # the same totals from the collectives of the traced program
    with_state = {"halo": 19, "kv": 8, "gn": 21}  # 20 convs less conv_in; 4 attn1 x (k, v)
    assert row["layers_with_state"] == (with_state if row["patches"] > 1 else {k: 0 for k in with_state})


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("n", [2, 4])
def test_flops_ratio_is_sane(rows, n, split):
    assert 1 / n <= rows[n, split]["flops_ratio"] < min(1.0, 2 / n)


def test_float32_and_separate_gn():
    """Item sizes follow the dtype; separate_gn exchanges no statistics (ours nor the reference's)."""
    unet, params = A.abstract_model(CONFIG, "float32")
    row = R.analyze(
        A.Case(CONFIG, HEIGHT, WIDTH, 4, False, "float32", "separate_gn"), unet, params, with_flops=False
    )
    ours, _, ref, _ = expected(TINY, HEIGHT // 8, WIDTH // 8, 4, False, itemsize=4)
    assert {k: row["ours"]["received"][k] for k in R.KINDS} == dict(ours, gn=0)
    assert {k: row["reference"]["received"][k] for k in R.KINDS} == dict(ref, gn=0)
    assert row["collectives_match"]


@pytest.mark.parametrize("stale_kv, stale_kv_dtype", [("hidden", None), ("kv", "int8"), ("hidden", "int8")])
def test_stale_kv_options_shrink_kv_bytes(model, rows, stale_kv, stale_kv_dtype):
    """K/V bytes (exchange and state) follow the options' shapes; the reference's stay those of bf16 K and V."""
    unet, params = model
    row = R.analyze(
        A.Case(CONFIG, HEIGHT, WIDTH, 4, False, stale_kv=stale_kv, stale_kv_dtype=stale_kv_dtype),
        unet,
        params,
        with_flops=False,
    )
    default = rows[4, False]
    kv = default["ours"]["received"]["kv"]  # bf16 K and V: 2 bytes per element
    head_dim = 8  # both attention levels: 16 channels in 2 heads
    elements = kv // 2 // (2 if stale_kv == "hidden" else 1)  # hidden: C per token instead of 2 C
    scales = 0 if stale_kv_dtype is None else 4 * elements // (16 if stale_kv == "hidden" else head_dim)
    expect = elements * (2 if stale_kv_dtype is None else 1) + scales
    assert row["ours"]["received"]["kv"] == expect
    assert (
        row["ours"]["stale_bytes"] - default["ours"]["stale_bytes"] == (expect - kv) * 4 // 3
    )  # P / (P - 1)
    assert {k: v for k, v in row["ours"]["received"].items() if k not in ("kv", "total")} == {
        k: v for k, v in default["ours"]["received"].items() if k not in ("kv", "total")
    }
    assert row["reference"] == default["reference"]
    assert row["collectives_match"]


def test_border_bands_exchange_less(rows):
    row = rows[4, False]
    first, second, third, last = row["ours"]["total_by_band"]
    # the first band takes no downsampler rows (a stride-2 conv reads none below its band), the last takes them
    assert first < last < second == third == row["ours"]["received"]["total"]


def test_indivisible_size_is_reported_not_raised(model):
    unet, params = model
    row = R.analyze(A.Case(CONFIG, 136, WIDTH, 4, False), unet, params, baseline=1.0)
    assert "divisible" in row["error"]


# ---- XLA's cost analysis of a shard_map'd program is per device ----
def test_lowered_cost_analysis_is_per_device():
    m, k, n = 64, 32, 16
    mesh = Mesh(np.array(jax.devices()[:4]), (PATCH,))
    f = lambda x, w: x @ w
    sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(PATCH), P()), out_specs=P(PATCH)))
    args = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    per_device = 2 * (m // 4) * k * n
    assert A.flops(jax.jit(f).lower(*args)) == 4 * per_device
    assert A.flops(sharded.lower(*args)) == pytest.approx(per_device, abs=8)
    assert A.flops(sharded.lower(*args).compile()) == pytest.approx(per_device, abs=8)


def test_sharded_unet_flops_equal_unsharded_band(model):
    """A plain UNet under shard_map on a quarter band costs what the UNet costs on an image that size."""
    unet, params = model
    case = A.Case(CONFIG, HEIGHT, WIDTH, 4, False)
    d = A.make_denoiser(unet, case)
    plain, t = d.model(None), d.timesteps[0]
    fn = lambda p, x, e, a: d.eps(plain, p, None, x, t, e, a)[0]
    sharded = jax.shard_map(
        fn, mesh=d.mesh, in_specs=(P(), P(None, PATCH), P(), P()), out_specs=P(None, PATCH)
    )
    whole = A.flops(jax.jit(sharded).lower(params, *A.abstract_inputs(case)))
    band = A.Case(CONFIG, HEIGHT // 4, WIDTH, 1, False)
    assert whole == pytest.approx(A.single_device_flops(unet, params, band), abs=8)


def test_zero_initial_state_costs_like_a_state_input(model, rows):
    """`trace_displaced_step` lets Flax create the state; the FLOPs match a step that takes it as input."""
    unet, params = model
    case = A.Case(CONFIG, HEIGHT, WIDTH, 4, True)
    d, inputs = A.make_denoiser(unet, case), A.abstract_inputs(case)
    sync, disp = (d.model(PatchPlan(ph, case.mode)) for ph in ("sync", "displaced"))
    t, batch, state = d.timesteps[0], P(CFG), P((CFG, PATCH))
    init = jax.shard_map(
        lambda p, x, e, a: d.initial_stale(sync, p, x, e, a),
        mesh=d.mesh,
        in_specs=(P(), P(None, PATCH), batch, batch),
        out_specs=state,
    )
    stale = jax.eval_shape(init, params, *inputs)
    step = jax.shard_map(
        lambda p, s, x, e, a: d.eps(disp, p, s, x, t, e, a),
        mesh=d.mesh,
        in_specs=(P(), state, P(None, PATCH), batch, batch),
        out_specs=(P(None, PATCH), state),
    )
    assert rows[4, True]["flops_per_device"] == A.flops(jax.jit(step).lower(params, stale, *inputs))


def test_cli_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert comm_report.main(["--tiny", "--sizes", "64", "--device-counts", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ours (JAX)" in text and "distrifuser" in text
    [row] = json.loads(out.read_text())["rows"]
    assert row["devices"] == 4 and row["patches"] == 2 and row["collectives_match"]
