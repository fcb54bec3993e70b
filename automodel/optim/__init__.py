"""Optimizer plugins: optimizer plus the LR schedule it steps with."""
