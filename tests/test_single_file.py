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
from distrifusion_jax.convert import convert, convert_pipeline, convert_single_file, convert_unet
from distrifusion_jax.errors import CheckpointError, ConfigError
from distrifusion_jax.models.presets import preset_dict
from distrifusion_jax.models.unet import UNetConfig
from distrifusion_jax.models.vae import VAEConfig
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.tools.random_pipeline import write_random_pipeline
from distrifusion_jax.weights import original_layout as layout
from distrifusion_jax.weights.clip import read_text_encoder_params
from distrifusion_jax.weights.single_file import (
    cached_pipeline,
    plan_header,
    plan_single_file,
    read_component,
)
from distrifusion_jax.weights.unet import read_unet_params
from distrifusion_jax.weights.vae import read_vae_params
from helpers import SD1_TINY, SD2_TINY

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
def tables(config: str, prefixes: dict) -> dict:
    out = {"unet": layout.Table(layout.unet_rules(UNetConfig.from_dict(preset_dict(config, "unet"))))}
    if "vae" in prefixes and config in ("tiny-sdxl", "sdxl-base-1.0"):
        out["vae"] = layout.Table(layout.vae_rules(VAEConfig.from_dict(preset_dict(config, "vae"))))
    out["text_encoder"] = layout.Table(
        layout.OPENCLIP_RULES if prefixes["text_encoder"].endswith(".model.") else layout.CLIP_RULES
    )
    out["text_encoder_2"] = layout.Table(layout.OPENCLIP_RULES)
    return out


def with_text_model_prefix(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without `text_model.`; the original files have it."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
        for k, v in state.items()
    }


def original_layout(states: dict, config: str, prefixes: dict) -> dict:
    """{original key: array} of diffusers / transformers state dicts, as the original code stores them (the
    VAE's attention projections as 1x1 convs, an unused position_ids buffer and the DDPM schedule beside)."""
    t, out = tables(config, prefixes), {}
    for name, state in states.items():
        state = with_text_model_prefix(state) if name.startswith("text") else state
        out.update(layout.original_state(t[name], state, prefixes[name]))
    for key in list(out):
        if ".mid.attn_1." in key and key.endswith("weight") and out[key].ndim == 2:
            out[key] = out[key][:, :, None, None]
    if "text_encoder" in states:
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
    state = original_layout(diffusers_states(tiny_diffusers), "tiny-sdxl", SDXL_PREFIXES)
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


# ---- SD 1.x / 2.x: the UNet ----
@pytest.mark.parametrize(
    "name, config, tiny", [("sd1", "parity-sd1", SD1_TINY), ("sd2", "parity-sd2", SD2_TINY)]
)
def test_sd_unet_equals_diffusers_single_file_conversion(tiny_unet_dir, tmp_path, name, config, tiny):
    folder, _ = tiny_unet_dir(name)
    prefixes = layout.LAYOUTS[name]
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    ckpt = original_layout({"unet": state}, config, prefixes)
    ckpt[prefixes["vae"] + "encoder.conv_in.weight"] = np.zeros(
        (8, 3, 3, 3), np.float32
    )  # skipped: not converted
    ckpt[prefixes["text_encoder"] + "token_embedding.weight"] = np.zeros((10, 8), np.float32)
    save_file(ckpt, str(tmp_path / "sd.safetensors"))
    if isinstance(tiny["layers_per_block"], int):  # diffusers' conversion takes no per-level layer counts
        ref = diffusers_single_file.convert_ldm_unet_checkpoint(torch_dict(ckpt), tiny)
        assert_equal_states({k: v.numpy() for k, v in ref.items()}, state)
    out = convert(tmp_path / "sd.safetensors", tmp_path / "unet", progress=False)
    direct = convert_unet(folder, tmp_path / "direct", progress=False)
    assert_equal_states(
        load_file(str(out / "flax_params.safetensors")), load_file(str(direct / "flax_params.safetensors"))
    )
    assert plan_single_file(tmp_path / "sd.safetensors").config_name == config
    with pytest.raises(CheckpointError, match="the pipeline runs SDXL only"):
        DistriSDXLPipeline.from_pretrained(tmp_path / "sd.safetensors", compilation_cache=tmp_path / "c")


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


def sdxl_base_header() -> dict:
    """{original key: (shape, "F16")} of SDXL base, from our abstract parameters mapped back through the tables."""
    from distrifusion_jax.models.clip import CLIPTextConfig, text_encoder_class
    from distrifusion_jax.models.unet import UNet2DConditionModel
    from distrifusion_jax.models.vae import AutoencoderKL

    t, header = tables("sdxl-base-1.0", SDXL_PREFIXES), {}
    models = {
        "unet": UNet2DConditionModel(UNetConfig.from_dict(preset_dict("sdxl-base-1.0", "unet"))),
        "vae": AutoencoderKL(VAEConfig.from_dict(preset_dict("sdxl-base-1.0", "vae"))),
    }
    for name in ("text_encoder", "text_encoder_2"):
        raw = preset_dict("sdxl-base-1.0", name)
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
            header[SDXL_PREFIXES[name] + original] = (fused.get(original, shape), "F16")
    return header


def test_sdxl_base_original_layout_maps_completely(tmp_path):
    header = sdxl_base_header()
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

    header = sdxl_base_header()
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
