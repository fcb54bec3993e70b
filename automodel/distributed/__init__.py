"""Process-group start-up and the `ParallelDims` -> DeviceMesh contract."""
