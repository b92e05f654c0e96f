"""from_pretrained checks everything that needs no weight before reading one (each a one-line error)."""

import json
import re
import shutil
from importlib import resources

import jax
import pytest

import distrifusion_jax as dj
from distrifusion_jax.preflight import check_steps
from distrifusion_jax.schedulers import make_scheduler
from distrifusion_jax.tools.random_pipeline import write_random_pipeline
from distrifusion_jax.weights import pipeline_weights


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """The tiny pipeline's folder without its weights: nothing here reads them."""
    folder = write_random_pipeline(tmp_path_factory.mktemp("tiny"), seed=0)
    for f in folder.glob("*/*.safetensors"):
        f.unlink()
    return folder


class Loading(Exception):
    """Raised in place of reading the first weight: every check passed."""


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    def stop(*args, **kwargs):
        raise Loading

    for name in ("load_unet", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(pipeline_weights, name, stop)


def load(path, config=None, **kwargs):
    return dj.DistriSDXLPipeline.from_pretrained(
        path, config, compilation_cache=kwargs.pop("cache", "off"), **kwargs
    )


CASES = [
    (dict(config={}), dj.ConfigError, "distri_config={} is a dict, not a DistriConfig: pass DistriConfig("),
    (
        dict(config=dj.DistriConfig(64, 64, devices=3)),
        dj.ConfigError,
        "the CFG split needs an even number of devices",
    ),
    (
        dict(config=dj.DistriConfig(64, 64, devices=1), decode_tile_rows=3),
        dj.ConfigError,
        "decode_tile_rows=3: tiles need at least 16 latent rows",
    ),
    (
        dict(config=dj.DistriConfig(64, 64, devices=2), decode_tile_rows=16),
        dj.ConfigError,
        "decode_tile_rows=16 would be ignored: the VAE decode is row-sharded over 2 devices",
    ),
    (
        dict(config=dj.DistriConfig(64, 64, devices=1), attention_impl="cudnn"),
        dj.ConfigError,
        "attention_impl='cudnn' needs an NVIDIA GPU (cuDNN) but this run is on cpu",
    ),
    (
        dict(config=dj.DistriConfig(64, 64, devices=1), vae_attention_impl="cudnn"),
        dj.ConfigError,
        "vae_attention_impl='cudnn' needs an NVIDIA GPU",
    ),
    (
        dict(config=dj.DistriConfig(64, 64, devices=1), scheduler="heun"),
        dj.ConfigError,
        "unknown scheduler 'heun'",
    ),
    (dict(config=dj.DistriConfig(64, 64, devices=16)), dj.ConfigError, "devices=16 but JAX sees 8"),
]


@pytest.mark.parametrize("kwargs, error, message", CASES, ids=[m[:40] for _, _, m in CASES])
def test_bad_arguments_fail_before_loading(tiny_pipeline, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        load(tiny_pipeline, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(
            config=dj.DistriConfig(96, 64, devices=3)
        ),  # guidance_scale <= 1 runs 1x3: known only at the call
        dict(config=dj.DistriConfig(64, 64, devices=2), decode_tile_rows=16, parallel_decode=False),
        dict(config=dj.DistriConfig(96, 64, devices=1), decode_tile_rows=16),  # one device: decoded in tiles
        dict(config=None),
    ],
)
def test_good_arguments_reach_the_weights(tiny_pipeline, kwargs):
    with pytest.raises(Loading):
        load(tiny_pipeline, **kwargs)


def test_compilation_cache_that_is_a_file(tiny_pipeline, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(
        dj.ConfigError,
        match=re.escape(
            f"compilation cache {tmp_path / 'f'} is a file, not a folder; pass a writable folder or 'off'"
        ),
    ):
        load(tiny_pipeline, cache=tmp_path / "f")
    with pytest.raises(dj.ConfigError, match=re.escape(f"{tmp_path / 'f'} is a file, not a folder")):
        load(tiny_pipeline, cache=tmp_path / "f" / "sub")


@pytest.mark.parametrize(
    "rel, text, error, message",
    [
        ("model_index.json", "{", dj.ConfigError, "model_index.json: not valid JSON"),
        ("vae/config.json", "", dj.ConfigError, "vae/config.json: not valid JSON"),
        ("scheduler/scheduler_config.json", "[", dj.ConfigError, "scheduler_config.json: not valid JSON"),
        (
            "unet/config.json",
            None,
            dj.CheckpointError,
            "no unet/config.json; this is not a complete SDXL pipeline",
        ),
        ("vae/config.json", None, dj.CheckpointError, "no vae/config.json"),
    ],
)
def test_broken_folder(tiny_pipeline, tmp_path, rel, text, error, message):
    model = shutil.copytree(tiny_pipeline, tmp_path / "model")
    if text is None:
        (model / rel).unlink()
    else:
        (model / rel).write_text(text)
    with pytest.raises(error, match=re.escape(message)) as e:
        load(model, dj.DistriConfig(64, 64, devices=1))
    assert "\n" not in str(e.value)


def test_platform_that_cannot_start(tiny_pipeline, monkeypatch):
    def no_tpu(*args):
        raise RuntimeError(
            "Unable to initialize backend 'tpu': no TPU (set JAX_PLATFORMS='' to automatically "
            "choose an available backend)"
        )

    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setattr(jax, "devices", no_tpu)
    with pytest.raises(
        dj.ConfigError,
        match=re.escape(
            "JAX_PLATFORMS=tpu: JAX cannot start 'tpu' (Unable to "
            "initialize backend 'tpu': no TPU); unset JAX_PLATFORMS"
        ),
    ):
        load(tiny_pipeline)


def sdxl_scheduler(name):
    path = resources.files("distrifusion_jax").joinpath(
        "configs", "sdxl-base-1.0", "scheduler", "scheduler_config.json"
    )
    return make_scheduler(name, json.loads(path.read_text()))


@pytest.mark.parametrize("name, most", [("euler", 1000), ("ddim", 999), ("dpm-solver", 999)])
def test_step_limit_per_scheduler(name, most):
    """SDXL's config ("leading", steps_offset 1): DDIM would index timestep 1000, DPM-Solver repeat one."""
    sched = sdxl_scheduler(name)
    check_steps(sched, most)
    with pytest.raises(
        dj.ConfigError,
        match=f"num_inference_steps={most + 1}: the {name} scheduler .* takes at most "
        f"{most} steps; use {most} or fewer",
    ):
        check_steps(sched, most + 1)


@pytest.mark.parametrize("config, kind", [("sd-1.5", "a Stable Diffusion"), ("sdxl-base-1.0", "an SDXL")])
def test_missing_component_folder_names_the_pipeline_kind(tmp_path, config, kind):
    """A config-only folder (no vae/) of each family: one CheckpointError naming the folder and the kind."""
    from distrifusion_jax.errors import CheckpointError
    from distrifusion_jax.preflight import read_model

    shutil.copytree(resources.files("distrifusion_jax").joinpath("configs", config), tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "vae")
    with pytest.raises(CheckpointError, match=f"missing component folder\\(s\\) vae.* of {kind} pipeline;"):
        read_model(tmp_path / "m")
