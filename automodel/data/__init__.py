"""Data plugins: tokenized examples -> this rank's micro-batches for each optimizer step."""
