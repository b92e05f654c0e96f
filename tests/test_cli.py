"""The command line: generate end to end on fake CPU devices, and one-line errors with exit status 2."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"), seed=0)


def cli(*args):
    env = dict(os.environ, DISTRIFUSION_JAX_CACHE="off")  # tests write nothing to the user's cache
    return subprocess.run([sys.executable, "-m", "distrifusion_jax", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_on_fake_devices(tiny_pipeline, tmp_path):
    out = tmp_path / "cube.png"
    r = cli("generate", "--model", tiny_pipeline, "--prompt", "a red cube", "--height", 128, "--width", 128,
            "--steps", 3, "--devices", 4, "--warmup-steps", 1, "--scheduler", "ddim", "--dtype", "float32",
            "--output", out)
    assert r.returncode == 0, r.stderr
    assert "mesh (cfg x patch) 2x2" in r.stderr and "denoising" in r.stderr
    assert "compile" in r.stderr and "ms/step" in r.stderr and "decode" in r.stderr
    image = np.asarray(Image.open(out))
    assert image.shape == (128, 128, 3) and image.std() > 0


@pytest.mark.parametrize("args, message", [
    (["--height", 200, "--devices", 4], "height=200 does not split into 2 patches"),
    (["--height", 100], "height=100 must be a positive multiple of 8"),
    (["--scheduler", "heun"], "invalid choice: 'heun'"),
    (["--mode", "async"], "invalid choice: 'async'"),
    (["--devices", 3], "the CFG split needs an even number of devices, got 3"),
])
def test_generate_bad_input_is_one_line_exit_2(tiny_pipeline, args, message):
    r = cli("generate", "--model", tiny_pipeline, "--prompt", "x", *args)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in r.stderr


def test_generate_missing_model(tmp_path):
    r = cli("generate", "--model", tmp_path / "missing", "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_compilation_cache_is_written_and_reused(tiny_pipeline, tmp_path):
    """Without the progress callback the denoising program lands in the persistent cache."""
    args = ("generate", "--model", tiny_pipeline, "--prompt", "x", "--height", 128, "--width", 128, "--steps", 2,
            "--devices", 2, "--no-split-batch", "--dtype", "float32", "--no-progress", "--output",
            tmp_path / "a.png", "--compile-cache", tmp_path / "cache")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert any(p.name.startswith("jit__run") for p in (tmp_path / "cache").iterdir())


def test_memory_options_reach_the_pipeline(tiny_pipeline, tmp_path):
    """Stale-state and attention options change nothing in a fully synchronous run (they only touch what is
    kept for displaced steps, and chunked attention is exact), and bad values are rejected in one line."""
    common = ("generate", "--model", tiny_pipeline, "--prompt", "a red cube", "--height", 128, "--width", 128,
              "--steps", 2, "--warmup-steps", 2, "--devices", 4, "--dtype", "float32", "--no-progress")
    plain = cli(*common, "--output", tmp_path / "plain.png")
    small = cli(*common, "--output", tmp_path / "small.png", "--stale-kv", "hidden", "--stale-kv-dtype", "int8",
                "--attention", "chunked", "--vae-attention", "chunked")
    assert plain.returncode == 0 and small.returncode == 0, plain.stderr + small.stderr
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("plain", "small"))
    assert a.std() > 0 and np.abs(a - b).max() <= 1
    bad = cli(*common, "--stale-kv-dtype", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
