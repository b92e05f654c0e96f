"""img2img's communication report: the encode's bytes against a hand count of the tiny VAE's layers, the
refine loop's steps each counted once, scans counted per iteration, the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distrifusion_jax.models.presets import preset_dict, unet_preset, vae_preset
from distrifusion_jax.models.vae import AutoencoderKL
from distrifusion_jax.parallel import PATCH
from distrifusion_jax.tools import abstract as A
from distrifusion_jax.tools import comm as R
from distrifusion_jax.tools import comm_img2img as I
from distrifusion_jax.tools import comm_report

VAE = preset_dict("tiny-sdxl", "vae")  # 4 levels (16, 16, 32, 32 channels), one resnet each, 8 groups
UNET = unet_preset("micro-sdxl")
HEIGHT, WIDTH = 128, 96  # latent 16 x 12


@pytest.fixture(scope="module")
def unet():
    return A.abstract_model(UNET, "bfloat16")


def vae_of(dtype):
    vae = AutoencoderKL(vae_preset("tiny-sdxl"), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    return vae, A.abstract_weights(vae, dtype)


def encoder_layers(cfg: dict, w: int):
    """The VAE encoder's 3x3 convs as (input columns, input channels) and its GroupNorm count, written from
    diffusers' Encoder: conv_in, per level its resnets (conv1, conv2) and, but at the last, the stride-2
    downsampler; the mid-block's two resnets and attention; conv_norm_out, conv_out."""
    ch, c = cfg["block_out_channels"], cfg["block_out_channels"][0]
    convs, gns = [(w, cfg["in_channels"])], 0
    for i, out in enumerate(ch):
        for _ in range(cfg["layers_per_block"]):
            convs += [(w >> i, c), (w >> i, out)]
            c, gns = out, gns + 2
        if i < len(ch) - 1:
            convs.append((w >> i, c))
    last = w >> (len(ch) - 1)
    convs += [(last, c)] * 4 + [(last, c)]  # the mid-block's resnets, conv_out
    return convs, gns + 4 + 1 + 1  # the mid-block's resnets, its attention's norm, conv_norm_out


def encode_by_hand(cfg: dict, h: int, w: int, n: int, itemsize: int) -> dict:
    """{band: bytes received by kind} in one encode of a [1, h, w, 3] image over n bands."""
    convs, gns = encoder_layers(cfg, w)
    row = sum(cols * cin for cols, cin in convs) * itemsize  # one row of every conv's input
    # the downsampler drops the row from above (its padding is asymmetric) but receives it all the same
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    tokens, c = (h // f // n) * (w // f), cfg["block_out_channels"][-1]  # a band of the mid-block attention
    return {
        i: dict(
            halo=(int(i > 0) + int(i < n - 1)) * row,
            kv=2 * (n - 1) * tokens * c * itemsize,  # K and V, one head
            gn=(n - 1) * gns * cfg["norm_num_groups"] * 2 * 4,  # float32 (mean, var) per group
            cfg=0,
        )
        for i in range(n)
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [2, 4])
def test_encode_bytes_match_hand_count(n, dtype):
    vae, params = vae_of(dtype)
    measured = I.encode_traffic(vae, params, HEIGHT, WIDTH, jax.devices()[:n])
    assert measured == encode_by_hand(VAE, HEIGHT, WIDTH, n, jnp.dtype(dtype).itemsize)


def test_encode_on_one_device_moves_nothing():
    vae, params = vae_of("float32")
    assert I.encode_traffic(vae, params, HEIGHT, WIDTH, jax.devices()[:3]) == {}  # 3 does not divide 16 rows


@pytest.mark.parametrize(
    "refine, phases",
    [
        (I.Refine(10, 0.5, 1), [("sync", 2), ("displaced", 3)]),  # steps 5..9: warmup from step 5
        (I.Refine(10, 0.5, 4), [("sync", 5)]),  # the warmup covers every step run
    ],
)
def test_refine_counts_each_step_run_once(unet, refine, phases):
    """The loop's per-step bytes are the displaced step's of comm.analyze, each step counted once."""
    model, params = unet
    case = A.Case(UNET, HEIGHT, WIDTH, 8, True)
    vae, vae_params = vae_of("float32")
    row = I.analyze(case, model, params, vae, vae_params, refine)
    assert [(p["name"], p["steps"]) for p in row["refine"]["phases"]] == phases
    step = R.analyze(case, model, params, with_flops=False)["ours"]["received"]
    for p in row["refine"]["phases"]:  # the middle bands, busiest in both programs
        assert p["per_step"] == step  # a synchronous step moves what a displaced one does
    assert row["refine"]["received"] == {k: v * sum(n for _, n in phases) for k, v in step.items()}
    assert row["total"] == row["refine"]["received"]["total"] + row["encode"]["received"]["total"]


def test_one_band_per_guidance_half_moves_only_the_guidance_exchange(unet):
    model, params = unet
    vae, vae_params = vae_of("float32")
    row = I.analyze(A.Case(UNET, HEIGHT, WIDTH, 2, True), model, params, vae, vae_params, I.Refine(10, 0.5))
    [every] = row["refine"]["phases"]
    eps = (HEIGHT // 8) * (WIDTH // 8) * 4 * 2  # the other half's bf16 noise prediction
    assert (every["name"], every["steps"], every["per_step"]["total"], every["per_step"]["cfg"]) == (
        "every",
        5,
        eps,
        eps,
    )
    assert row["encode"]["row_sharded"] and row["encode"]["received"]["total"] > 0


def test_collectives_in_a_scan_count_once_per_iteration():
    mesh = Mesh(np.array(jax.devices()[:4]), (PATCH,))
    perm = [(i, i + 1) for i in range(3)]

    def body(x, _):
        return lax.ppermute(x, PATCH, perm), None

    scanned = lambda x: lax.scan(body, x, None, length=3)[0]
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)  # [2, 4] per device: 32 bytes
    trace = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(PATCH), out_specs=P(PATCH))).trace(x)
    [c] = R.collectives(trace(scanned).jaxpr)
    assert (c["times"], c["scan"][1], c["bytes"]) == (3, 3, 32)
    assert R.collective_bytes([c], {PATCH: 1}) == (96, 96) and R.collective_bytes([c], {PATCH: 0}) == (96, 0)
    looped = lambda x: lax.fori_loop(
        0, lax.axis_index(PATCH) + 1, lambda i, y: lax.ppermute(y, PATCH, perm), x
    )
    with pytest.raises(NotImplementedError, match="while loop"):
        R.collectives(trace(looped).jaxpr)


def test_cli_tiny_img2img_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [
        "--tiny",
        "--img2img",
        "--sizes",
        "64",
        "--device-counts",
        "4",
        "--steps",
        "10",
        "--json",
        str(out),
    ]
    assert comm_report.main(argv) == 0
    text = capsys.readouterr().out
    assert "img2img 64x64" in text and "strength 0.3 of 10 steps = 3 steps run" in text
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert (row["mesh"], row["first_step"], [p["steps"] for p in row["refine"]["phases"]]) == ("2x2", 7, [3])
    assert report["meta"]["machine"] and report["vae"] == "tiny-sdxl VAE"


def test_a_strength_that_runs_no_step_is_one_line(capsys):
    assert comm_report.main(["--img2img", "--steps", "10", "--strength", "0.05"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: strength=0.05 with num_inference_steps=10 runs no step")
