"""Single-file SD / SDXL checkpoints in the original layout: mapped like diffusers' own single-file conversion,
converted into folders our loaders load, refused in one line when they are pickles, truncated or unmatched."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as diffusers_single_file
from safetensors.numpy import load_file, save_file

import distrifusion_jax as dj
from distrifusion_jax import keymap
from distrifusion_jax.cli import main as cli_main
from distrifusion_jax.convert import convert, convert_pipeline, convert_single_file
from distrifusion_jax.errors import CheckpointError, ConfigError, DistriFusionError
from distrifusion_jax.models.presets import preset_dict
from distrifusion_jax.models.unet import UNetConfig
from distrifusion_jax.models.vae import VAEConfig
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.schedulers import scheduler_from_config
from distrifusion_jax.tokenizer import load_tokenizer
from distrifusion_jax.tools.random_pipeline import write_random_pipeline
from distrifusion_jax.weights import original_layout as layout
from distrifusion_jax.weights.clip import read_text_encoder_params, text_encoder_key_map
from distrifusion_jax.weights.single_file import (
    SD_LAYOUTS,
    SDXL_LAYOUTS,
    cached_pipeline,
    derived_config,
    plan_header,
    plan_single_file,
    read_component,
)
from distrifusion_jax.weights.unet import read_unet_params
from distrifusion_jax.weights.vae import read_vae_params, vae_key_map
from helpers import perturbed

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
READERS = {
    "unet": lambda f: read_unet_params(f)[1],
    "vae": lambda f: read_vae_params(f)[1],
    "text_encoder": lambda f: read_text_encoder_params(f)[2],
    "text_encoder_2": lambda f: read_text_encoder_params(f)[2],
}
SDXL_PREFIXES = layout.LAYOUTS["sdxl"]
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}


# ---- writing the original layout from diffusers' state dicts (the inverse of our tables) ----
def bundled(config: str, names=MODELS) -> dict:
    return {name: preset_dict(config, name) for name in names}


def tables(configs: dict, layout_name: str) -> dict:
    """{model: its table} for {model: config dict} in a layout."""
    return {
        name: layout.Table(layout.component_rules(name, layout_name, raw)) for name, raw in configs.items()
    }


def with_text_model_prefix(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without `text_model.`; the original files have it."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
        for k, v in state.items()
    }


def original_layout(states: dict, configs: dict, layout_name: str) -> dict:
    """{original key: array} of diffusers / transformers state dicts (models of {model: config dict}), as the
    original code stores them (the VAE's attention projections as 1x1 convs, an unused position_ids buffer and
    the DDPM schedule beside)."""
    t, prefixes, out = tables(configs, layout_name), layout.LAYOUTS[layout_name], {}
    for name, state in states.items():
        state = with_text_model_prefix(state) if name.startswith("text") else state
        state = {k: v for k, v in state.items() if not keymap.is_ignored(k)}
        out.update(layout.original_state(t[name], state, prefixes[name]))
    for key in list(out):
        if ".mid.attn_1." in key and key.endswith("weight") and out[key].ndim == 2:
            out[key] = out[key][:, :, None, None]
    if "text_encoder" in states and layout_name != "sd2":
        out[prefixes["text_encoder"] + "text_model.embeddings.position_ids"] = np.arange(77)[None]
    out["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    return out


def diffusers_states(folder) -> dict:
    return {name: load_file(str(folder / name / WEIGHT_FILES[name])) for name in MODELS}


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0, fmt="diffusers")


@pytest.fixture(scope="module")
def original(tiny_diffusers, tmp_path_factory):
    """The tiny SDXL pipeline as one original-layout file (float32)."""
    state = original_layout(diffusers_states(tiny_diffusers), bundled("tiny-sdxl"), "sdxl")
    path = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    save_file(state, str(path))
    return path


def torch_dict(state: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def assert_equal_states(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


# ---- the test file is the original layout: diffusers' own single-file conversion reads it back ----
def test_diffusers_single_file_conversion_reads_the_test_file_back(tiny_diffusers, original):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    expected = diffusers_states(tiny_diffusers)
    ckpt = torch_dict(load_file(str(original)))
    unet = diffusers_single_file.convert_ldm_unet_checkpoint(ckpt, preset_dict("tiny-sdxl", "unet"))
    vae = diffusers_single_file.convert_ldm_vae_checkpoint(ckpt, preset_dict("tiny-sdxl", "vae"))
    clip = diffusers_single_file.convert_ldm_clip_checkpoint(ckpt)
    config_2 = CLIPTextConfig(**preset_dict("tiny-sdxl", "text_encoder_2"))
    with torch.device("meta"):
        model_2 = CLIPTextModelWithProjection(config_2)
    clip_2 = diffusers_single_file.convert_open_clip_checkpoint(
        model_2, ckpt, prefix=SDXL_PREFIXES["text_encoder_2"]
    )
    assert_equal_states({k: v.numpy() for k, v in unet.items()}, expected["unet"])
    assert_equal_states({k: v.numpy() for k, v in vae.items()}, expected["vae"])
    clip.pop("text_model.embeddings.position_ids")
    assert_equal_states(
        {k: v.numpy() for k, v in clip.items()}, with_text_model_prefix(expected["text_encoder"])
    )
    clip_2 = {k: v.numpy() for k, v in clip_2.items()}
    assert_equal_states(clip_2, with_text_model_prefix(expected["text_encoder_2"]))


# ---- our reading equals the diffusers-folder route ----
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_tensor_equals_the_diffusers_folder_route(tiny_diffusers, original, tmp_path, dtype):
    path = original
    if dtype != "float32":  # the same file stored in half precision
        np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
        path = tmp_path / f"tiny-{dtype}.safetensors"
        save_file({k: v.astype(np_dtype) for k, v in load_file(str(original)).items()}, str(path))
    sf = plan_single_file(path)
    assert (sf.layout, sf.config_name) == ("sdxl", "tiny-sdxl")  # detected from the keys and shapes
    assert {c.name: c.file_dtype for c in sf.components} == dict.fromkeys(MODELS, dtype)
    worst = {}
    for name in MODELS:
        got = read_component(sf, name, np.float32)
        expected = READERS[name](tiny_diffusers / name)
        rounded = {
            k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).astype(np.float32)
            for k, v in expected.items()
        }
        assert_equal_states(got, rounded)
        worst[name] = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    print(f"{dtype} file: max abs difference to the float32 folder route per component {worst}")


def test_convert_writes_the_pipeline_folder_convert_pipeline_writes(
    tiny_diffusers, original, tmp_path, capsys
):
    assert cli_main(["convert", str(original), str(tmp_path / "single"), "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "converted SDXL pipeline (tiny-sdxl): " in err and "bfloat16, vae float32" in err
    folder = convert_pipeline(tiny_diffusers, tmp_path / "folder", dtype="bfloat16", progress=False)
    for name in MODELS:
        a, b = (json.loads((f / name / "config.json").read_text()) for f in (tmp_path / "single", folder))
        assert {k: v for k, v in a.items() if k != "_distrifusion_jax"} == {
            k: v for k, v in b.items() if k != "_distrifusion_jax"
        }
        assert_equal_states(
            load_file(str(tmp_path / "single" / name / "flax_params.safetensors")),
            load_file(str(folder / name / "flax_params.safetensors")),
        )
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        for f in (folder / name).iterdir():
            assert (tmp_path / "single" / name / f.name).read_bytes() == f.read_bytes(), f
    index = json.loads((tmp_path / "single" / "model_index.json").read_text())
    assert (
        index["_distrifusion_jax"]["config"] == "tiny-sdxl"
        and index["_class_name"] == "StableDiffusionXLPipeline"
    )


@pytest.mark.slow
def test_from_pretrained_of_the_file_generates_the_folder_route_image(tiny_diffusers, original, tmp_path):
    kw = dict(num_inference_steps=3, guidance_scale=5.0, seed=0, output_type="np")
    config = dj.DistriConfig(64, 64, devices=1)
    cache = tmp_path / "cache"
    single = DistriSDXLPipeline.from_pretrained(original, config, dtype=np.float32, compilation_cache=cache)
    folder = DistriSDXLPipeline.from_pretrained(
        tiny_diffusers, config, dtype=np.float32, compilation_cache=cache
    )
    a, b = single("a red cube", **kw).images, folder("a red cube", **kw).images
    print(f"single file vs diffusers folder: max abs difference {float(np.abs(a - b).max())}")
    np.testing.assert_array_equal(a, b)
    converted = list((cache / "single-file").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-sdxl-")
    mtime = (converted[0] / "unet" / "flax_params.safetensors").stat().st_mtime_ns
    assert cached_pipeline(original, cache=cache) == converted[0]  # converted once, then reused
    assert (converted[0] / "unet" / "flax_params.safetensors").stat().st_mtime_ns == mtime


# ---- SD 1.x / 2.x: a whole Stable Diffusion pipeline folder ----
# Tiny files on UNet-only bundled configs: their VAE and text encoder configs are derived from the shapes.
SD_UNETS = {"sd1": "parity-sd1", "sd2": "parity-sd2"}
SD_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
)  # 64-wide heads
SD_VAE = dict(  # 32 GroupNorm groups, as published
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
)
SD_MODELS = ("unet", "vae", "text_encoder")
SD_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}


def sd_configs(name: str) -> dict:
    """{model: config dict} of the tiny SD 1.x / 2.x models: the published VAE and text encoder, smaller."""
    published = layout.DEFAULT_CONFIGS[name]
    return {
        "unet": preset_dict(SD_UNETS[name], "unet"),
        "vae": dict(preset_dict(published, "vae"), **SD_VAE),
        "text_encoder": dict(preset_dict(published, "text_encoder"), **SD_TEXT),
    }


def numpy_state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def sd_original(name: str, states: dict) -> dict:
    """The models' state dicts as an SD 1.x / 2.x single file; SD 2.x's OpenCLIP tower also holds its projection,
    a last layer the model skips (SD 2.x conditions on the penultimate layer) and its logit scale."""
    out = original_layout(states, sd_configs(name), name)
    if name == "sd2":
        prefix, rng, n = (
            layout.LAYOUTS["sd2"]["text_encoder"],
            np.random.default_rng(3),
            SD_TEXT["num_hidden_layers"],
        )
        for key in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{n - 1}.")]:
            extra = key.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")
            out[extra] = rng.standard_normal(out[key].shape).astype(np.float32)
        width = SD_TEXT["hidden_size"]
        out[prefix + "text_projection"] = rng.standard_normal((width, width)).astype(np.float32)
        out[prefix + "logit_scale"] = np.array(4.6, np.float32)
    return out


@pytest.fixture(scope="module")
def sd_file(tiny_unet_dir, tmp_path_factory):
    """name -> (tiny single file, {model: torch model}, its conversion by `convert`): built once per layout."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    cache = {}

    def get(name):
        if name not in cache:
            configs, folder = sd_configs(name), tmp_path_factory.mktemp(name)
            models = {
                "unet": tiny_unet_dir(name)[1],
                "vae": perturbed(lambda: AutoencoderKL.from_config(configs["vae"]), seed=1),
                "text_encoder": perturbed(
                    lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), seed=2
                ),
            }
            states = {k: numpy_state(m) for k, m in models.items()}
            save_file(sd_original(name, states), str(folder / f"tiny-{name}.safetensors"))
            converted = convert(folder / f"tiny-{name}.safetensors", folder / "converted", progress=False)
            cache[name] = (folder / f"tiny-{name}.safetensors", models, converted)
        return cache[name]

    return get


def diffusers_conversion(name: str, path, models: dict) -> dict:
    """{model: state dict} diffusers' single-file functions convert the file to (the UNet's where diffusers takes
    its config: an int layers_per_block), each checked to be the model the file was written from."""
    from transformers import CLIPTextModel

    ckpt, configs = torch_dict(load_file(str(path))), sd_configs(name)
    out = {"vae": diffusers_single_file.convert_ldm_vae_checkpoint(ckpt, configs["vae"])}
    if isinstance(configs["unet"]["layers_per_block"], int):
        out["unet"] = diffusers_single_file.convert_ldm_unet_checkpoint(ckpt, configs["unet"])
    if name == "sd1":
        out["text_encoder"] = diffusers_single_file.convert_ldm_clip_checkpoint(ckpt)
        out["text_encoder"].pop("text_model.embeddings.position_ids")
    else:
        with torch.device("meta"):
            meta = CLIPTextModel(models["text_encoder"].config)
        text = diffusers_single_file.convert_open_clip_checkpoint(meta, ckpt)
        # diffusers skips OpenCLIP ViT-H's layer 23 by name: at this size it passes the extra layer through
        extra = f"text_model.encoder.layers.{SD_TEXT['num_hidden_layers']}."
        assert any(k.startswith(extra) for k in text)
        out["text_encoder"] = {k: v for k, v in text.items() if not k.startswith(extra)}
    for model, state in out.items():
        expected = numpy_state(models[model])
        expected = with_text_model_prefix(expected) if model == "text_encoder" else expected
        assert_equal_states({k: v.numpy() for k, v in state.items()}, expected)
    return out


KEY_MAPS = {"unet": keymap.torch_to_flax, "vae": vae_key_map, "text_encoder": text_encoder_key_map}


def flax_params_of(model: str, state: dict) -> dict:
    """A diffusers / transformers state dict as our converted tensors ({Flax path: array})."""
    out = {}
    for key, value in state.items():
        path, shape, perm = KEY_MAPS[model](key, tuple(value.shape))
        value = value.numpy()
        out[path] = (value.transpose(perm) if perm else value).reshape(shape)
    return out


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sd_file_converts_to_a_pipeline_folder_with_diffusers_tensors(sd_file, tmp_path, capsys, name):
    path, models, converted = sd_file(name)
    reference = diffusers_conversion(name, path, models)
    reference.setdefault("unet", {k: torch.from_numpy(v) for k, v in numpy_state(models["unet"]).items()})
    worst = {}
    for model in SD_MODELS:
        got = load_file(str(converted / model / "flax_params.safetensors"))
        expected = flax_params_of(model, reference[model])
        assert_equal_states(got, expected)
        worst[model] = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        [*SD_MODELS, "tokenizer", "scheduler", "model_index.json"]
    )
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "text_encoder_2" not in index
    assert index["_distrifusion_jax"]["config"] == SD_UNETS[name]
    assert index["_distrifusion_jax"]["derived_configs"] == ["vae", "text_encoder"]
    text = json.loads((converted / "text_encoder" / "config.json").read_text())  # derived from the shapes
    assert {k: text[k] for k in SD_TEXT} == SD_TEXT and text["hidden_act"] == ("quick_gelu", "gelu")[
        name == "sd2"
    ]
    vae = json.loads((converted / "vae" / "config.json").read_text())
    assert {k: vae[k] for k in SD_VAE} == SD_VAE and vae["scaling_factor"] == 0.18215
    scheduler = scheduler_from_config(json.loads((converted / "scheduler/scheduler_config.json").read_text()))
    assert (scheduler.name, scheduler.prediction_type) == ("ddim", ("epsilon", "v_prediction")[name == "sd2"])
    tokenizer = load_tokenizer(converted / "tokenizer", vocab_size=text["vocab_size"])
    assert tokenizer.pad_token_id == (49407, 0)[name == "sd2"]  # OpenCLIP's pads with "!"
    # the command line: the summary names the pipeline; an SD 2.x file says how to choose epsilon prediction
    assert cli_main(["convert", str(path), str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert f"converted {SD_NAMES[name]} pipeline ({SD_UNETS[name]}): " in err
    assert ("--config / config='sd-2.1-base'" in err) == (name == "sd2")
    print(f"{name}: max abs difference to diffusers' conversion per model (float32) {worst}")


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sd_converted_text_encoder_and_vae_compute_like_transformers_and_diffusers(sd_file, name):
    import jax
    import jax.numpy as jnp

    from distrifusion_jax.weights.clip import load_text_encoder
    from distrifusion_jax.weights.vae import load_vae

    _, models, converted = sd_file(name)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, models["text_encoder"].config.vocab_size, size=(2, 77))
    text, params = load_text_encoder(converted / "text_encoder")
    ours = jax.jit(lambda p, i: text.apply({"params": p}, i))(params, jnp.asarray(ids)).last_hidden_state
    z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    vae, vae_params = load_vae(converted / "vae")
    image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(vae_params, z)
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
        ref_image = models["vae"].decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
    errs = {
        "last_hidden_state": float(np.abs(np.asarray(ours) - ref).max()),
        "decode": float(np.abs(np.asarray(image) - ref_image.transpose(0, 2, 3, 1)).max()),
    }
    print(f"{name}: max abs difference, float32: {errs}")
    assert errs["last_hidden_state"] <= 1e-5 and errs["decode"] <= 5e-5


def test_sd_file_cache_route_and_the_sdxl_pipeline_refusal(sd_file, tmp_path):
    path, _, converted = sd_file("sd1")
    with pytest.raises(
        CheckpointError, match="a Stable Diffusion 1.x checkpoint, which DistriSDPipeline loads"
    ):
        cached_pipeline(
            path, cache=tmp_path / "c", layouts=SDXL_LAYOUTS
        )  # from the header, before converting
    assert not (tmp_path / "c").exists()
    folder = cached_pipeline(path, cache=tmp_path / "c", layouts=SD_LAYOUTS)
    for model in SD_MODELS:
        assert_equal_states(
            load_file(str(folder / model / "flax_params.safetensors")),
            load_file(str(converted / model / "flax_params.safetensors")),
        )
    assert cached_pipeline(path, cache=tmp_path / "c") == folder  # converted once, then reused
    config = dj.DistriConfig(64, 64, devices=1)
    with pytest.raises(DistriFusionError, match="DistriSDPipeline") as refused:
        DistriSDXLPipeline.from_pretrained(path, config, compilation_cache=tmp_path / "c")
    assert "\n" not in str(refused.value)
    print(f"DistriSDXLPipeline.from_pretrained(SD 1.x file): {type(refused.value).__name__}: {refused.value}")


# ---- full size: sd_xl_base_1.0.safetensors's keys and shapes, abstractly ----
# a few keys and shapes of the published file, as its header lists them
SDXL_BASE_KEYS = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}
COUNTS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def full_size_header(config: str = "sdxl-base-1.0", layout_name: str = "sdxl") -> dict:
    """{original key: (shape, "F16")} of a published checkpoint, from our abstract parameters mapped back through
    the tables."""
    from distrifusion_jax.models.clip import CLIPTextConfig, text_encoder_class
    from distrifusion_jax.models.unet import UNet2DConditionModel
    from distrifusion_jax.models.vae import AutoencoderKL

    prefixes = layout.LAYOUTS[layout_name]
    t, header = tables(bundled(config, prefixes), layout_name), {}
    models = {
        "unet": UNet2DConditionModel(UNetConfig.from_dict(preset_dict(config, "unet"))),
        "vae": AutoencoderKL(VAEConfig.from_dict(preset_dict(config, "vae"))),
    }
    for name in prefixes.keys() - models.keys():
        raw = preset_dict(config, name)
        models[name] = text_encoder_class(raw)(CLIPTextConfig.from_dict(raw))
    for name, model in models.items():
        fused = {}
        for path, a in keymap.flatten(model.abstract_params()).items():
            key, shape, _ = keymap.flax_to_torch(path, tuple(a.shape))
            original, part, parts, transpose = t[name].to_original(key)
            shape = tuple(reversed(shape)) if transpose else shape
            if ".mid.attn_1." in original and len(shape) == 2:
                shape = shape + (1, 1)
            if parts > 1:
                fused[original] = (shape[0] * parts,) + shape[1:]
            header[prefixes[name] + original] = (fused.get(original, shape), "F16")
    return header


def test_sdxl_base_original_layout_maps_completely(tmp_path):
    header = full_size_header()
    for key, shape in SDXL_BASE_KEYS.items():
        assert header[key][0] == shape, key
    sf = plan_header(
        header, tmp_path / "sd_xl_base_1.0.safetensors"
    )  # raises if anything is missing or extra
    assert sf.config_name == "sdxl-base-1.0"
    for c in sf.components:
        assert sum(int(np.prod(shape)) for *_, shape in c.plan.values()) == COUNTS[c.name]
    assert len(header) == len({key for c in sf.components for key, *_ in c.plan.values()})


def test_sdxl_base_original_layout_is_what_diffusers_reads():
    """diffusers' own conversion of the same header (meta tensors) gives its SDXL models' keys and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    header = full_size_header()
    with torch.device("meta"):
        ckpt = {k: torch.empty(shape) for k, (shape, _) in header.items()}
        unet = UNet2DConditionModel.from_config(preset_dict("sdxl-base-1.0", "unet"))
        vae = AutoencoderKL.from_config(preset_dict("sdxl-base-1.0", "vae"))
    for model, convert_fn, config in (
        (unet, diffusers_single_file.convert_ldm_unet_checkpoint, preset_dict("sdxl-base-1.0", "unet")),
        (vae, diffusers_single_file.convert_ldm_vae_checkpoint, preset_dict("sdxl-base-1.0", "vae")),
    ):
        converted = {k: tuple(v.shape) for k, v in convert_fn(ckpt, config).items()}
        assert converted == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_a_derived_text_encoder_needs_64_wide_heads(sd_file, tmp_path):
    header = {k: (tuple(v.shape), "F32") for k, v in load_file(str(sd_file("sd1")[0])).items()}
    prefix = layout.LAYOUTS["sd1"]["text_encoder"]
    header[prefix + "text_model.embeddings.token_embedding.weight"] = ((49408, 96), "F32")
    with pytest.raises(CheckpointError, match="a text encoder 96 wide, so its head count cannot be derived"):
        plan_header(header, tmp_path / "sd.safetensors", "parity-sd1")


# the published SD models' parameters (diffusers / transformers modules on the meta device count the same)
SD_COUNTS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sd_published_layouts_map_completely_and_give_back_their_bundled_configs(tmp_path, name):
    """v1-5-pruned / v2-1_768 layouts, abstractly: every key maps, and the VAE and text encoder configs derived
    from the shapes are the bundled (published) ones."""
    config = layout.DEFAULT_CONFIGS[name]
    header, skipped = full_size_header(config, name), set()
    if name == "sd2":  # what the file holds beyond diffusers' model: ViT-H's 24th layer, the projection, ...
        prefix = layout.LAYOUTS["sd2"]["text_encoder"]
        for key in [k for k in header if ".resblocks.22." in k]:
            header[key.replace(".resblocks.22.", ".resblocks.23.")] = header[key]
            skipped.add(key.replace(".resblocks.22.", ".resblocks.23."))
        header[prefix + "text_projection"], header[prefix + "logit_scale"] = (
            ((1024, 1024), "F16"),
            ((), "F16"),
        )
        skipped |= {prefix + "text_projection"}
    for model in ("vae", "text_encoder"):
        assert derived_config(model, name, header, tmp_path) == preset_dict(config, model)
    sf = plan_header(header, tmp_path / f"{name}.safetensors")  # raises if anything is missing or extra
    assert sf.config_name == config and not any(c.derived for c in sf.components)
    counts = {c.name: sum(int(np.prod(shape)) for *_, shape in c.plan.values()) for c in sf.components}
    assert counts == SD_COUNTS[name]
    mapped = {key for c in sf.components for key, *_ in c.plan.values()}
    assert set(header) - mapped == skipped | ({prefix + "logit_scale"} if name == "sd2" else set())
    prediction = preset_dict(sf.files_config, "scheduler", "scheduler_config.json")["prediction_type"]
    assert prediction == ("epsilon", "v_prediction")[name == "sd2"]
    if name == "sd2":  # the base model (512, epsilon): the same shapes, so named (--config), not detected
        for model, differ in (("unet", {"sample_size", "upcast_attention"}), ("vae", {"sample_size"})):
            base, v = (
                {k: x for k, x in preset_dict(c, model).items() if k not in differ}
                for c in ("sd-2.1-base", config)
            )
            assert base == v, model
        assert preset_dict("sd-2.1-base", "text_encoder") == preset_dict(config, "text_encoder")
        assert (
            preset_dict("sd-2.1-base", "scheduler", "scheduler_config.json")["prediction_type"] == "epsilon"
        )


# ---- refused in one line, before any tensor is read ----
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_pickles_are_never_unpickled(tmp_path, capsys):
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "model.ckpt")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.ckpt").read_bytes())  # renamed
    for name in ("model.ckpt", "model.safetensors"):
        assert cli_main(["convert", str(tmp_path / name), str(tmp_path / "out")]) == 2
        assert "pickle" in one_line_error(capsys)
        with pytest.raises(CheckpointError, match="pickle"):
            DistriSDXLPipeline.from_pretrained(tmp_path / name, compilation_cache=tmp_path / "c")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_unmatched_keys_are_listed_in_one_line(original, tmp_path, capsys):
    state = load_file(str(original))
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = np.zeros(3, np.float32)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "extra.safetensors"))
    assert (
        cli_main(
            ["convert", str(tmp_path / "extra.safetensors"), str(tmp_path / "out"), "--config", "tiny-sdxl"]
        )
        == 2
    )
    err = one_line_error(capsys)
    assert "2 key(s) match no parameter of the SDXL layout with config tiny-sdxl" in err
    assert "input_blocks.1.0.extra.weight" in err and "cond_stage_model.transformer" in err
    assert not (tmp_path / "out").exists()


def test_missing_truncated_and_foreign_files(original, tmp_path):
    state = load_file(str(original))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \[conv_out/bias\]"):
        plan_single_file(tmp_path / "missing.safetensors", "tiny-sdxl")
    (tmp_path / "cut.safetensors").write_bytes(original.read_bytes()[: os.path.getsize(original) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        plan_single_file(tmp_path / "cut.safetensors")
    save_file({"lora_unet_down.weight": np.zeros(2, np.float32)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="no model.diffusion_model.* keys: a LoRA"):
        convert(tmp_path / "lora.safetensors", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="does not match the model config"):
        plan_single_file(original, "sdxl-base-1.0")  # the tiny file against the published config
    with pytest.raises(ConfigError, match="not a bundled config"):
        plan_single_file(original, "sdxl-turbo")
    with pytest.raises(ConfigError, match="applies to single-file checkpoints"):
        convert(original.parent, tmp_path / "out", config="tiny-sdxl")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "absent.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert convert_single_file(original, tmp_path / "out", progress=False) == tmp_path / "out"


def test_single_file_config_names_the_bundled_config(sd_file, tiny_diffusers, tmp_path):
    """from_pretrained's / generate's `single_file_config` reaches the conversion (a config the file's shapes do
    not fit is one line naming it) and is refused, in one line, for anything but a single file."""
    from distrifusion_jax.preflight import resolve_model_path

    path, _, converted = sd_file("sd1")
    folder = resolve_model_path(path, tmp_path / "c", single_file_config="parity-sd1")
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] in (12, [12] * 4)
    with pytest.raises(CheckpointError, match="config sd-2.1-base") as wrong:
        resolve_model_path(path, tmp_path / "c", single_file_config="sd-2.1-base")
    assert "\n" not in str(wrong.value)
    with pytest.raises(ConfigError, match="applies to single-file checkpoints .* only"):
        DistriSDXLPipeline.from_pretrained(tiny_diffusers, single_file_config="sdxl-base-1.0")
