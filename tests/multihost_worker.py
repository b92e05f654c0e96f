"""One process of tests/test_multihost.py: joins a 2-process run on loopback and generates with the pipeline.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR OUT_DIR

Each process brings 4 fake CPU devices; every process prints one JSON line (`MULTIHOST {...}`) with
what it saw, and process 0 alone writes `{run}_{latent,image}.npy` for each run of RUNS to OUT_DIR.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distrifusion_jax import distributed  # noqa: E402

LOCAL_DEVICES = 4  # per process: 2 processes make the 8 devices of the single-process reference

# the run's settings, shared with the single-process reference in tests/test_multihost.py
HEIGHT, WIDTH, PROMPT, SEED = 128, 64, "a red cube", 1
RUNS = {  # name -> (DistriConfig fields, steps); full_sync with steps = warmup + 1 compiles one UNet only
    "full_sync": (dict(mode="full_sync", warmup_steps=1), 2),
    "displaced": (dict(mode="corrected_async_gn", warmup_steps=1), 3),
}
TIMEOUT_S = 60


def generate(pipe, name: str) -> dict:
    """Run `name`'s final latents [1, 4, h, w] and image [1, H, W, 3] (numpy), from one pipeline whose
    DistriConfig is switched per run (so the VAE decode compiles once); the second call reuses the loop."""
    fields, steps = RUNS[name]
    pipe.distri_config = dataclasses.replace(pipe.distri_config, **fields)
    return {
        kind: pipe(PROMPT, num_inference_steps=steps, seed=SEED, scheduler="ddim", output_type=out).images
        for kind, out in (("latent", "latent"), ("image", "np"))
    }


def main(pid: int, n: int, port: int, model: str, out_dir: str) -> None:
    from distrifusion_jax import DistriConfig
    from distrifusion_jax.pipeline import DistriSDXLPipeline

    address = f"127.0.0.1:{port}"
    processes = distributed.initialize(address, n, pid, timeout_s=TIMEOUT_S, bind_address=address)
    pipe = DistriSDXLPipeline.from_pretrained(
        model, DistriConfig(height=HEIGHT, width=WIDTH), dtype=jnp.float32, compilation_cache="off"
    )
    results = {name: generate(pipe, name) for name in RUNS}
    info = dict(
        process_id=jax.process_index(),
        process_count=jax.process_count(),
        initialize=processes,
        global_devices=len(jax.devices()),
        local_devices=len(jax.local_devices()),
        main=distributed.is_main_process(),
        multi=distributed.spans_processes(jax.devices()),
        params_global=distributed.is_global(jax.tree.leaves(pipe.unet_params)[0]),
        shapes={f"{name}_{kind}": list(a.shape) for name, r in results.items() for kind, a in r.items()},
    )
    if distributed.is_main_process():
        for name, r in results.items():
            for kind, array in r.items():
                np.save(os.path.join(out_dir, f"{name}_{kind}.npy"), array)
    print("MULTIHOST " + json.dumps(info), flush=True)


if __name__ == "__main__":  # not on import: the test imports the settings above into a process with 8 devices
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
