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


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
H100, A100, V100 = (9, 0), (8, 0), (7, 0)


@pytest.mark.parametrize(
    "case, shape, dtype, capability, expected",
    [
        # (batch, heads, q_len, kv_len, head_dim)
        ("SDXL 1024^2 self-attention, bf16, H100", (2, 10, 4096, 4096, 64), BF16, H100, "cudnn"),
        ("SDXL cross-attention to 77 tokens, fp16, A100", (2, 20, 1024, 77, 64), F16, A100, "cudnn"),
        ("SDXL 3840^2 band (8 bands), bf16, A100", (1, 10, 7200, 57600, 64), BF16, A100, "cudnn"),
        ("float32 on a GPU: no fused kernel, small", (2, 10, 1024, 1024, 64), F32, H100, "xla"),
        ("float32 on a GPU, 3840^2 scores (44 GB)", (2, 10, 57600, 57600, 64), F32, H100, "chunked"),
        ("head dim 160 on an A100 (limit 128)", (1, 4, 4096, 4096, 160), BF16, A100, "xla"),
        ("head dim 160 on an H100 (limit 256)", (1, 4, 4096, 4096, 160), BF16, H100, "cudnn"),
        ("head dim 60: not a multiple of 8", (1, 4, 4096, 4096, 60), BF16, H100, "xla"),
        (
            "VAE mid-block (one head of 512) at 2048^2: 16 GiB",
            (1, 1, 65536, 65536, 512),
            BF16,
            H100,
            "chunked",
        ),
        ("VAE mid-block at 1024^2 on a CPU: scores 1 GiB", (1, 1, 16384, 16384, 512), BF16, None, "xla"),
        ("V100: no flash attention; scores 1.3 GB", (2, 10, 4096, 4096, 64), F16, V100, "chunked"),
        ("V100, 1024 tokens", (2, 10, 1024, 1024, 64), F16, V100, "xla"),
        ("CPU, tiny", (2, 2, 64, 64, 8), F32, None, "xla"),
        ("CPU, bf16 but no GPU", (2, 10, 4096, 4096, 64), BF16, None, "chunked"),
        ("CPU, scores exactly 1 GiB", (1, 1, 16384, 16384, 8), F32, None, "xla"),
        ("CPU, scores one key past 1 GiB", (1, 1, 16384, 16385, 8), F32, None, "chunked"),
    ],
)
def test_auto_decision_table(case, shape, dtype, capability, expected):
    from distrifusion_jax.nn.attention import choose_implementation

    assert choose_implementation(*shape, dtype, capability) == expected, case


def test_cuda_capability_is_none_off_nvidia_gpus():
    from distrifusion_jax.nn.attention import cuda_capability

    assert jax.default_backend() == "cpu" and cuda_capability() is None


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
