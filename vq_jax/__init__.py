"""vq-jax: VQ-VAE / VQGAN image tokenizers and their priors in JAX/Flax.

The public API: names re-exported here, nothing defined.
"""

from vq_jax.api import Prior, Tokenizer, load, load_prior
from vq_jax.errors import UserError
from vq_jax.nets.autoencoder import AttnBlock, Decoder, Encoder, ResnetBlock, downsample_factor
from vq_jax.nets.discriminator import NLayerDiscriminator
from vq_jax.nets.ibq import IBQ
from vq_jax.nets.lfq import LFQ
from vq_jax.nets.lpips import LPIPS, load_lpips_params
from vq_jax.nets.quantizers import (
    FSQ,
    EMAVectorQuantizer,
    Quantizer,
    QuantizerResult,
    VectorQuantizer,
    replace_dead_codes,
)
from vq_jax.nets.residual import ResidualVQ
from vq_jax.nets.simvq import SimVQ
from vq_jax.nets.transformer import GPT, MaskGITTransformer
from vq_jax.nets.vqmodel import VQModel
from vq_jax.sampling import sample_autoregressive, sample_maskgit

__all__ = [
    "FSQ",
    "GPT",
    "IBQ",
    "LFQ",
    "LPIPS",
    "AttnBlock",
    "Decoder",
    "EMAVectorQuantizer",
    "Encoder",
    "MaskGITTransformer",
    "NLayerDiscriminator",
    "Prior",
    "Quantizer",
    "QuantizerResult",
    "ResidualVQ",
    "ResnetBlock",
    "SimVQ",
    "Tokenizer",
    "UserError",
    "VQModel",
    "VectorQuantizer",
    "downsample_factor",
    "load",
    "load_lpips_params",
    "load_prior",
    "replace_dead_codes",
    "sample_autoregressive",
    "sample_maskgit",
]
__version__ = "0.1.0"
