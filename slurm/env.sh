# Sourced by the sbatch templates in slurm/ (train.sbatch, ...): what every sd_func job sets.
#
# - the repository: SD_FUNC_DIR (default: the folder sbatch was run from, which is the job's
#   working directory) and the Python: PYTHON (default: python on PATH, e.g. an activated venv);
# - threads: OMP_NUM_THREADS = the task's CPUs (--cpus-per-task), so 8 tasks per node do not
#   each start one thread per core;
# - NCCL: async error handling on (a rank whose peer died fails instead of waiting for the
#   collective timeout), warnings in the log; the network interface and InfiniBand adapters
#   are site-specific: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA before sbatch if yours needs them;
# - the rendezvous: SD_FUNC_HEAD, the first host of the job (as `scontrol show hostnames`
#   lists it, which is where sd_func's rank 0 runs) and SD_FUNC_PORT, MASTER_PORT or one
#   derived from the job id exactly as sd_func.train.distributed derives it (15000 + id % 15000).
# shellcheck shell=bash

SD_FUNC_DIR=${SD_FUNC_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
SD_FUNC_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
SD_FUNC_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
cd "$SD_FUNC_DIR"
echo "sd_func job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES:-1} node(s) $SLURM_JOB_NODELIST," \
     "head $SD_FUNC_HEAD:$SD_FUNC_PORT, in $SD_FUNC_DIR, $(date -u +%FT%TZ)"
