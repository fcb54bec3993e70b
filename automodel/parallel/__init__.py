"""Parallel plugins: the mesh sizes and how the model is laid out on it."""
