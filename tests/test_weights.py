"""Loading diffusers safetensors without torch, conversion, and clear errors for bad checkpoints."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import distrifusion_jax as dj
from distrifusion_jax import keymap
from distrifusion_jax.cli import main as cli_main
from helpers import SD1_TINY


def torch_params_as_flax(model, dtype=np.float32):
    """The torch state dict mapped through the rule table: the parameters load_unet must produce."""
    out = {}
    for key, value in model.state_dict().items():
        path, _, perm = keymap.torch_to_flax(key, tuple(value.shape))
        array = value.float().numpy()
        out[path] = (array.transpose(perm) if perm else array).astype(dtype)
    return out


def assert_params_equal(params, expected):
    flat = keymap.flatten(params)
    assert set(flat) == set(expected)
    for k, v in expected.items():
        assert flat[k].dtype == v.dtype, k
        np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)


def test_load_matches_torch_state_dict(tiny_unet_dir):
    folder, model = tiny_unet_dir("sdxl")
    _, params = dj.load_unet(folder)
    assert_params_equal(params, torch_params_as_flax(model))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_converted_folder_loads_identical_params(dtype, tiny_unet_dir, tmp_path):
    folder, _ = tiny_unet_dir("sdxl")
    assert cli_main(["convert", str(folder), str(tmp_path / "out"), "--dtype", dtype]) == 0
    assert (tmp_path / "out" / "flax_params.safetensors").is_file()
    unet_c, converted = dj.load_unet(tmp_path / "out", dtype=dtype)
    unet_s, direct = dj.load_unet(folder, dtype=dtype)
    assert unet_c.config == unet_s.config
    expected = {k: np.asarray(v) for k, v in keymap.flatten(direct).items()}
    assert_params_equal(converted, expected)


def test_convert_script_runs_as_documented(tiny_unet_dir, tmp_path):
    folder, _ = tiny_unet_dir("sd1")
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "convert" / "convert_sdxl.py"),
            str(folder),
            str(tmp_path / "c"),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stderr and "bfloat16" in r.stderr
    _, params = dj.load_unet(tmp_path / "c")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # loaded in the requested dtype


@pytest.mark.parametrize(
    "torch_dtype, variant, np_dtype",
    [(torch.float16, "fp16", np.float16), (torch.bfloat16, "bf16", ml_dtypes.bfloat16)],
)
def test_half_precision_variants_load(torch_dtype, variant, np_dtype, tiny_unet_dir, tmp_path):
    _, model = tiny_unet_dir("sd1")
    half = type(model).from_config(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch_dtype).save_pretrained(tmp_path, variant=variant)
    assert (tmp_path / f"diffusion_pytorch_model.{variant}.safetensors").is_file()
    _, params = dj.load_unet(tmp_path)  # no variant given: the one present is found
    expected = {k: v.astype(np_dtype).astype(np.float32) for k, v in torch_params_as_flax(model).items()}
    assert_params_equal(params, expected)
    _, params = dj.load_unet(tmp_path, dtype=np_dtype, variant=variant)
    assert all(p.dtype == np_dtype for p in jax.tree.leaves(params))


def test_sharded_checkpoint_loads(tiny_unet_dir, tmp_path):
    _, model = tiny_unet_dir("sd2")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, params = dj.load_unet(tmp_path)
    assert_params_equal(params, torch_params_as_flax(model))


def test_saved_diffusers_folder_loads_in_diffusers(tmp_path):
    """Our writer (used by the examples) produces a folder diffusers itself loads to the same weights."""
    from diffusers import UNet2DConditionModel as TorchUNet

    config = dj.UNetConfig.from_dict(SD1_TINY)
    params = dj.UNet2DConditionModel(config).init_params(seed=1)
    dj.save_unet_diffusers(tmp_path, config, params)
    model = TorchUNet.from_pretrained(tmp_path)
    assert_params_equal(params, torch_params_as_flax(model))


# ---- bad checkpoints ----
def test_truncated_file_is_a_clear_error(tiny_unet_dir, tmp_path):
    folder, _ = tiny_unet_dir("sd1")
    shutil.copytree(folder, tmp_path / "u")
    f = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(dj.CheckpointError, match="truncated or corrupt safetensors"):
        dj.load_unet(tmp_path / "u")


class _Trap:
    """Unpickling this object would create a marker file: proof that nothing is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoints_are_refused(tiny_unet_dir, tmp_path):
    folder, _ = tiny_unet_dir("sd1")
    marker = tmp_path / "unpickled"
    (tmp_path / "u").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "u")
    (tmp_path / "u" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(dj.CheckpointError, match="pickle checkpoints .* safetensors"):
        dj.load_unet(tmp_path / "u")
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(dj.CheckpointError, match="never unpickled"):
        dj.load_unet(tmp_path / "model.ckpt")
    assert not marker.exists()


def test_key_mismatches_are_listed(tiny_unet_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = tiny_unet_dir("sd1")
    shutil.copytree(folder, tmp_path / "u")
    f = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    del tensors["conv_in.bias"]
    tensors["extra_layer.weight"] = np.zeros((3, 3), np.float32)
    tensors["conv_out.bias"] = np.zeros((5,), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(dj.CheckpointError) as e:
        dj.load_unet(tmp_path / "u")
    msg = str(e.value)
    assert "1 missing [conv_in/bias]" in msg
    assert "1 unexpected [extra_layer/kernel]" in msg
    assert "1 shape mismatches [conv_out/bias: checkpoint (5,) vs model (4,)]" in msg


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(dj.CheckpointError, match="does not exist"):
        dj.load_unet(tmp_path / "nope")
    with pytest.raises(dj.CheckpointError, match="no config.json"):
        dj.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SD1_TINY))
    with pytest.raises(dj.CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        dj.load_unet(tmp_path)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distrifusion_jax",
            "convert",
            str(tmp_path / "missing"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: model folder")
