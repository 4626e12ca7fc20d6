"""SimVQ (Zhu et al. 2024): a frozen random codebook times a learned linear map.

The codes are E = C W with C [K, D] drawn once at init and never trained (it lives in the
``"vq_stats"`` collection, so no optimizer, weight decay included, ever touches it) and W [D, D]
a learned matrix. The nearest-code search, losses and straight-through output are VQ-VAE's on
E: codebook_loss = mean ||sg[z] - E_i||^2 (its gradient reaches W, and so every code moves
together, which keeps the whole codebook in use), commitment_loss = mean ||z - sg[E_i]||^2,
loss = codebook_loss + beta * commitment_loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vq_jax.nets.quantizers import (
    VQ_STATS,
    Array,
    Dtype,
    QuantizerResult,
    check_codebook_size,
    check_indices,
    check_last_dim,
    check_positive_int,
    code_histogram,
    codebook_aux,
    nearest_code,
)

_HIGHEST = jax.lax.Precision.HIGHEST


class SimVQ(nn.Module):
    """Codes C W: C frozen N(0, 1/D) [K, D], W learned [D, D] (initialised to the identity)."""

    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_codebook_size("SimVQ", self.codebook_size)
        check_positive_int("SimVQ", "embed_dim", self.embed_dim)
        super().__post_init__()

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    def setup(self) -> None:
        k, d = self.codebook_size, self.embed_dim
        self.frozen = self.variable(
            VQ_STATS,
            "frozen_codebook",
            lambda: jax.random.normal(self.make_rng("params"), (k, d), jnp.float32) / d**0.5,
        )
        self.proj = self.param("proj", lambda key, shape: jnp.eye(shape[0]), (d, d))

    def codes(self) -> Array:
        """The effective codebook E = C W [K, D] (float32)."""
        frozen = jax.lax.stop_gradient(self.frozen.value.astype(jnp.float32))
        return jnp.matmul(frozen, self.proj.astype(jnp.float32), precision=_HIGHEST)

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., embed_dim] -> (z_q [..., embed_dim], QuantizerResult)."""
        del train  # C never changes; W trains through the loss
        check_last_dim("SimVQ", z, self.embed_dim)
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        codes = self.codes()
        indices = nearest_code(flat, codes)
        e = jnp.take(codes, indices, axis=0)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - e))
        commitment_loss = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(e)))
        z_q = flat + jax.lax.stop_gradient(e - flat)
        counts = code_histogram(indices, self.codebook_size)
        return z_q.astype(self.dtype).reshape(z.shape), QuantizerResult(
            indices=indices.reshape(z.shape[:-1]),
            loss=(codebook_loss + self.beta * commitment_loss).astype(jnp.float32),
            aux=codebook_aux(
                counts=counts, codebook_loss=codebook_loss, commitment_loss=commitment_loss
            ),
        )

    def lookup(self, indices: Array) -> Array:
        """int indices [...] -> codes [..., embed_dim]."""
        check_indices("SimVQ", indices)
        return jnp.take(self.codes(), indices, axis=0).astype(self.dtype)
