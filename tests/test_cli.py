"""The command line: bad input is one line with exit status 2, found before anything slow; generate end to end.

The bad-input cases run `cli.main` in this process (JAX already has 8 fake CPU devices), with the
pipeline's loading replaced by a failure: a case passes only if its error comes before any weight.
Two runs start a real process: generate on fake devices, and the compilation cache across processes.
"""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from distrifusion_jax import cli, pipeline
from distrifusion_jax.errors import DistriFusionError
from distrifusion_jax.tools import benchmark
from distrifusion_jax.tools.random_pipeline import write_random_pipeline
from distrifusion_jax.weights import pipeline_weights

SMALL = (
    "--height",
    64,
    "--width",
    64,
    "--steps",
    2,
    "--devices",
    1,
    "--dtype",
    "float32",
    "--no-progress",
    "--compile-cache",
    "off",
)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("tiny_pipeline"), seed=0)


class Stopped(DistriFusionError):
    """Raised in place of loading: the run got past every check."""


@pytest.fixture
def no_loading(monkeypatch):
    """`from_pretrained` stops the run (one line, exit 2); a weight read or a benchmark measurement fails the test."""

    def stop(*args, **kwargs):
        raise Stopped("stopped where the weights would load")

    def fail(*args, **kwargs):
        raise AssertionError("slow work started before the bad input was found")

    monkeypatch.setattr(pipeline.DistriPipeline, "from_pretrained", classmethod(stop))
    for name in ("load_unet", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(pipeline_weights, name, fail)
    monkeypatch.setattr(benchmark, "measure", fail)
    monkeypatch.setattr(benchmark, "dry_run", fail)


def run_main(capsys, *args):
    """cli.main in this process: (exit status, stderr lines)."""
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def one_line_error(rc, err, message):
    assert rc == 2, err
    assert err and err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err), err


def broken_copy(src, dst, rel, text=None):
    """The pipeline's config files (no weights) at `dst`, with `rel` replaced by `text` (None: removed)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    if text is None:
        (dst / rel).unlink()
    else:
        (dst / rel).write_text(text)
    return dst


# ---- bad input: (extra arguments, expected text of the error line); {tmp} is a fresh folder ----
GENERATE_CASES = [
    # the output file, before anything else
    (["--output", "{tmp}/missing/x.png"], "folder {tmp}/missing does not exist; create it first"),
    (["--output", "{tmp}/image"], "has no file extension, which names the image format; use .png"),
    (["--output", "{tmp}"], "is a folder; name an image file in it"),
    (["--output", "{tmp}/image.xyz"], "Pillow cannot write .xyz files"),
    (["--output", "{tmp}/old.png"], "already exists; pass --overwrite to replace it"),
    # argparse
    (["--scheduler", "heun"], "invalid choice: 'heun'"),
    (["--mode", "async"], "invalid choice: 'async'"),
    (["--stale-kv-dtype", "int4"], "invalid choice: 'int4'"),
    (["--seed", 2**63], "argument --seed: 9223372036854775808 is out of range: pass a seed 0 <= seed < 2^63"),
    (["--seed", -1], "argument --seed: -1 is out of range"),
    # numbers, devices, layout
    (["--steps", 0], "--steps 0: need at least one step"),
    (["--guidance-scale", "nan"], "--guidance-scale nan: pass a finite number"),
    (["--devices", 16], "--devices 16 but JAX sees 8 cpu device(s) (JAX was started in this process"),
    (["--height", 100], "height=100 must be a positive multiple of 8"),
    (["--height", 200, "--devices", 4], "height=200 does not split into 2 patches"),
    (
        ["--devices", 3],
        "the CFG split needs an even number of devices, got 3: use an even count or --no-split-batch",
    ),
    # against the model's configs
    (
        ["--steps", 1001],
        "--steps 1001: the euler scheduler (1000 training timesteps, timestep_spacing 'leading', "
        "steps_offset 1) takes at most 1000 steps; use 1000 or fewer",
    ),
    (["--steps", 1000, "--scheduler", "ddim"], "takes at most 999 steps; use 999 or fewer"),
    (["--steps", 1000, "--scheduler", "dpm-solver"], "takes at most 999 steps"),
    # decode tiles, kernels, cache
    (["--decode-tile-rows", 3, "--devices", 1], "--decode-tile-rows 3: tiles need at least 16 latent rows"),
    (
        ["--decode-tile-rows", 16, "--devices", 2],
        "--decode-tile-rows 16 would be ignored: the VAE decode is row-sharded over 2 devices",
    ),
    (
        ["--attention", "cudnn"],
        "--attention cudnn needs an NVIDIA GPU (cuDNN) but this run is on cpu; use 'xla'",
    ),
    (["--vae-attention", "cudnn"], "--vae-attention cudnn needs an NVIDIA GPU"),
    (
        ["--compile-cache", "{tmp}/old.png"],
        "compilation cache {tmp}/old.png is a file, not a folder; pass a writable",
    ),
]


@pytest.mark.parametrize(
    "args, message", GENERATE_CASES, ids=[" ".join(map(str, a)) for a, _ in GENERATE_CASES]
)
def test_generate_bad_input(tiny_pipeline, tmp_path, capsys, no_loading, args, message):
    (tmp_path / "old.png").write_bytes(b"a user's file")
    args = [str(a).format(tmp=tmp_path) for a in args]
    rc, err = run_main(
        capsys,
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "x",
        "--output",
        tmp_path / "new.png",
        *SMALL,
        *args,
    )
    one_line_error(rc, err, message.format(tmp=tmp_path))
    assert (tmp_path / "old.png").read_bytes() == b"a user's file"


MODEL_CASES = [
    ("model_index.json", "{", "model_index.json: not valid JSON"),
    ("vae/config.json", "not json", "vae/config.json: not valid JSON"),
    ("scheduler/scheduler_config.json", "[1, 2", "scheduler_config.json: not valid JSON"),
    ("unet/config.json", None, "no unet/config.json; this is not a complete SDXL pipeline folder"),
    ("scheduler/scheduler_config.json", None, "no scheduler/scheduler_config.json"),
]


@pytest.mark.parametrize(
    "rel, text, message",
    MODEL_CASES,
    ids=[f"{r}-{'missing' if t is None else 'invalid'}" for r, t, _ in MODEL_CASES],
)
def test_generate_broken_model_folder(tiny_pipeline, tmp_path, capsys, no_loading, rel, text, message):
    model = broken_copy(tiny_pipeline, tmp_path / "model", rel, text)
    rc, err = run_main(
        capsys, "generate", "--model", model, "--prompt", "x", "--output", tmp_path / "x.png", *SMALL
    )
    one_line_error(rc, err, message)


def test_generate_missing_model(tmp_path, capsys, no_loading):
    rc, err = run_main(capsys, "generate", "--model", tmp_path / "missing", "--prompt", "x")
    one_line_error(rc, err, "does not exist")


def test_platform_that_cannot_start(tiny_pipeline, tmp_path, capsys, no_loading, monkeypatch):
    """JAX_PLATFORMS=cuda with CPU-only jaxlib: jax.devices() raises a bare AssertionError."""

    def no_cuda(*args):
        raise AssertionError

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(jax, "devices", no_cuda)
    rc, err = run_main(
        capsys, "generate", "--model", tiny_pipeline, "--prompt", "x", "--output", tmp_path / "x.png"
    )
    one_line_error(
        rc,
        err,
        "JAX_PLATFORMS=cuda: JAX cannot start 'cuda' (its plugin is not installed); unset JAX_PLATFORMS",
    )


@pytest.mark.parametrize(
    "args, layout",
    [
        (["--devices", 2], "2x1"),
        (["--devices", 2, "--guidance-scale", 1], "1x2"),
        (["--devices", 3, "--guidance-scale", 1, "--height", 96], "1x3"),
        (["--devices", 4, "--no-split-batch", "--height", 128], "1x4"),
        (["--devices", 1, "--decode-tile-rows", 16, "--height", 96], "1x1"),  # one device: decoded in tiles
    ],
)
def test_generate_accepts_and_prints_the_layout_it_runs(
    tiny_pipeline, tmp_path, capsys, no_loading, args, layout
):
    rc, err = run_main(
        capsys,
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "x",
        "--output",
        tmp_path / "x.png",
        *SMALL,
        *args,
    )
    one_line_error(rc, err, "stopped where the weights would load")
    assert f"mesh (cfg x patch) {layout}," in err[0], err


def test_benchmark_bad_input(tmp_path, capsys, no_loading):
    rc, err = run_main(capsys, "benchmark", "--random", "tiny", "--json", tmp_path / "missing" / "r.json")
    one_line_error(
        rc, err, f"--json {tmp_path / 'missing' / 'r.json'}: folder {tmp_path / 'missing'} does not exist"
    )
    (tmp_path / "old.json").write_text("{}")
    rc, err = run_main(capsys, "benchmark", "--random", "tiny", "--json", tmp_path / "old.json")
    one_line_error(rc, err, "old.json already exists; pass --overwrite to replace it")
    assert (tmp_path / "old.json").read_text() == "{}"
    rc, err = run_main(capsys, "benchmark", "--random", "tiny", "--seed", 2**64)
    one_line_error(rc, err, "argument --seed: 18446744073709551616 is out of range")
    rc, err = run_main(capsys, "benchmark", "--random", "tiny", "--steps", 1001, "--scheduler", "ddim")
    one_line_error(rc, err, "--steps 1001: the ddim scheduler")


def test_generate_options_reach_the_pipeline(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """Memory and kernel options arrive in from_pretrained's arguments and DistriConfig (their effect on the
    image is tested in test_stale_options.py and test_attention.py)."""
    seen = {}

    def record(cls, path, config, **kwargs):
        seen.update(kwargs, path=path, config=config)
        raise Stopped("stopped where the weights would load")

    monkeypatch.setattr(pipeline.DistriPipeline, "from_pretrained", classmethod(record))
    rc, err = run_main(
        capsys,
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "x",
        "--output",
        tmp_path / "x.png",
        *SMALL,
        "--stale-kv",
        "hidden",
        "--stale-kv-dtype",
        "int8",
        "--attention",
        "chunked",
        "--vae-attention",
        "xla",
        "--decode-tile-rows",
        64,
        "--scheduler",
        "ddim",
    )
    one_line_error(rc, err, "stopped where the weights would load")
    c = seen["config"]
    assert (c.height, c.width, c.devices, c.stale_kv, c.stale_kv_dtype) == (64, 64, 1, "hidden", "int8")
    assert (
        seen["attention_impl"],
        seen["vae_attention_impl"],
        seen["decode_tile_rows"],
        seen["scheduler"],
        seen["compilation_cache"],
    ) == ("chunked", "xla", 64, "ddim", "off")


# ---- real runs ----
def test_generate_in_process(tiny_pipeline, tmp_path, capsys):
    """main() inside a process that already uses JAX: a normal run prints only our lines (no third-party noise),
    and replaces an existing image only with --overwrite, leaving no temporary file."""
    out = tmp_path / "cube.png"
    out.write_bytes(b"old")
    rc, err = run_main(
        capsys,
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "a red cube",
        "--output",
        out,
        *SMALL,
        "--devices",
        2,
        "--no-split-batch",
        "--overwrite",
    )
    assert rc == 0, err
    assert len(err) == 3 and err[0].startswith("loading ") and "mesh (cfg x patch) 1x2," in err[0], err
    assert err[1].startswith("compiling ") and err[2].startswith(f"wrote {out} (64x64); compile "), err
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["cube.png"]


def cli_process(*args):
    env = dict(os.environ, DISTRIFUSION_JAX_CACHE="off")  # tests write nothing to the user's cache
    return subprocess.run(
        [sys.executable, "-m", "distrifusion_jax", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
def test_generate_on_fake_devices(tiny_pipeline, tmp_path):
    """A fresh process creates its fake devices from --devices and shows the progress bar (synchronous steps
    only: displaced ones are tested in test_patch_parallel.py, and compile longer)."""
    out = tmp_path / "cube.png"
    r = cli_process(
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "a red cube",
        "--height",
        64,
        "--width",
        64,
        "--steps",
        2,
        "--devices",
        4,
        "--warmup-steps",
        2,
        "--scheduler",
        "ddim",
        "--dtype",
        "float32",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "mesh (cfg x patch) 2x2" in r.stderr and "denoising" in r.stderr
    assert "compile" in r.stderr and "ms/step" in r.stderr and "decode" in r.stderr
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0


@pytest.mark.slow
def test_second_run_compiles_nothing(tiny_pipeline, tmp_path):
    """With the progress bar on (the default) the second identical run of `generate` traces and compiles
    nothing: the denoising programs, the text encoders and the decode come from the caches, and its progress
    bar counts the denoising steps."""
    args = [
        "generate",
        "--model",
        tiny_pipeline,
        "--prompt",
        "x",
        "--height",
        64,
        "--width",
        64,
        "--steps",
        3,
    ]
    args += ["--devices", 1, "--dtype", "float32", "--compile-cache", tmp_path / "cache", "--overwrite"]
    first = cli_process(*args, "--output", tmp_path / "a.png")
    second = cli_process(*args, "--output", tmp_path / "b.png")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    compiled = lambda r: int(
        re.search(r"\((\d+) programs compiled, (\d+) from the cache\)", r.stderr).group(1)
    )
    print(first.stderr.splitlines()[-1], second.stderr.splitlines()[-1], sep="\n")
    assert compiled(first) > 0 and compiled(second) == 0
    assert "3/3" in second.stderr  # the bar reached the last step
    programs = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "programs").glob("*.jaxexport"))
    # the loop's start and its one (synchronous: warmup 4 > 3 steps) step program, both text encoders, decode
    assert programs.count("denoise") == 2 and programs.count("text") == 2 and programs.count("vae") == 1
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )
