"""Index backpropagation quantization (IBQ, Shi et al. 2024): every code gets gradient.

logits_nk = z_n . e_k / temperature, i_n = argmax_k logits_nk, and the one-hot of i_n passes
gradients through the softmax of the logits (straight-through):

  w = onehot(i) - sg[softmax(logits)] + softmax(logits),   z_q = w E

so z_q equals e_i in value while d z_q / d E and d z_q / d z reach every code through the
softmax. The loss is IBQ's double quantization loss on z_q: codebook_loss = mean ||sg[z] - z_q||^2
plus beta * commitment_loss, commitment_loss = mean ||z - sg[z_q]||^2, plus, with
``entropy_weight > 0``, the entropy penalty IBQ trains with (as MAGVIT-v2's): with
p_n = softmax(z_n . E^T / entropy_temperature), mean_n H(p_n) - H(mean_n p_n) over the batch,
low for confident assignments that spread over the codebook. The [N, K] logits are the method
(all codes take part), so memory grows with N * K.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq_jax.nets.quantizers import (
    Array,
    Dtype,
    QuantizerResult,
    check_codebook_init,
    check_codebook_size,
    check_indices,
    check_last_dim,
    check_positive_int,
    code_histogram,
    codebook_aux,
    codebook_initializer,
    entropy_regularizer,
)

_HIGHEST = jax.lax.Precision.HIGHEST


class IBQ(nn.Module):
    """Straight-through softmax one-hot over all ``codebook_size`` codes."""

    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    temperature: float = 1.0
    codebook_init: str = "variance_scaling"
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_codebook_size("IBQ", self.codebook_size)
        check_positive_int("IBQ", "embed_dim", self.embed_dim)
        if self.temperature <= 0:
            raise ValueError(f"IBQ: temperature must be > 0, got {self.temperature}; use 1.0.")
        if self.entropy_weight and self.entropy_temperature <= 0:
            raise ValueError(
                f"IBQ: entropy_temperature must be > 0, got {self.entropy_temperature}; use 0.01."
            )
        check_codebook_init("IBQ", self.codebook_init)
        super().__post_init__()

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    def setup(self) -> None:
        self.codebook = self.param(
            "codebook",
            codebook_initializer(self.codebook_init, self.codebook_size),
            (self.codebook_size, self.embed_dim),
            jnp.float32,
        )

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., embed_dim] -> (z_q [..., embed_dim], QuantizerResult)."""
        del train
        check_last_dim("IBQ", z, self.embed_dim)
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        codes = jnp.asarray(self.codebook, jnp.float32)
        inner = jnp.matmul(flat, codes.T, precision=_HIGHEST)
        logits = inner / self.temperature
        indices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        soft = jax.nn.softmax(logits, axis=-1)
        hard = jax.nn.one_hot(indices, self.codebook_size, dtype=jnp.float32)
        weights = hard - jax.lax.stop_gradient(soft) + soft
        z_q = jnp.matmul(weights, codes, precision=_HIGHEST)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - z_q))
        commitment_loss = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(z_q)))
        loss = codebook_loss + self.beta * commitment_loss
        entropy_loss = None  # codebook_aux reports 0 when off
        if self.entropy_weight:
            entropy_loss = entropy_regularizer(-inner, self.entropy_temperature)
            loss = loss + self.entropy_weight * entropy_loss
        counts = code_histogram(indices, self.codebook_size)
        return z_q.astype(self.dtype).reshape(z.shape), QuantizerResult(
            indices=indices.reshape(z.shape[:-1]),
            loss=loss.astype(jnp.float32),
            aux=codebook_aux(
                counts=counts,
                codebook_loss=codebook_loss,
                commitment_loss=commitment_loss,
                entropy_loss=entropy_loss,
            ),
        )

    def lookup(self, indices: Array) -> Array:
        """int indices [...] -> codes [..., embed_dim]."""
        check_indices("IBQ", indices)
        return jnp.take(jnp.asarray(self.codebook, jnp.float32), indices, axis=0).astype(self.dtype)
