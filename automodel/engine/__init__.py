"""The engine: stitches the chosen plugins into one SPMD training run and owns the loop."""
