"""Pretrained PyTorch tokenizers (taming-transformers' VQGAN, LlamaGen's VQ) -> vq-jax workdirs.

`scripts/convert_checkpoint.py` is the command; `convert` the call it makes. Reading the files
needs torch (the `[torch]` extra); nothing else in vq-jax imports it.
"""

from vq_jax.convert.arch import Architecture, ConversionError
from vq_jax.convert.llamagen import LlamaGenModel
from vq_jax.convert.workdir import SOURCES, convert

__all__ = ["SOURCES", "Architecture", "ConversionError", "LlamaGenModel", "convert"]
