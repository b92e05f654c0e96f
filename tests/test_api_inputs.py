"""DistriSDXLPipeline.__call__ at the API boundary: bad arguments fail in one line before any encoding or
compiling, NaN/inf results are never returned, and a device out of memory is one line naming the fixes."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrifusion_jax as dj
from distrifusion_jax.arguments import prng_key
from distrifusion_jax.decode import Decoder
from distrifusion_jax.denoise import Denoiser
from distrifusion_jax.errors import OutOfMemoryError
from distrifusion_jax.pipeline import DistriSDXLPipeline
from distrifusion_jax.schedulers import EulerScheduler
from distrifusion_jax.tools.random_pipeline import write_random_pipeline

SIZE = 64  # pixels: 8x8 latents
NAN = float("nan")
OK_LATENTS = np.zeros((1, 4, 8, 8), np.float32)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = write_random_pipeline(tmp_path_factory.mktemp("tiny_api"), seed=0)
    return DistriSDXLPipeline.from_pretrained(
        folder,
        dj.DistriConfig(height=SIZE, width=SIZE, devices=1),
        dtype=jnp.float32,
        compilation_cache="off",
    )


def _refuse(*args, **kwargs):
    raise AssertionError("an argument check must fail before any text encoding, compiling or decoding")


C, NF = dj.ConfigError, dj.NonFiniteError
BAD_CALLS = [  # (keyword arguments of pipe(...), error class, message fragment)
    (dict(prompt=[]), C, "prompt=[] is not supported: pass a str or a non-empty list of str"),
    (dict(prompt=123), C, "prompt=123 is not supported: pass a str or a non-empty list of str"),
    (dict(prompt=["a", 3]), C, "prompt=['a', 3] is not supported"),
    (dict(prompt=None), C, "prompt=None is not supported"),
    (
        dict(prompt_2=["a", "b"]),
        C,
        "prompt_2 has 2 entries for a batch of 1 prompts: pass one prompt_2 or one",
    ),
    (dict(negative_prompt=5), C, "negative_prompt=5 is not supported"),
    (
        dict(prompt=["x", "y"], negative_prompt_2=["a", "b", "c"]),
        C,
        "negative_prompt_2 has 3 entries for a batch of 2",
    ),
    (dict(num_images_per_prompt=0), C, "num_images_per_prompt=0 is not supported: pass an int >= 1"),
    (dict(num_images_per_prompt=-1), C, "num_images_per_prompt=-1 is not supported: pass an int >= 1"),
    (dict(num_images_per_prompt=1.5), C, "num_images_per_prompt=1.5 is not supported"),
    (dict(num_images_per_prompt=True), C, "num_images_per_prompt=True is not supported"),
    (dict(seed=1.5), C, "seed=1.5 is not supported: pass an int in [0, 2**63)"),
    (dict(seed=None), C, "seed=None is not supported: pass an int in [0, 2**63)"),
    (dict(seed=2**63), C, "seed=9223372036854775808 is not supported: pass an int in [0, 2**63)"),
    (dict(seed=-1), C, "seed=-1 is not supported"),
    (dict(seed=True), C, "seed=True is not supported"),
    (dict(num_inference_steps=0), C, "num_inference_steps=0 must be an int in [1, num_train_timesteps=1000]"),
    (dict(num_inference_steps=2.0), C, "num_inference_steps=2.0 must be an int"),
    (dict(num_inference_steps=1001), C, "num_inference_steps=1001 must be an int in [1"),
    (
        dict(num_inference_steps=1000, scheduler="ddim"),
        C,
        "num_inference_steps=1000 does not fit the ddim scheduler's config (timestep_spacing='leading', steps_offset=1",
    ),
    (dict(num_inference_steps=1000, scheduler="dpm-solver"), C, "its 1000 timesteps repeat (1 distinct)"),
    (
        dict(guidance_scale=float("inf")),
        C,
        "guidance_scale=inf is not supported: pass a finite number (e.g. 5.0",
    ),
    (dict(guidance_scale=NAN), C, "guidance_scale=nan is not supported"),
    (dict(guidance_scale="5"), C, "guidance_scale='5' is not supported: pass a number"),
    (dict(guidance_scale=np.ones((3, 3))), C, "guidance_scale=array([[1., 1., 1."),  # repr cut, on one line
    (dict(guidance_rescale=NAN), C, "guidance_rescale=nan is not supported: pass a number in [0, 1]"),
    (dict(guidance_rescale=1.5), C, "guidance_rescale=1.5 is not supported: pass a number in [0, 1]"),
    (
        dict(latents=np.where(np.arange(256).reshape(1, 4, 8, 8) == 5, NAN, 0.0)),
        NF,
        "latents hold 1 NaN/inf value(s) of 256: pass finite noise",
    ),
    (
        dict(latents=np.zeros((1, 8, 8, 4))),
        C,
        "latents have shape (1, 8, 8, 4); expected (1, 4, 8, 8) for 1 image(s) of 64x64 (these look NHWC",
    ),
    (dict(latents=np.zeros((2, 4, 8, 8))), C, "latents have shape (2, 4, 8, 8); expected (1, 4, 8, 8)"),
    (dict(latents="noise"), C, "latents of type str are not supported"),
    (dict(original_size=(64,)), C, "original_size=(64,) is not supported: pass a pair of finite numbers"),
    (dict(target_size=(64, float("inf"))), C, "target_size=(64, inf) is not supported"),
    (dict(crops_coords_top_left=None), C, "crops_coords_top_left=None is not supported"),
    (dict(output_type="jpeg"), C, "unknown output_type 'jpeg'"),
    (dict(scheduler="heun"), C, "unknown scheduler 'heun'"),
    (dict(progress=5), C, "progress=5 is not callable"),
]


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    BAD_CALLS,
    ids=["-".join(f"{k}={str(v)[:12]}" for k, v in kw.items()) for kw, _, _ in BAD_CALLS],
)
def test_bad_call_is_one_line_before_any_work(pipe, monkeypatch, kwargs, error, fragment):
    monkeypatch.setattr(pipe, "prompt_encoder", _refuse)
    monkeypatch.setattr(pipe, "decoder", _refuse)
    monkeypatch.setattr(Denoiser, "_executable", _refuse)
    kwargs = {"prompt": "a cube", "num_inference_steps": 2, **kwargs}
    with pytest.raises(error) as e:
        pipe(kwargs.pop("prompt"), **kwargs)
    message = str(e.value)
    assert fragment in message
    assert "\n" not in message and e.value.__cause__ is None


def test_every_valid_seed_works_and_seeds_stay_distinct(pipe):
    """jax.random.key alone maps seeds past 32 bits onto 32-bit ones (2**32 would be seed 0's image)."""
    out = pipe("a cube", num_inference_steps=2, seed=2**63 - 1, output_type="latent").images
    assert out.shape == (1, 4, 8, 8) and np.isfinite(out).all()
    for seed in (0, 3, 2**32 - 1):  # below 2**32: exactly jax.random.key's key (images stay reproducible)
        np.testing.assert_array_equal(
            jax.random.key_data(prng_key(seed)), jax.random.key_data(jax.random.key(seed))
        )
    keys = {tuple(np.asarray(jax.random.key_data(prng_key(s)))) for s in (0, 2**32, 2**32 - 1, 2**63 - 1)}
    assert len(keys) == 4
    np.testing.assert_array_equal(
        pipe("a cube", num_inference_steps=2, seed=np.int64(3), output_type="latent").images,
        pipe("a cube", num_inference_steps=2, seed=3, output_type="latent").images,
    )


@dataclasses.dataclass(frozen=True)
class NaNAtStep(EulerScheduler):
    """Euler whose latents turn NaN after step `bad` (0-based): a run that diverges at a known step."""

    bad: int = 1

    def step(self, state, model_output, step_index, sample):
        lat, state = super().step(state, model_output, step_index, sample)
        return jnp.where(step_index == self.bad, jnp.nan, lat), state


def test_latents_going_nan_name_the_step(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "scheduler_for", lambda name=None: NaNAtStep.from_config(pipe.scheduler_config))
    with pytest.raises(dj.NonFiniteError) as e:
        pipe("a cube", num_inference_steps=3, output_type="np")
    message = str(e.value)
    print(message)
    step = "at step 2 of 3 (timestep " if hasattr(Denoiser, "nonfinite_step") else "during denoising (3 steps"
    assert message.startswith(f"latents became NaN/inf {step}") and "\n" not in message
    assert "UNet float32" in message and "try a smaller guidance_scale or another scheduler" in message


def _perturbed(params, name, value):
    """A copy of params with every leaf under a top-level module `name` set to `value`."""
    return {
        k: (jax.tree.map(lambda a: jnp.full_like(a, value), v) if k == name else v) for k, v in params.items()
    }


def test_broken_unet_or_vae_raise_instead_of_a_black_image(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "unet_params", _perturbed(pipe.unet_params, "conv_out", jnp.inf))
    with pytest.raises(dj.NonFiniteError, match="latents became NaN/inf (at step 1 of 2|during denoising)"):
        pipe("a cube", num_inference_steps=2, output_type="latent")
    monkeypatch.undo()
    assert np.isfinite(pipe("a cube", num_inference_steps=2, output_type="np").images).all()
    monkeypatch.setattr(pipe, "vae_params", _perturbed(pipe.vae_params, "post_quant_conv", 1e38))
    with pytest.raises(dj.NonFiniteError) as e:
        pipe("a cube", num_inference_steps=2, output_type="pil")
    print(e.value)
    assert str(e.value).startswith("the VAE decode (float32) turned finite latents into NaN/inf pixels")


OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes."


def test_out_of_memory_is_one_line_naming_size_devices_and_fixes(pipe, monkeypatch):
    def raise_oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(Denoiser, "__call__", raise_oom)
    with pytest.raises(OutOfMemoryError) as e:
        pipe(["a", "b"], num_inference_steps=2)
    message = str(e.value)
    print(message)
    assert re.match(
        r"out of device memory in denoising at 64x64, batch 2 x2 for guidance, on 1 cpu device\(s\) "
        r"\(UNet weights [\d.]+ MB, ",
        message,
    )
    for fix in (
        "a 0.12 GB allocation failed",
        "more devices",
        "attention_impl='chunked' (--attention chunked)",
        "stale_kv='hidden'",
        "stale_kv_dtype='int8'",
        "docs/benchmarks.md 'Memory at high resolution'",
    ):
        assert fix in message
    assert "dtype=jnp.bfloat16 (--dtype bfloat16)" in message and "\n" not in message  # the UNet is float32

    # the decode: the loop "returns" zeros, the VAE runs out
    monkeypatch.setattr(Denoiser, "__call__", lambda self, *a, **k: jnp.zeros((1, 8, 8, 4)))
    monkeypatch.setattr(Denoiser, "nonfinite_step", lambda self: None, raising=False)
    monkeypatch.setattr(Decoder, "__call__", raise_oom)
    with pytest.raises(
        OutOfMemoryError, match=r"in the VAE decode at 64x64, batch 1, on 1 cpu .*decode_tile_rows=64"
    ):
        pipe("a", num_inference_steps=2, output_type="np")

    # any other runtime error is not dressed up as one
    def raise_internal(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: x")

    monkeypatch.setattr(Decoder, "__call__", raise_internal)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: x"):
        pipe("a", num_inference_steps=2, output_type="np")


class _Diverged:
    """What check_denoised reads of a Denoiser whose latents went NaN after step index 7 of 20."""

    num_steps, timesteps = 20, np.arange(1000, 0, -50)

    def nonfinite_step(self):
        return 7


def test_half_precision_advice_names_float32():
    from distrifusion_jax.guards import check_decoded, check_denoised

    sched = EulerScheduler()
    with pytest.raises(dj.NonFiniteError) as e:
        check_denoised(_Diverged(), np.zeros((1, 8, 8, 4)), sched, jnp.bfloat16, 5.0)
    assert str(e.value) == (
        "latents became NaN/inf at step 8 of 20 (timestep 650, euler scheduler, UNet bfloat16, guidance_scale 5): "
        "likely cause an overflow in bfloat16; try float32 (dtype=jnp.float32 / --dtype float32), a smaller "
        "guidance_scale, or another scheduler"
    )
    image = np.zeros((1, 64, 64, 3), np.float32)
    check_decoded(image, jnp.float16)  # finite: nothing to say
    with pytest.raises(
        dj.NonFiniteError,
        match=r"the VAE decode \(float16\) turned finite latents into NaN/inf "
        r"pixels: .*vae_dtype=jnp.float32",
    ):
        check_decoded(np.where(image == 0, np.inf, image), jnp.float16)
