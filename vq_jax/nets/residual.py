"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec; DAC).

Stage s quantizes what the stages before it left over:

  r_0 = z,  i_s = argmin_k ||r_s - e^s_k||^2,  r_{s+1} = r_s - e^s_{i_s},  z_q = sum_s e^s_{i_s}

with ``depth`` stages, each with its own codebook or one codebook shared by all stages. Indices
have a trailing depth axis: [..., depth], stage 0 first. Codebooks train by gradient, as in
VQ-VAE: per stage, codebook_loss = mean ||sg[r_s] - e||^2 and commitment_loss =
mean ||r_s - sg[e]||^2, averaged over the stages used; loss = codebook_loss + beta *
commitment_loss. z_q passes gradients straight through to z.

Quantizer dropout (``dropout > 0``, training only, needs ``rngs={"dropout": key}``): each example
(first axis of z) draws, with probability ``dropout``, a number of stages n uniform in
[1, depth] and is reconstructed from its first n stages only, so that fewer stages still decode
(bitrate scalability). Its indices past n are still the nearest codes of the residual.
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
    nearest_code,
)


class ResidualVQ(nn.Module):
    """``depth`` VQ stages on the residual; indices [..., depth]."""

    codebook_size: int
    embed_dim: int
    depth: int = 2
    shared_codebook: bool = False
    beta: float = 0.25
    dropout: float = 0.0
    codebook_init: str = "variance_scaling"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_codebook_size("ResidualVQ", self.codebook_size)
        check_positive_int("ResidualVQ", "embed_dim", self.embed_dim)
        check_positive_int("ResidualVQ", "depth", self.depth)
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"ResidualVQ: dropout must be in [0, 1], got {self.dropout}.")
        check_codebook_init("ResidualVQ", self.codebook_init)
        super().__post_init__()

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (self.depth,)

    def setup(self) -> None:
        init = codebook_initializer(self.codebook_init, self.codebook_size)
        k, d = self.codebook_size, self.embed_dim
        if self.shared_codebook:
            self.codebooks = self.param("codebook", init, (k, d), jnp.float32)
        else:
            # One initializer call per stage so each stage's codebook has the fan-in scaling of
            # a [K, D] codebook.
            self.codebooks = self.param(
                "codebooks",
                lambda key, shape: jnp.stack(
                    [init(sk, shape[1:], jnp.float32) for sk in jax.random.split(key, shape[0])]
                ),
                (self.depth, k, d),
            )

    def _codebook(self, stage: int) -> Array:
        cb = self.codebooks if self.shared_codebook else self.codebooks[stage]
        return jnp.asarray(cb, jnp.float32)

    def _stage_mask(self, batch_shape: tuple[int, ...], train: bool) -> Array | None:
        """[*batch_shape, depth] float mask of the stages used, or None (all stages)."""
        if not (train and self.dropout > 0) or self.is_initializing() or not batch_shape:
            return None
        if not self.has_rng("dropout"):
            raise ValueError(
                "ResidualVQ with dropout > 0 needs an rng stream when training; pass "
                "rngs={'dropout': key} to apply()."
            )
        k_drop, k_num = jax.random.split(self.make_rng("dropout"))
        b = batch_shape[0]
        dropped = jax.random.bernoulli(k_drop, self.dropout, (b,))
        num = jnp.where(dropped, jax.random.randint(k_num, (b,), 1, self.depth + 1), self.depth)
        mask = (jnp.arange(self.depth)[None, :] < num[:, None]).astype(jnp.float32)
        mask = mask.reshape(b, *([1] * (len(batch_shape) - 1)), self.depth)
        return jnp.broadcast_to(mask, (*batch_shape, self.depth))

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., embed_dim] -> (z_q [..., embed_dim], indices [..., depth])."""
        check_last_dim("ResidualVQ", z, self.embed_dim)
        batch_shape = z.shape[:-1]
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        mask = self._stage_mask(batch_shape, train)
        mask = (
            jnp.ones((flat.shape[0], self.depth)) if mask is None else mask.reshape(-1, self.depth)
        )
        residual = flat
        quantized = jnp.zeros_like(flat)
        indices, cb_terms, commit_terms = [], [], []
        for s in range(self.depth):
            codes = self._codebook(s)
            idx = nearest_code(residual, codes)
            e = jnp.take(codes, idx, axis=0)
            m = mask[:, s : s + 1]
            cb_terms.append(jnp.sum(m * jnp.square(jax.lax.stop_gradient(residual) - e)))
            commit_terms.append(jnp.sum(m * jnp.square(residual - jax.lax.stop_gradient(e))))
            quantized = quantized + m * e
            residual = residual - jax.lax.stop_gradient(e)
            indices.append(idx)
        used = jnp.maximum(jnp.sum(mask) * self.embed_dim, 1.0)
        codebook_loss = sum(cb_terms) / used
        commitment_loss = sum(commit_terms) / used
        loss = codebook_loss + self.beta * commitment_loss
        z_q = flat + jax.lax.stop_gradient(quantized - flat)
        indices = jnp.stack(indices, axis=-1).astype(jnp.int32)
        counts = code_histogram(indices, self.codebook_size)
        return z_q.astype(self.dtype).reshape(z.shape), QuantizerResult(
            indices=indices.reshape(*batch_shape, self.depth),
            loss=loss.astype(jnp.float32),
            aux=codebook_aux(
                counts=counts, codebook_loss=codebook_loss, commitment_loss=commitment_loss
            ),
        )

    def lookup(self, indices: Array) -> Array:
        """Indices [..., depth] -> the sum of the stages' codes [..., embed_dim]."""
        check_indices("ResidualVQ", indices)
        if indices.ndim < 1 or indices.shape[-1] != self.depth:
            raise ValueError(
                f"ResidualVQ.lookup expects indices [..., depth={self.depth}], got shape "
                f"{tuple(indices.shape)}; keep the trailing depth axis."
            )
        out = sum(jnp.take(self._codebook(s), indices[..., s], axis=0) for s in range(self.depth))
        return out.astype(self.dtype)
