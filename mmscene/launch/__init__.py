"""Launching on clusters: sbatch scripts (``slurm``) and memory planning (``plan``)."""
