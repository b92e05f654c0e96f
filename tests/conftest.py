"""Test set-up: 8 fake CPU devices (set before any JAX computation), tiny diffusers UNets on disk."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when jax is first imported (helpers imports it)
# pipelines made without compilation_cache= write nothing to the user's cache (tests of the cache pass a folder)
os.environ["DISTRIFUSION_JAX_CACHE"] = "off"

from helpers import FAST_COMPILE_FLAGS, REFINER_TINY, SD1_TINY, SD2_TINY, SDXL_TINY, torch_unet  # noqa: E402

# before JAX starts (importing helpers started none)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

TINY_CONFIGS = {"sdxl": SDXL_TINY, "sd1": SD1_TINY, "sd2": SD2_TINY, "refiner": REFINER_TINY}


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    """name -> (diffusers folder with perturbed random weights, the torch model)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = torch_unet(TINY_CONFIGS[name])
            folder = tmp_path_factory.mktemp(f"unet_{name}")
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get
