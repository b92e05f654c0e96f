"""Tensor parallelism: equal to one device, parameters really split, all-reduces only at row layers, errors."""

import re

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distrifusion_jax as dj
from distrifusion_jax.parallel.mesh import TENSOR
from distrifusion_jax.tensor_parallel import TensorPlan
from helpers import micro_setup, rel_l2

HEIGHT, WIDTH = 64, 96  # latents 8 x 12: tensor parallelism does not split the image, so any valid size
STEPS = 3
EXACT = 1e-5  # float32 relative L2 tolerance vs one device

# SDXL_MICRO: 8 resnets (GroupNorm groups 4), 4 transformer blocks (2 heads, feed-forward width 64).
# (devices, split_batch) -> devices per guidance branch, and the all-reduces that split layers need:
# resnets when 4 groups divide, attn1 + attn2 when 2 heads divide, the feed-forward when 64 divides.
CASES = {
    (2, False): (2, 8 + 4 * 2 + 4),  # everything split
    (4, True): (2, 8 + 4 * 2 + 4),  # CFG halves, each split in 2
    (8, True): (4, 8 + 4),  # attention replicated (2 heads over 4)
    (8, False): (8, 4),  # only the feed-forwards split (groups and heads replicated)
}


@pytest.fixture(scope="module")
def setup():
    return micro_setup(HEIGHT, WIDTH)


_cache = {}


def run(setup, **config):
    """(denoiser, final latents) of a loop, cached per configuration within the module."""
    key = tuple(sorted(config.items()))
    if key not in _cache:
        unet, params, inputs, sched = setup
        d = dj.Denoiser(unet, dj.DistriConfig(HEIGHT, WIDTH, **config), sched, STEPS, guidance_scale=5.0)
        _cache[key] = d, np.asarray(d(params, *inputs))
    return _cache[key]


def collectives(d) -> dict:
    """Collective op name -> count in the compiled program of a denoiser."""
    hlo = next(iter(d._executables.values())).as_text()
    ops = re.findall(
        r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo
    )
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("devices, split_batch", list(CASES))
def test_tensor_parallel_equals_single_device(setup, devices, split_batch):
    _, single = run(setup, devices=1)
    d, out = run(setup, devices=devices, split_batch=split_batch, parallelism="tensor")
    size, all_reduces = CASES[devices, split_batch]
    assert d.tensor.size == size and d.mesh is None
    err = rel_l2(out, single)
    ops = collectives(d)
    print(
        f"tensor on {devices} devices (split_batch={split_batch}, {d.cfg_size} x {size}): relative L2 "
        f"{err:.1e}; collectives {ops}"
    )
    assert err <= EXACT
    # one all-reduce per split layer pair, and only the CFG output gather besides
    assert ops.pop("all-reduce") == all_reduces
    assert ops == ({"all-gather": 1} if d.cfg_size == 2 else {})


def shard_shape(a):
    return a.addressable_shards[0].data.shape


def test_parameters_are_split(setup):
    unet, params, _, _ = setup
    flat = lambda d: dj.keymap.flatten(d.tensor.place_params(params))
    attn = "mid_block/attentions_0/transformer_blocks_0/attn1/"
    ff = "mid_block/attentions_0/transformer_blocks_0/ff/"
    res = "mid_block/resnets_0/"

    p = flat(run(setup, devices=2, split_batch=False, parallelism="tensor")[0])  # 2 per branch: all split
    expect = {
        attn + "to_q/kernel": (P(None, TENSOR), (16, 8)),
        attn + "to_out_0/kernel": (P(TENSOR, None), (8, 16)),
        attn + "to_out_0/bias": (P(), (16,)),
        ff + "net_0/proj/kernel": (P(None, None, TENSOR), (16, 2, 32)),  # [D, hidden | gate, I]
        ff + "net_0/proj/bias": (P(None, TENSOR), (2, 32)),
        ff + "net_2/kernel": (P(TENSOR, None), (32, 16)),
        res + "conv1/kernel": (P(None, None, None, TENSOR), (3, 3, 16, 8)),
        res + "time_emb_proj/kernel": (P(None, TENSOR), (32, 8)),
        res + "norm2/scale": (P(TENSOR), (8,)),
        res + "conv2/kernel": (P(None, None, TENSOR, None), (3, 3, 8, 16)),
        res + "conv2/bias": (P(), (16,)),
        "conv_in/kernel": (P(), (3, 3, 4, 8)),
        "time_embedding/linear_1/kernel": (P(), (8, 32)),
    }
    for path, (spec, shape) in expect.items():
        assert (p[path].sharding.spec, shard_shape(p[path])) == (spec, shape), path

    p = flat(run(setup, devices=8, split_batch=False, parallelism="tensor")[0])  # 8: only the feed-forward
    assert p[attn + "to_q/kernel"].sharding.spec == P() and p[res + "conv1/kernel"].sharding.spec == P()
    assert shard_shape(p[ff + "net_0/proj/kernel"]) == (16, 2, 8)
    assert shard_shape(p[ff + "net_2/kernel"]) == (8, 16)


def test_second_call_reuses_placement_and_program(setup):
    unet, params, inputs, _ = setup
    d, first = run(setup, devices=4, split_batch=True, parallelism="tensor")
    placed = d.tensor.place_params(params)
    second = d(params, *inputs)
    assert d.last_compile_s == 0.0 and len(d._executables) == 1
    assert d.tensor.place_params(params) is placed  # the same parameters are not moved again
    np.testing.assert_array_equal(np.asarray(second), first)
    assert second.sharding.is_fully_replicated


# ---- configurations ----
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(devices=3), "CFG split needs an even number of devices, got 3"),
        (
            dict(devices=3, split_batch=False),
            "tensor parallelism over 3 devices per guidance branch splits nothing",
        ),
        (dict(devices=6), "tensor parallelism over 3 devices per guidance branch splits nothing"),
        (dict(devices=16), "devices=16 but JAX sees 8"),
    ],
)
def test_bad_layouts(setup, kwargs, message):
    unet, _, _, sched = setup
    with pytest.raises(dj.ConfigError, match=message):
        dj.Denoiser(unet, dj.DistriConfig(HEIGHT, WIDTH, parallelism="tensor", **kwargs), sched, 2)


def test_unknown_parallelism_names_tensor():
    with pytest.raises(dj.ConfigError, match="unknown parallelism 'tensors': use one of .*'tensor'"):
        dj.DistriConfig(parallelism="tensors")


def test_image_size_is_not_constrained_by_the_device_count(setup):
    """Latents 10 rows high do not split into 4 patches (x 2 levels), but tensor parallelism does not care."""
    unet, _, _, sched = setup
    with pytest.raises(dj.ConfigError, match="does not split into 4 patches"):
        dj.Denoiser(unet, dj.DistriConfig(80, WIDTH, devices=4, split_batch=False), sched, 2)
    d = dj.Denoiser(
        unet, dj.DistriConfig(80, WIDTH, devices=4, split_batch=False, parallelism="tensor"), sched, 2
    )
    assert isinstance(d.tensor, TensorPlan) and d.tensor.size == 4
