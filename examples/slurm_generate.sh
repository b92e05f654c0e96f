#!/bin/bash
# One SDXL image over the GPUs of several hosts: one task per host, each using all of its GPUs;
# the (cfg, patch) mesh spans every GPU of the job (2 hosts x 8 GPUs: cfg 2 x patch 8).
#
#   sbatch examples/slurm_generate.sh                       # defaults below
#   MODEL=/shared/sdxl-jax PROMPT="a lighthouse at dusk" HEIGHT=2048 WIDTH=2048 sbatch examples/slurm_generate.sh
#
# Every host reads the model from its own path (a shared file system or a copy per host); only
# process 0 writes $OUTPUT and prints the progress bar and the summary. Adjust the #SBATCH lines to
# your cluster (partition, account, GPUs per node).
#SBATCH --job-name=distrifusion
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=00:30:00
#SBATCH --output=distrifusion-%j.log

set -euo pipefail

MODEL=${MODEL:-sdxl-jax}
PROMPT=${PROMPT:-"an astronaut riding a horse"}
HEIGHT=${HEIGHT:-2048}
WIDTH=${WIDTH:-2048}
STEPS=${STEPS:-50}
OUTPUT=${OUTPUT:-astronaut-$SLURM_JOB_ID.png}
PYTHON=${PYTHON:-python}

# Process 0 runs on the first host of the job and hosts the coordinator on this port.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# One task per host, each with its own index (SLURM_PROCID, read inside the task: hence the single
# quotes; srun passes the exported variables on). The three flags may also be left out: under srun,
# distrifusion-jax takes the coordinator (the first host, on $JAX_COORDINATOR_PORT or a port derived
# from the job id), the process count and the index from SLURM itself.
export MODEL PROMPT HEIGHT WIDTH STEPS OUTPUT PYTHON HEAD PORT
srun --ntasks-per-node=1 bash -c 'exec "$PYTHON" -m distrifusion_jax generate \
    --coordinator "$HEAD:$PORT" --num-processes "$SLURM_NTASKS" --process-id "$SLURM_PROCID" \
    --model "$MODEL" --prompt "$PROMPT" --height "$HEIGHT" --width "$WIDTH" --steps "$STEPS" \
    --scheduler ddim --warmup-steps 4 --mode corrected_async_gn --dtype bfloat16 --output "$OUTPUT"'
