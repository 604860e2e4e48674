"""SLURM launchers: submit.py (submitit, one task per GPU), train.sbatch (torchrun per node), cluster.sh."""
