"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023): each channel is quantized to its sign.

z [..., bits] -> q = where(z > 0, +1, -1) (no activation before the sign); the index is the
number whose bit i is (q_i > 0), so the implicit codebook is {-1, +1}^bits with 2^bits codes.
Gradients pass straight through. As the MAGVIT-v2 author clarified (vector-quantize-pytorch
issue 78): the commitment loss is VQ-VAE's, mean ||z - sg[q]||^2, and the entropy penalty uses
the distribution over whole codes, not over single bits:

  p_n(c) = softmax_c(-||z_n - c||^2 / temperature) over all 2^bits codes c,
  entropy_loss = mean_n H(p_n) - diversity_gamma * H(mean_n p_n),

with the codebook entropy H(mean_n p_n) taken over the global batch: under ``jax.jit`` with a
sharded batch the mean is global by itself; under ``shard_map`` set ``axis_name`` and the average
distribution is ``pmean``-ed. Since ||z - c||^2 = ||z||^2 + bits - 2 z.c, p_n factorises over
bits (p_n(bit i = 1) = sigmoid(4 z_ni / temperature)), which gives the per-sample entropy exactly
as a sum over bits; the average distribution needs every code, an [N, 2^bits] array, so keep
``entropy_weight = 0`` for very large codebooks.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq_jax.nets.quantizers import (
    Array,
    Dtype,
    QuantizerResult,
    check_indices,
    check_last_dim,
    code_histogram,
    codebook_aux,
)

_LOG_EPS = 1e-8


def lfq_codes_to_indices(codes: Array) -> Array:
    """Sign codes [..., bits] (any real values; > 0 means bit set) -> int32 indices [...]."""
    bits = codes.shape[-1]
    weights = jnp.left_shift(1, jnp.arange(bits, dtype=jnp.int32))
    return jnp.sum((codes > 0).astype(jnp.int32) * weights, axis=-1).astype(jnp.int32)


def lfq_indices_to_codes(indices: Array, bits: int) -> Array:
    """int indices [...] -> float32 codes in {-1, +1} [..., bits] (bit i of the index -> +1)."""
    shifts = jnp.arange(bits, dtype=jnp.int32)
    set_bits = jnp.bitwise_and(jnp.right_shift(indices[..., None].astype(jnp.int32), shifts), 1)
    return set_bits.astype(jnp.float32) * 2.0 - 1.0


def lfq_entropy_terms(
    z: Array, temperature: float, axis_name: str | None = None
) -> tuple[Array, Array]:
    """(mean per-sample entropy, entropy of the batch-average code distribution) for z [N, bits]."""
    z = z.astype(jnp.float32)
    bits = z.shape[-1]
    logit = 4.0 * z / temperature  # log p(bit = 1) - log p(bit = 0)
    log_p1, log_p0 = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
    p1 = jnp.exp(log_p1)
    per_bit = -(p1 * log_p1 + (1.0 - p1) * log_p0)
    sample_entropy = jnp.mean(jnp.sum(per_bit, axis=-1))
    # log p_n(c) = sum_i [bit_i(c) log p1 + (1 - bit_i(c)) log p0]: [N, bits] x [bits, K].
    code_bits = (lfq_indices_to_codes(jnp.arange(2**bits), bits) > 0).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # float32 on accelerators too (no TF32 / bf16 passes)
    log_probs = jnp.matmul(log_p1, code_bits.T, precision=hi) + jnp.matmul(
        log_p0, (1.0 - code_bits).T, precision=hi
    )
    avg_probs = jnp.mean(jnp.exp(log_probs), axis=0)
    if axis_name is not None:
        avg_probs = jax.lax.pmean(avg_probs, axis_name)
    codebook_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + _LOG_EPS))
    return sample_entropy, codebook_entropy


class LFQ(nn.Module):
    """Lookup-free quantizer over ``bits`` channels: 2^bits codes, no codebook parameters.

    loss = beta * commitment_loss + entropy_weight * entropy_loss (see the module docstring).
    """

    bits: int
    beta: float = 0.25
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0
    entropy_temperature: float = 0.01
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 30:
            raise ValueError(
                f"LFQ: bits must be an int in [1, 30] (2^bits codes, int32 indices), got "
                f"{self.bits!r}; use e.g. bits=10 for 1024 codes."
            )
        if self.entropy_weight and self.entropy_temperature <= 0:
            raise ValueError(
                f"LFQ: entropy_temperature must be > 0, got {self.entropy_temperature}; use 0.01."
            )
        super().__post_init__()

    @property
    def embed_dim(self) -> int:
        return self.bits

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., bits] -> (z_q in {-1, +1}, QuantizerResult)."""
        del train  # no state
        check_last_dim("LFQ", z, self.bits)
        z = z.astype(jnp.float32)
        q = jnp.where(z > 0, 1.0, -1.0)
        commitment_loss = jnp.mean(jnp.square(z - q))
        if self.entropy_weight:
            flat = z.reshape(-1, self.bits)
            sample_h, codebook_h = lfq_entropy_terms(flat, self.entropy_temperature, self.axis_name)
            entropy_loss = sample_h - self.diversity_gamma * codebook_h
        else:
            entropy_loss = jnp.zeros((), jnp.float32)
        loss = self.beta * commitment_loss + self.entropy_weight * entropy_loss
        z_q = z + jax.lax.stop_gradient(q - z)
        indices = lfq_codes_to_indices(q)
        counts = code_histogram(indices, self.codebook_size)
        return z_q.astype(self.dtype), QuantizerResult(
            indices=indices,
            loss=loss.astype(jnp.float32),
            aux=codebook_aux(
                counts=counts, commitment_loss=commitment_loss, entropy_loss=entropy_loss
            ),
        )

    def lookup(self, indices: Array) -> Array:
        """int indices [...] -> codes [..., bits] in {-1, +1}."""
        check_indices("LFQ", indices)
        return lfq_indices_to_codes(indices, self.bits).astype(self.dtype)


def lfq_bits(codebook_size: int) -> int | None:
    """log2(codebook_size) when it is a power of two >= 2, else None."""
    if codebook_size >= 2 and codebook_size & (codebook_size - 1) == 0:
        return int(math.log2(codebook_size))
    return None
