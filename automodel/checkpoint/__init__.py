"""Checkpoint plugins: what is written during and at the end of a run."""
