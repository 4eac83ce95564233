"""Slurm submission for the training job: an sbatch script, a per-task launcher and `python -m slurm.submit`;
`local_cluster.sh` runs a one-node Slurm on this machine for the tests (docs/slurm.md)."""
