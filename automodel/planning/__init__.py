"""`automodel plan`: per-rank memory and per-step communication of a run at any world size, without hardware."""
