#!/usr/bin/env bash
# One task of a Slurm training step (started by `srun` in slurm/train.sbatch, once per GPU or CPU
# process): torch.distributed's variables from Slurm's, then the training job.
#
#   task.sh [--config FILE] [section.key=value ...]    (the arguments of `python -m pretrain.train`)
#
# MASTER_ADDR / MASTER_PORT come from the batch script (the first node of the allocation). The
# training job exits 75 when a signal made it save and stop; this task then exits 0 and leaves a
# marker in $TITANS_JOB_DIR, so `srun --kill-on-bad-exit` does not kill the ranks still closing and
# the batch script knows to requeue. Any other failure keeps its code: srun then ends the whole step.
set -uo pipefail

: "${MASTER_ADDR:?is not set: run this from slurm/train.sbatch}"
: "${MASTER_PORT:?is not set: run this from slurm/train.sbatch}"
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
# tasks on this node: SLURM_TASKS_PER_NODE reads like "2(x3),1"; ours is the first entry on one node
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1

if [ "$RANK" = 0 ]; then
    echo "task: rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE on $(hostname -s), rendezvous" \
         "$MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}, $OMP_NUM_THREADS threads"
fi
# Slurm signals the whole task, this shell too: ignore the signals here. Python inherits the ignoring
# until pretrain.train installs its handlers (save and stop), so a warning that comes while it is still
# starting up is lost (the run goes on) rather than killing it without a checkpoint.
trap '' USR1 TERM INT
"${TITANS_PYTHON:-python}" -m pretrain.train "$@"
code=$?
if [ "$code" = 75 ] && [ -n "${TITANS_JOB_DIR:-}" ]; then  # EXIT_INTERRUPTED: saved, run again
    touch "$TITANS_JOB_DIR/interrupted.rank$RANK"
    exit 0
fi
exit "$code"
