"""Precision plugins: the autocast context and FSDP2's mixed-precision policy."""
