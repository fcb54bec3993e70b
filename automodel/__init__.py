"""automodel: Hugging Face causal LMs trained with PyTorch DTensor SPMD parallelism, configured by Hydra.

Import cost matters here: `automodel --help`, `automodel list` and `--cfg job` only read config, so this
package imports nothing heavy at the top level. torch/transformers are imported where a plugin is built.
"""

__version__ = "0.1.0"
