"""VQ autoencoder: Encoder -> 1x1 quant_conv -> quantizer -> 1x1 post_quant_conv -> Decoder.

The quantizer is any module following the quantizer contract (VectorQuantizer,
EMAVectorQuantizer, FSQ): it is passed in as a field, so the model is agnostic to the quantizer
kind, and its ``embed_dim`` sets the width of the 1x1 projections around it. The projected latent
is cast to float32 before quantization so nearest-code distances are exact under bf16 compute.

Parameter tree: encoder, quant_conv, quantizer, post_quant_conv, decoder. ``last_layer`` gives
the decoder's last layer (for the VQGAN adaptive weight), so the train step needs no module names.

Every entry point works through ``model.apply(variables, ..., method=...)``: ``__call__``,
``encode``, ``decode`` and ``decode_indices``.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax.nets import kernels
from vq_jax.nets.autoencoder import Decoder, Dtype, Encoder, conv1x1
from vq_jax.nets.quantizers import QuantizerResult


class VQModel(nn.Module):
    """Image [B, H, W, in_channels] in [-1, 1] <-> code indices [B, H/f, W/f, *index_shape]."""

    quantizer: nn.Module
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    in_channels: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attn_levels: Sequence[int] = ()  # non-empty: attention by level (see nets/autoencoder.py)

    def setup(self) -> None:
        embed_dim = self.quantizer.embed_dim
        self.encoder = Encoder(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            z_channels=self.z_channels,
            dropout=self.dropout,
            num_groups=self.num_groups,
            dtype=self.dtype,
            attn_levels=self.attn_levels,
        )
        self.quant_conv = conv1x1(embed_dim, self.dtype, None)
        self.post_quant_conv = conv1x1(self.z_channels, self.dtype, None)
        self.decoder = Decoder(
            ch=self.ch,
            out_channels=self.in_channels,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            dropout=self.dropout,
            num_groups=self.num_groups,
            dtype=self.dtype,
            attn_levels=self.attn_levels,
        )

    @nn.nowrap
    def last_layer(
        self, params: Any, intermediates: Any
    ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """The decoder's last layer: (its kernel in `params`, kernel -> its output without the
        bias), the output computed from the layer's input that a train-mode ``apply(...,
        mutable=['intermediates'])`` sowed into `intermediates`, with the model's conv."""
        features = intermediates["decoder"]["conv_out_input"][0].astype(jnp.float32)
        pad = ((1, 1), (1, 1))  # the 3x3 'SAME' conv_out

        def apply(kernel: jax.Array) -> jax.Array:
            return kernels.conv_general_dilated(
                features, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        return params["decoder"]["conv_out"]["kernel"], apply

    def _check_images(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"VQModel expects NHWC images [B, H, W, C], got shape {x.shape}; add a batch "
                "axis (x[None]) or a channel axis (x[..., None]) as needed."
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"images have {x.shape[-1]} channels but the model has in_channels="
                f"{self.in_channels}; convert the images (e.g. grayscale <-> RGB) or build the "
                f"model with in_channels={x.shape[-1]}."
            )

    def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerResult]:
        """Images -> (quantized latent z_q [B, h, w, embed_dim], QuantizerResult)."""
        self._check_images(x)
        z = self.quant_conv(self.encoder(x, train).astype(self.dtype))
        return self.quantizer(z.astype(jnp.float32), train=train)

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latent [B, h, w, embed_dim] -> images [B, h*f, w*f, in_channels] (float32)."""
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype)), train)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Code indices [B, h, w, *quantizer.index_shape] -> images (quantizer lookup, then
        decode in eval mode); [B, h, w] for one token per position, [B, h, w, depth] for
        residual VQ."""
        index_shape = tuple(getattr(self.quantizer, "index_shape", ()))
        if indices.ndim != 3 + len(index_shape) or tuple(indices.shape[3:]) != index_shape:
            want = ", ".join(["B", "h", "w", *map(str, index_shape)])
            raise ValueError(
                f"decode_indices expects indices of shape [{want}], got {indices.shape}; "
                "reshape flat token sequences to the latent grid first."
            )
        return self.decode(self.quantizer.lookup(indices), train=False)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerResult]:
        """Images -> (reconstruction float32, QuantizerResult)."""
        z_q, result = self.encode(x, train)
        return self.decode(z_q, train), result
