"""`distrifusion-jax benchmark` as a script: single, full_sync, displaced, naive_patch and tensor side by side.

    python examples/benchmark.py --random sdxl --steps 50 --devices 8 --json results.json    # GPUs
    python examples/benchmark.py --random tiny --devices 8 --dtype float32 --steps 10 --overhead  # CPU check
    python examples/benchmark.py --model path/to/sdxl-pipeline --height 2048 --configs single,displaced
    python examples/benchmark.py --random sdxl --devices 8 --dry-run    # builds and lowers, no weights

Prints compile time, per-step latency, end to end with and without the VAE decode and peak device
memory for each configuration, with speedups against `single` (or `full_sync` where single is
skipped), all measured in this one process; see `--help` and distrifusion_jax/benchmark.py.
"""

import sys

from distrifusion_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
