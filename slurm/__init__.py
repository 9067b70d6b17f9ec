"""Slurm launch: sbatch scripts rendered from the recipes (render.py), the launcher that checks
the layout against the allocation and submits (launch.py), and a local single-machine Slurm for
trying and testing them (local_cluster.sh). See slurm/README.md."""
