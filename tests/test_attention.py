"""Blockwise attention (attention_impl="chunked"): equal to jax.nn.dot_product_attention, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from distrifusion_jax.models.vae import AutoencoderKL, VAEConfig
from distrifusion_jax.nn.attention import chunked_dot_product_attention
from helpers import SDXL_MICRO, micro_setup, rel_l2, torch_unet

# (Tq, Tk, heads, head_dim, q_chunk, kv_chunk): odd lengths that divide no block, a prime key count,
# blocks of one token, one block for everything, more blocks than a divisor would give
SHAPES = [
    (37, 101, 3, 8, 16, 24),
    (7, 53, 2, 16, 3, 7),
    (10, 10, 1, 8, 1, 1),
    (5, 7, 4, 4, 1024, 4096),
    (64, 96, 2, 32, 24, 40),
]
F32_TOL = 1e-6  # relative L2 vs jax.nn.dot_product_attention; reached: at most about 4e-7


def inputs(shape, dtype, seed=0):
    tq, tk, n, hd = shape[:4]
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, t, n, hd)) * 2, dtype) for t in (tq, tk, tk)]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_equals_dot_product_attention_float32(shape):
    q, k, v = inputs(shape, jnp.float32)
    out = chunked_dot_product_attention(q, k, v, *shape[4:])
    err = rel_l2(out, jax.nn.dot_product_attention(q, k, v))
    print(f"{shape}: float32 relative L2 {err:.1e}")
    assert out.dtype == jnp.float32 and out.shape == q.shape
    assert err <= F32_TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_bfloat16_is_as_accurate_as_dot_product_attention(shape):
    """Both against float32 attention of the same (bf16-rounded) inputs: no worse than JAX's own bf16 path."""
    q, k, v = inputs(shape, jnp.bfloat16)
    exact = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)))
    out = chunked_dot_product_attention(q, k, v, *shape[4:])
    ours, theirs = rel_l2(out, exact), rel_l2(jax.nn.dot_product_attention(q, k, v), exact)
    print(f"{shape}: bfloat16 relative L2 to float32 attention: chunked {ours:.1e}, jax.nn {theirs:.1e}")
    assert out.dtype == jnp.bfloat16
    assert ours <= 4e-3 and ours <= 1.2 * theirs


def test_chunked_cuts_compiled_temporaries():
    """XLA's attention holds the [B, N, Tq, Tk] float32 scores; the blockwise one only a block pair's."""
    b, tq, tk, n, hd = 1, 2048, 8192, 4, 32
    shapes = [jax.ShapeDtypeStruct((b, t, n, hd), jnp.float32) for t in (tq, tk, tk)]
    temp = lambda f: jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    full = temp(jax.nn.dot_product_attention)
    blocks = temp(lambda q, k, v: chunked_dot_product_attention(q, k, v, 512, 1024))
    scores = b * n * tq * tk * 4
    print(
        f"temporaries of a [{b}, {tq} x {tk}, {n} heads] attention: jax.nn {full / 1e6:.1f} MB, "
        f"chunked {blocks / 1e6:.1f} MB (scores {scores / 1e6:.1f} MB)"
    )
    assert full >= scores and blocks <= scores / 10


def test_unet_with_chunked_attention():
    unet, params, (latents, ehs, added), _ = micro_setup(64, 96)
    x, t = jnp.concatenate([latents, latents]), jnp.float32(500.0)
    apply = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, t, ehs, added))(params)
    assert rel_l2(apply(unet.clone(attention_impl="chunked")), apply(unet)) <= 1e-6


def test_auto_chunks_only_large_attention(monkeypatch):
    """ "auto": blockwise where the float32 scores would exceed AUTO_CHUNKED_BYTES, jax.nn elsewhere."""
    from distrifusion_jax.nn import attention

    unet, params, (latents, ehs, added), _ = micro_setup(64, 96)
    auto = unet.clone(attention_impl="auto")
    scans = lambda: str(
        jax.make_jaxpr(
            lambda p: auto.apply({"params": p}, latents, 1.0, ehs[1:], {k: v[1:] for k, v in added.items()})
        )(params)
    ).count("scan[")
    assert scans() == 0  # tiny attentions: the default path
    monkeypatch.setattr(attention, "AUTO_CHUNKED_BYTES", 0)
    assert scans() == 16  # 4 transformer blocks x (self, cross) x (query map, key/value scan)


def test_vae_decode_with_chunked_attention():
    """The VAE's one-head mid-block attention (head_dim = channels), more than one block of tokens."""
    cfg = VAEConfig.from_dict(
        dict(
            _class_name="AutoencoderKL",
            block_out_channels=[8, 16],
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
        )
    )
    vae = AutoencoderKL(cfg)
    params = vae.init_params(seed=1)
    z = jnp.asarray(
        np.random.default_rng(0).standard_normal((1, 64, 72, 4)), jnp.float32
    )  # 4608 tokens: 6 x 2 blocks
    ref = vae.apply({"params": params}, z, method=vae.decode)
    chunked = vae.clone(attention_impl="chunked")
    out = chunked.apply({"params": params}, z, method=chunked.decode)
    err = rel_l2(out, ref)
    print(f"VAE decode, chunked attention over 4608 tokens: relative L2 {err:.1e}")
    assert err <= 1e-6


def test_load_unet_passes_attention_impl(tmp_path):
    torch_unet(SDXL_MICRO).save_pretrained(tmp_path)
    unet, _ = dj.load_unet(tmp_path, attention_impl="chunked")
    assert unet.attention_impl == "chunked"


def test_unknown_implementation_is_refused():
    unet, params, (latents, ehs, added), _ = micro_setup(64, 96)
    with pytest.raises(
        dj.ConfigError, match="unknown attention implementation 'flash': use one of None, 'xla'"
    ):
        unet.clone(attention_impl="flash").apply(
            {"params": params}, jnp.concatenate([latents, latents]), jnp.float32(1.0), ehs, added
        )


def test_chunked_under_shard_map_equals_full_attention():
    """Inside shard_map the streaming softmax's scan carry must take the band's varying type: each band's
    queries against the gathered keys equal plain attention over the whole image."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("cfg", "patch"))
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 8)), jnp.float32) for _ in range(3))
    gather = lambda a: jax.lax.all_gather(a, "patch", axis=1, tiled=True)
    band = jax.shard_map(
        lambda q, k, v: chunked_dot_product_attention(q, gather(k), gather(v), 8, 16),
        mesh=mesh,
        in_specs=(P(None, "patch"),) * 3,
        out_specs=P(None, "patch"),
    )
    err = rel_l2(jax.jit(band)(q, k, v), jax.nn.dot_product_attention(q, k, v))
    print(f"chunked attention under shard_map vs plain: relative L2 {err:.1e}")
    assert err <= 1e-6
