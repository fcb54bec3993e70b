"""Getting ranks started: local multi-process launch, SLURM environments, and sweep summaries."""
