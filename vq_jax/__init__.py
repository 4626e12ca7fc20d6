"""vq-jax: VQ-VAE / VQGAN image tokenizers and their priors in JAX/Flax.

The public API: names re-exported here, nothing defined.
"""

from vq_jax.api import Tokenizer, load
from vq_jax.nets.autoencoder import AttnBlock, Decoder, Encoder, ResnetBlock, downsample_factor
from vq_jax.nets.discriminator import NLayerDiscriminator
from vq_jax.nets.quantizers import (
    FSQ,
    EMAVectorQuantizer,
    QuantizerResult,
    VectorQuantizer,
    replace_dead_codes,
)
from vq_jax.nets.vqmodel import VQModel

__all__ = [
    "FSQ",
    "AttnBlock",
    "Decoder",
    "EMAVectorQuantizer",
    "Encoder",
    "NLayerDiscriminator",
    "QuantizerResult",
    "ResnetBlock",
    "Tokenizer",
    "VQModel",
    "VectorQuantizer",
    "downsample_factor",
    "load",
    "replace_dead_codes",
]
__version__ = "0.1.0"
