"""Our Flax AutoencoderKL equals diffusers' PyTorch one; its loader, converter and errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import distrifusion_jax as dj
from distrifusion_jax import keymap
from distrifusion_jax.convert import convert_vae
from distrifusion_jax.models.presets import sdxl_vae_config
from distrifusion_jax.models.vae import AutoencoderKL, VAEConfig
from distrifusion_jax.weights.vae import load_vae
from helpers import assert_full_size_mapping, perturbed, rel_l2

TOL = 1e-5  # float32 relative L2; reached: about 2e-7 to 6e-7 on these configs

_BASE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "act_fn": "silu",
}
TINY_VAES = {
    # two levels, one resnet per encoder block
    "two_level": dict(
        _BASE,
        block_out_channels=[8, 16],
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    ),
    # three levels (two downsamplers), two resnets per encoder block, three per decoder block
    "three_level": dict(
        _BASE,
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    ),
    # no mid-block attention, no (post_)quant_conv, mish in the resnets (conv_act stays SiLU)
    "bare": dict(
        _BASE,
        block_out_channels=[8, 16],
        layers_per_block=1,
        act_fn="mish",
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    ),
}
LATENT = (2, 5, 7, 4)  # batch 2, non-square, odd
IMAGE = (2, 18, 30, 3)  # non-square; with two downsamplers an odd size (9) is halved


def torch_vae(config: dict, seed: int = 0):
    """A diffusers AutoencoderKL with every parameter moved away from its initial value (float32, eval)."""
    from diffusers import AutoencoderKL as TorchVAE

    return perturbed(lambda: TorchVAE.from_config(config), seed)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """name -> (diffusers folder written by save_pretrained, the torch model)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = torch_vae(TINY_VAES[name])
            folder = tmp_path_factory.mktemp(f"vae_{name}")
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.float().numpy().transpose(0, 2, 3, 1)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(LATENT).astype(np.float32), rng.uniform(-1, 1, IMAGE).astype(np.float32)


def decode(vae, params, z):
    return jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, z)


def encode(vae, params, x):
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)


# ---- parity with diffusers ----
@pytest.mark.parametrize("name", list(TINY_VAES))
def test_parity_float32(name, tiny_vae_dir):
    folder, model = tiny_vae_dir(name)
    z, x = inputs()
    with torch.no_grad():
        ref_image = nhwc(model.decode(nchw(z)).sample)
        dist = model.encode(nchw(x)).latent_dist
    vae, params = load_vae(folder)
    image = np.asarray(decode(vae, params, z))
    mean, logvar = (np.asarray(a) for a in encode(vae, params, x))
    errs = {
        "decode": rel_l2(image, ref_image),
        "mean": rel_l2(mean, nhwc(dist.mean)),
        "logvar": rel_l2(logvar, nhwc(dist.logvar)),
    }
    print(f"{name}: float32 relative L2 " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert image.shape == ref_image.shape and mean.shape == logvar.shape == nhwc(dist.mean).shape
    assert max(errs.values()) <= TOL
    assert rel_l2(image[0], image[1]) > 0.1  # the two samples differ, so a batch mix-up would show


def test_bfloat16_decode_close(tiny_vae_dir):
    folder, model = tiny_vae_dir("three_level")
    z, _ = inputs(1)
    with torch.no_grad():
        ref = nhwc(model.decode(nchw(z)).sample)
    vae, params = load_vae(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    image = decode(vae, params, z)
    assert image.dtype == jnp.bfloat16
    err = rel_l2(np.asarray(image.astype(jnp.float32)), ref)
    print(f"bfloat16: decode relative L2 vs float32 reference {err:.2e}")
    assert err < 3e-2


def test_scaling_factor_and_init(tiny_vae_dir):
    folder, _ = tiny_vae_dir("two_level")
    vae, params = load_vae(folder)
    assert vae.scaling_factor == vae.config.scaling_factor == 0.18215  # diffusers' default
    assert sdxl_vae_config().scaling_factor == 0.13025 and sdxl_vae_config().force_upcast
    random = vae.init_params(seed=3)
    assert jax.tree.map(jnp.shape, random) == jax.tree.map(jnp.shape, params)
    image = jax.eval_shape(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), random, inputs()[0])
    assert image.shape == (2, 10, 14, 3)


# ---- full size ----
def test_sdxl_full_size_keys_and_shapes():
    from diffusers import AutoencoderKL as TorchVAE

    config = sdxl_vae_config()
    with torch.device("meta"):
        reference = TorchVAE.from_config(config.to_dict())
    ours = assert_full_size_mapping(reference, AutoencoderKL(config).abstract_params(), 83_653_863)
    for path in (
        "encoder/down_blocks_0/resnets_0/conv1/kernel",
        "encoder/mid_block/attentions_0/to_q/kernel",
        "encoder/mid_block/attentions_0/group_norm/scale",
        "decoder/up_blocks_0/upsamplers_0/conv/kernel",
        "quant_conv/kernel",
        "post_quant_conv/kernel",
        "encoder/conv_norm_out/scale",
    ):
        assert path in ours


def test_sdxl_full_size_decode_shape():
    """Abstract decode of a 128x128 latent (1024x1024 image), batch 2, no memory used."""
    vae = AutoencoderKL(sdxl_vae_config(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), vae.abstract_params())
    out = jax.eval_shape(
        lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
        params,
        jax.ShapeDtypeStruct((2, 128, 128, 4), jnp.float32),
    )
    assert out.shape == (2, 1024, 1024, 3) and out.dtype == jnp.bfloat16


# ---- loading and conversion ----
def flat_numpy(params):
    return {k: np.asarray(v) for k, v in keymap.flatten(params).items()}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converter_round_trip(dtype, tiny_vae_dir, tmp_path):
    folder, _ = tiny_vae_dir("three_level")
    out = convert_vae(folder, tmp_path / "c", dtype=dtype, progress=False)
    assert (out / "flax_params.safetensors").is_file()
    meta = json.loads((out / "config.json").read_text())
    assert meta["_class_name"] == "AutoencoderKL" and meta["_distrifusion_jax"]["dtype"] == dtype
    vae_c, converted = load_vae(out, dtype=dtype)
    vae_s, direct = load_vae(folder, dtype=dtype)
    assert vae_c.config == vae_s.config
    assert_same(flat_numpy(converted), flat_numpy(direct))


def test_old_format_attention_keys_load(tiny_vae_dir, tmp_path):
    """query/key/value/proj_attn names, as linear weights (encoder) or 1x1 convs (decoder), load the same."""
    folder, _ = tiny_vae_dir("two_level")
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    f = old / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for key, value in load_file(str(f)).items():
        for new, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{name}.")
                if key.startswith("decoder") and value.ndim == 2:
                    value = value[:, :, None, None]
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.query.weight" in renamed
    save_file(renamed, str(f))
    assert_same(flat_numpy(load_vae(old)[1]), flat_numpy(load_vae(folder)[1]))


def test_sharded_and_variant_checkpoints_load(tiny_vae_dir, tmp_path):
    folder, model = tiny_vae_dir("two_level")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert_same(flat_numpy(load_vae(tmp_path / "sharded")[1]), flat_numpy(load_vae(folder)[1]))
    half = type(model).from_config(model.config)  # a copy: the shared fixture model stays float32
    half.load_state_dict(model.state_dict())
    half.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    _, params = load_vae(tmp_path / "fp16")
    direct = flat_numpy(load_vae(folder, dtype=jnp.float16)[1])
    assert_same(flat_numpy(params), {k: v.astype(np.float32) for k, v in direct.items()})


# ---- bad inputs: one-line errors naming the fix ----
def one_line(excinfo):
    return "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "down_block_types entry 'AttnDownEncoderBlock2D': supported 'DownEncoderBlock2D'",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types=.* one entry per level"),
        ({"norm_type": "spatial"}, "unknown VAE config field.* norm_type"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name='AutoencoderTiny'"),
        ({"act_fn": "relu"}, "act_fn='relu'"),
        ({"norm_num_groups": 3}, "not divisible by norm_num_groups=3"),
        ({"latents_mean": [0.1, 0.2]}, "latents_mean=.* latent_channels=4"),
    ],
)
def test_bad_config_is_a_clear_error(change, match):
    with pytest.raises(dj.ConfigError, match=match) as e:
        VAEConfig.from_dict(dict(TINY_VAES["two_level"], **change))
    assert one_line(e)


def test_bad_config_file_is_rejected_by_the_loader(tiny_vae_dir, tmp_path):
    folder, _ = tiny_vae_dir("two_level")
    shutil.copytree(folder, tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cfg["down_block_types"] = ["DownBlock2D", "DownEncoderBlock2D"]
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dj.ConfigError, match="down_block_types entry 'DownBlock2D'") as e:
        load_vae(tmp_path / "v")
    assert one_line(e)


def test_truncated_file_is_a_clear_error(tiny_vae_dir, tmp_path):
    folder, _ = tiny_vae_dir("two_level")
    shutil.copytree(folder, tmp_path / "v")
    f = tmp_path / "v" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(dj.CheckpointError, match="truncated or corrupt safetensors") as e:
        load_vae(tmp_path / "v")
    assert one_line(e)


def test_wrong_folder_and_inputs(tiny_vae_dir, tmp_path):
    with pytest.raises(dj.CheckpointError, match="no config.json; pass a diffusers VAE folder") as e:
        load_vae(tmp_path)
    assert one_line(e)
    folder, _ = tiny_vae_dir("two_level")
    vae, params = load_vae(folder)
    with pytest.raises(
        dj.DistriFusionError, match=r"decode: latent has shape \(1, 4, 5, 6\).* \[B, H, W, 4\]"
    ):
        vae.apply({"params": params}, jnp.zeros((1, 4, 5, 6)), method=vae.decode)
    with pytest.raises(dj.DistriFusionError, match=r"encode: image has shape \(1, 3, 8, 8\)"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), method=vae.encode)


def test_row_sharded_synchronous_equals_one_device(tiny_vae_dir):
    """Built from the leaf layers, the VAE runs row-sharded under a synchronous PatchPlan (conv halos,
    GroupNorm statistics and attention K/V exchanged) and gives the single-device result, including the
    encoder's bottom-only downsampling padding."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from distrifusion_jax.parallel import PATCH, PatchPlan

    folder, _ = tiny_vae_dir("three_level")
    vae, params = load_vae(folder)
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((2, 8, 6, 4)), jnp.float32)  # 2 latent rows per band
    x = jnp.asarray(rng.uniform(-1, 1, (2, 64, 24, 3)), jnp.float32)  # 4 rows per band at the lowest level
    banded = vae.clone(parallel=PatchPlan("sync"))

    def body(p, z, x):
        image, _ = banded.apply({"params": p}, z, method=banded.decode, mutable=["stale"])
        moments, _ = banded.apply({"params": p}, x, method=banded.encode, mutable=["stale"])
        return image, moments

    rows = P(None, PATCH)
    mesh = Mesh(np.array(jax.devices()[:4]), (PATCH,))
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), rows, rows), out_specs=(rows, (rows, rows))))
    image, (mean, logvar) = run(params, z, x)
    ref_mean, ref_logvar = encode(vae, params, x)
    errs = [rel_l2(image, decode(vae, params, z)), rel_l2(mean, ref_mean), rel_l2(logvar, ref_logvar)]
    print("row-sharded on 4 devices vs one: decode {:.1e}, mean {:.1e}, logvar {:.1e}".format(*errs))
    assert max(errs) <= TOL
