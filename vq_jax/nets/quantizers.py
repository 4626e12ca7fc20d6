"""Vector quantizers: the interface, VQ-VAE codebook, EMA codebook (with dead-code restarts), FSQ.

Every quantizer implements :class:`Quantizer`, so the autoencoder can swap them freely::

    variables = q.init({"params": key}, z)                # z: [..., embed_dim]
    z_q, result = q.apply(variables, z, train=False)      # z_q: z.shape, straight-through grads
    vectors = q.apply(variables, indices, method="lookup")

``result`` is a :class:`QuantizerResult`: ``indices`` of shape ``z.shape[:-1] + q.index_shape``,
the ``loss`` to add to the generator loss, and an open dict ``aux`` of scalar measurements that
the train step reports as they are. Non-trainable statistics (EMA codebook, usage counts) live in
the ``"vq_stats"`` collection and are updated only with ``train=True`` and
``mutable=["vq_stats"]``. Distances are computed in float32; above ``BLOCKED_SEARCH_ABOVE`` codes
the nearest-code search runs over blocks of codes (:func:`nearest_code`), never an [N, K] matrix.
Other kinds live in their own modules (lfq.py, residual.py, simvq.py, ibq.py); the names the
config can choose are registered in quantizer_registry.py.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vq_jax.nets import kernels

Array = jax.Array
Dtype = Any

VQ_STATS = "vq_stats"
"""Name of the non-param collection holding codebook statistics."""

_HIGHEST = jax.lax.Precision.HIGHEST
_LOG_EPS = 1e-8  # keeps log() finite for empty histogram bins / zero average probabilities
_NORM_EPS = 1e-12
_FSQ_BOUND_EPS = 1e-3  # keeps tanh bounds strictly inside the outermost rounding interval
CODEBOOK_INITS = ("uniform", "normal", "variance_scaling")


@flax.struct.dataclass
class QuantizerResult:
    """What a quantizer call returns besides z_q.

    ``indices``: int32, ``z.shape[:-1] + index_shape`` (FSQ: the flat mixed-radix index; residual
    VQ: one index per stage on a trailing depth axis). ``loss``: the total weighted quantizer loss
    to add to the generator loss. ``aux``: scalar float32 measurements, reported by the train step
    under their own names; every kind gives ``perplexity`` (exp(entropy of the batch code
    histogram)) and ``usage`` (fraction of codes used in the batch), the codebook kinds also
    ``codebook_loss`` / ``commitment_loss`` (unweighted) / ``entropy_loss``. ``result.name``
    reads ``aux[name]``.
    """

    indices: Array
    loss: Array
    aux: dict[str, Array] = flax.struct.field(default_factory=dict)

    def __getattr__(self, name: str) -> Array:
        try:
            aux = object.__getattribute__(self, "aux")
        except AttributeError:
            raise AttributeError(name) from None
        if name in aux:
            return aux[name]
        raise AttributeError(
            f"QuantizerResult has no {name!r}; its measurements are {sorted(aux)}."
        )


@runtime_checkable
class Quantizer(Protocol):
    """The interface every quantizer kind implements (a Flax module).

    ``codebook_size``: the number of values one index takes. ``embed_dim``: the width of the
    vectors it quantizes (the autoencoder projects to it). ``index_shape``: the trailing shape of
    the indices at each position: () for one token per position, (depth,) for residual VQ.
    """

    @property
    def codebook_size(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def index_shape(self) -> tuple[int, ...]: ...

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]: ...

    def lookup(self, indices: Array) -> Array: ...


def codebook_aux(
    *,
    counts: Array,
    codebook_loss: Array | None = None,
    commitment_loss: Array | None = None,
    entropy_loss: Array | None = None,
) -> dict[str, Array]:
    """The measurements the codebook kinds share: the loss terms (0 where absent) and the
    perplexity / usage of the code histogram ``counts``."""
    perplexity, usage = histogram_stats(counts)
    zero = _zero()
    return {
        "codebook_loss": zero if codebook_loss is None else codebook_loss.astype(jnp.float32),
        "commitment_loss": zero if commitment_loss is None else commitment_loss.astype(jnp.float32),
        "entropy_loss": zero if entropy_loss is None else entropy_loss.astype(jnp.float32),
        "perplexity": perplexity,
        "usage": usage,
    }


# --------------------------------------------------------------------------------------------------
# Validation helpers.


def check_codebook_size(owner: str, codebook_size: Any) -> None:
    if not isinstance(codebook_size, int | np.integer) or codebook_size < 2:
        raise ValueError(
            f"{owner}: codebook_size must be an int >= 2, got {codebook_size!r}; "
            "set codebook_size to the number of codes (e.g. 512)."
        )


def check_positive_int(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{owner}: {field} must be a positive int, got {value!r}; fix {field}.")


def check_last_dim(owner: str, z: Array, embed_dim: int) -> None:
    if z.ndim < 1 or z.shape[-1] != embed_dim:
        raise ValueError(
            f"{owner} expects z of shape [..., embed_dim={embed_dim}], "
            f"got z.shape={tuple(z.shape)}; project the encoder output to {embed_dim} channels "
            "or change embed_dim."
        )


def check_codebook_init(owner: str, init: str) -> None:
    if init not in CODEBOOK_INITS:
        raise ValueError(
            f"{owner}: unknown codebook_init {init!r}; use one of "
            f"{', '.join(map(repr, CODEBOOK_INITS))}."
        )


def check_indices(owner: str, indices: Array) -> None:
    if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
        raise ValueError(
            f"{owner}.lookup expects integer code indices, got dtype {jnp.asarray(indices).dtype}; "
            "cast the indices with .astype(jnp.int32)."
        )


# --------------------------------------------------------------------------------------------------
# Pure building blocks (exported for tests and for reuse).


def codebook_initializer(kind: str, codebook_size: int) -> Callable[..., Array]:
    """Initializer for a [K, D] codebook.

    'uniform': U(-1/K, 1/K) (taming-style); 'normal': N(0, 1); 'variance_scaling':
    U(-sqrt(3/D), sqrt(3/D)), i.e. fan-in over the code dimension (sonnet-style).
    """
    if kind == "uniform":
        scale = 1.0 / codebook_size
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, minval=-scale, maxval=scale
        )
    if kind == "normal":
        return nn.initializers.normal(stddev=1.0)
    if kind == "variance_scaling":
        return nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)
    raise ValueError(
        f"unknown codebook init {kind!r}; use one of {', '.join(map(repr, CODEBOOK_INITS))}."
    )


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """Scale vectors to unit L2 norm (zero vectors stay zero)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def squared_distances(x: Array, codebook: Array) -> Array:
    """||x_n - e_k||^2 for x [N, D] and codebook [K, D] as one float32 matmul -> [N, K]."""
    x = x.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    cross = jnp.matmul(x, codebook.T, precision=_HIGHEST)
    return (
        jnp.sum(jnp.square(x), axis=-1, keepdims=True)
        - 2.0 * cross
        + jnp.sum(jnp.square(codebook), axis=-1)[None, :]
    )


BLOCKED_SEARCH_ABOVE = 4096
"""Codebooks with more codes than this are searched in blocks on every platform
(:func:`nearest_code`); below it accelerators take one [N, K] matmul and argmin."""
CPU_SEARCH_ABOVE = 128
"""On CPU, codebooks with more codes than this are searched in blocks, or by the installed
search kernel: XLA:CPU's [N, K] argmin is already 2-8x slower at K = 256...4096
(BENCHMARKS.md section 3d)."""
SEARCH_BLOCK = 2048
"""Codes per block of the blocked search."""
SEARCH_ROWS = 128
"""Vectors per tile of the blocked search: the scratch is [SEARCH_ROWS, SEARCH_BLOCK] floats."""


def exhaustive_nearest_code(x: Array, codebook: Array) -> Array:
    """argmin_k ||x_n - e_k||^2 over the whole [N, K] distance matrix -> int32 [N]."""
    return jnp.argmin(squared_distances(x, codebook), axis=-1).astype(jnp.int32)


def blocked_nearest_code(
    x: Array, codebook: Array, block: int = SEARCH_BLOCK, rows: int = SEARCH_ROWS
) -> Array:
    """The same indices as :func:`exhaustive_nearest_code`, in O(rows * block) scratch.

    Tiles of ``rows`` vectors (a sequential map) each scan the codebook in blocks of ``block``
    codes, keeping the running minimum distance and its index; a block replaces it only when
    strictly smaller, and inside a block the first index holding the minimum is taken, so ties
    go to the lowest index, as with one argmin. Each distance is the same float32 expression as in
    :func:`squared_distances`. The codebook is padded to a multiple of ``block`` with codes at
    infinite distance, x to a multiple of ``rows`` with zero rows (dropped from the result).
    The tile of distances stays small enough for the CPU caches, which is where the speed over
    the exhaustive search comes from (BENCHMARKS.md section 3).
    """
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    codebook = jax.lax.stop_gradient(codebook.astype(jnp.float32))
    k, d = codebook.shape
    n = x.shape[0]
    block = max(1, min(int(block), k))
    rows = max(1, min(int(rows), n))
    num_blocks, num_tiles = -(-k // block), -(-n // rows)
    code_sq = jnp.sum(jnp.square(codebook), axis=-1)
    pad = num_blocks * block - k
    if pad:
        codebook = jnp.concatenate([codebook, jnp.zeros((pad, d), codebook.dtype)])
        code_sq = jnp.concatenate([code_sq, jnp.full((pad,), jnp.inf, code_sq.dtype)])
    if num_tiles * rows - n:
        x = jnp.concatenate([x, jnp.zeros((num_tiles * rows - n, d), x.dtype)])
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
    lanes = jnp.arange(block, dtype=jnp.int32)[None, :]
    blocks = (codebook.reshape(num_blocks, block, d), code_sq.reshape(num_blocks, block), starts)

    def search_tile(xt: Array) -> Array:
        x_sq = jnp.sum(jnp.square(xt), axis=-1, keepdims=True)

        def body(carry, xs):
            best_d, best_i = carry
            codes, sq, start = xs
            dist = x_sq - 2.0 * jnp.matmul(xt, codes.T, precision=_HIGHEST) + sq[None, :]
            # argmin as two plain min-reductions (the first index holding the minimum): the
            # same index, and faster on XLA:CPU than its variadic argmin reduction
            m = jnp.min(dist, axis=-1)
            i = jnp.min(jnp.where(dist == m[:, None], lanes, block), axis=-1)
            better = m < best_d
            return (jnp.where(better, m, best_d), jnp.where(better, i + start, best_i)), None

        init = (jnp.full((rows,), jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32))
        (_, best_i), _ = jax.lax.scan(body, init, blocks)
        return best_i

    return jax.lax.map(search_tile, x.reshape(num_tiles, rows, d)).reshape(-1)[:n]


def xla_nearest_code(x: Array, codebook: Array) -> Array:
    """XLA's search for this codebook size and platform: exhaustive up to ``CPU_SEARCH_ABOVE``
    codes, blocked above ``BLOCKED_SEARCH_ABOVE``, and in between blocked on CPU, exhaustive
    on accelerators (one matmul and argmin suit them)."""
    k = codebook.shape[0]
    if k <= CPU_SEARCH_ABOVE:
        return exhaustive_nearest_code(x, codebook)
    if k > BLOCKED_SEARCH_ABOVE:
        return blocked_nearest_code(x, codebook)
    return jax.lax.platform_dependent(
        x, codebook, cpu=blocked_nearest_code, default=exhaustive_nearest_code
    )


def nearest_code(x: Array, codebook: Array, *, blocked: bool | None = None) -> Array:
    """Index of the nearest code (squared L2) of each row of x [N, D] in codebook [K, D].

    ``blocked=None`` chooses: above ``CPU_SEARCH_ABOVE`` codes the installed search kernel
    (``vq_jax.cpu.enable`` installs a native CPU one), else :func:`xla_nearest_code`.
    ``blocked=True`` / ``False`` force the blocked / exhaustive search. All give the same
    indices.
    """
    if blocked is None:
        kernel = kernels.current().nearest_code
        if kernel is not None and codebook.shape[0] > CPU_SEARCH_ABOVE:
            return kernel(x, codebook)
        return xla_nearest_code(x, codebook)
    if blocked:
        return blocked_nearest_code(x, codebook)
    return exhaustive_nearest_code(x, codebook)


def code_sums(x: Array, indices: Array, codebook_size: int, block: int = SEARCH_BLOCK) -> Array:
    """sum_{n: indices_n = k} x_n for every code k -> [codebook_size, D] (float32).

    A one-hot matmul (deterministic, unlike a scatter-add on accelerators); above
    ``BLOCKED_SEARCH_ABOVE`` codes one block of ``block`` codes at a time, so the one-hot
    scratch is [N, block], not [N, K].
    """
    x = x.astype(jnp.float32)
    if codebook_size <= BLOCKED_SEARCH_ABOVE:
        onehot = jax.nn.one_hot(indices, codebook_size, dtype=jnp.float32)
        return jnp.matmul(onehot.T, x, precision=_HIGHEST)
    num_blocks = -(-codebook_size // block)

    def one_block(start: Array) -> Array:
        onehot = jax.nn.one_hot(indices - start, block, dtype=jnp.float32)  # out of range: 0
        return jnp.matmul(onehot.T, x, precision=_HIGHEST)

    starts = jnp.arange(num_blocks, dtype=indices.dtype) * block
    sums = jax.lax.map(one_block, starts).reshape(num_blocks * block, x.shape[-1])
    return sums[:codebook_size]


def code_histogram(indices: Array, codebook_size: int, mask: Array | None = None) -> Array:
    """Counts of each code in ``indices`` (any shape), float32 [codebook_size]: the quantizers'
    batch statistics and the evaluation's (vq_jax.metrics).

    ``mask`` (same shape as ``indices``, bool or float) weights each position, e.g. to ignore
    padding. Indices outside [0, codebook_size) are dropped.
    """
    indices = jnp.asarray(indices).astype(jnp.int32).reshape(-1)
    if mask is None:
        weights = jnp.ones(indices.shape, jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.size != indices.size:
            raise ValueError(
                f"code_histogram mask has {mask.size} elements but indices have {indices.size}; "
                "pass a mask with the same shape as indices"
            )
        weights = mask.astype(jnp.float32).reshape(-1)
    return jax.ops.segment_sum(weights, indices, num_segments=codebook_size)


def histogram_stats(counts: Array) -> tuple[Array, Array]:
    """(perplexity, usage) of a code histogram: exp(entropy of counts / sum) and the fraction of
    non-empty bins; an all-zero histogram gives (1, 0)."""
    counts = jax.lax.stop_gradient(jnp.asarray(counts, jnp.float32))
    probs = counts / jnp.maximum(jnp.sum(counts), 1e-12)
    entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs))
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    return jnp.exp(entropy), usage


def entropy_regularizer(distances: Array, temperature: float) -> Array:
    """MaskGIT-style entropy loss from [N, K] distances.

    With p = softmax(-distances / temperature) per position, returns
    mean_n H(p_n) - H(mean_n p_n): low per-position entropy (confident assignments) and high
    entropy of the average assignment (all codes used).
    """
    logits = -distances.astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    sample_entropy = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + _LOG_EPS))
    return sample_entropy - avg_entropy


def sample_vectors(key: Array, candidates: Array, num: int) -> Array:
    """Draw ``num`` rows of ``candidates`` [N, D] uniformly at random.

    Without replacement when N >= num (distinct restarts), with replacement otherwise.
    """
    n = candidates.shape[0]
    if n == 0:
        raise ValueError("sample_vectors needs at least one candidate row; pass a non-empty batch.")
    if n >= num:
        rows = jax.random.choice(key, n, shape=(num,), replace=False)
    else:
        rows = jax.random.randint(key, (num,), 0, n)
    return jnp.take(candidates, rows, axis=0)


def replace_dead_codes(
    codebook: Array, cluster_size: Array, candidates: Array, threshold: float
) -> tuple[Array, Array]:
    """Replace codes whose EMA cluster size is below ``threshold`` by ``candidates``.

    Args:
      codebook: [K, D] codes.
      cluster_size: [K] EMA usage counts.
      candidates: [K, D] replacement vectors; row k replaces code k if it is dead.
      threshold: codes with cluster_size < threshold are dead.

    Returns:
      (new_codebook, dead_mask): live rows are returned unchanged (bit-identical).
    """
    if candidates.shape != codebook.shape:
        raise ValueError(
            f"replace_dead_codes: candidates.shape={tuple(candidates.shape)} must equal "
            f"codebook.shape={tuple(codebook.shape)}; sample one candidate per code "
            "(sample_vectors(key, batch, codebook.shape[0]))."
        )
    dead = cluster_size < threshold
    new_codebook = jnp.where(dead[:, None], candidates.astype(codebook.dtype), codebook)
    return new_codebook, dead


def _zero() -> Array:
    return jnp.zeros((), jnp.float32)


# --------------------------------------------------------------------------------------------------
# VQ-VAE quantizer with a learned codebook.


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a gradient-trained codebook (van den Oord 2017).

    loss = codebook_loss + beta * commitment_loss + entropy_weight * entropy_loss, with
    codebook_loss = mean((sg[z] - e)^2) and commitment_loss = mean((z - sg[e])^2).

    Options: ``l2_normalize`` (cosine codes: z and codes are unit-normalised and the normalised
    vectors are the output), ``lookup_dim`` (ViT-VQGAN factorised codes: z is projected to
    lookup_dim before lookup and back after; the codebook and losses live in lookup space),
    ``entropy_weight`` (MaskGIT entropy regulariser). With ``train=True`` and a mutable
    ``"vq_stats"`` collection an EMA of per-code usage is kept in ``vq_stats/cluster_size``.
    """

    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    l2_normalize: bool = False
    lookup_dim: int | None = None
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    codebook_init: str = "uniform"
    usage_decay: float = 0.99
    search: str = "auto"  # nearest-code search: auto (nearest_code's choice by size, platform
    # and installed kernel), blocked or exhaustive; the same indices either way
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_codebook_size(type(self).__name__, self.codebook_size)
        check_positive_int(type(self).__name__, "embed_dim", self.embed_dim)
        if self.lookup_dim is not None:
            check_positive_int(type(self).__name__, "lookup_dim", self.lookup_dim)
        if self.search not in ("auto", "blocked", "exhaustive"):
            raise ValueError(
                f"VectorQuantizer: search={self.search!r}; use 'auto', 'blocked' or 'exhaustive'."
            )
        check_codebook_init("VectorQuantizer", self.codebook_init)
        if self.entropy_weight and self.entropy_temperature <= 0:
            raise ValueError(
                f"VectorQuantizer: entropy_temperature must be > 0, got "
                f"{self.entropy_temperature}; use e.g. 0.01."
            )
        super().__post_init__()

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def code_dim(self) -> int:
        """Dimension of the codebook vectors (lookup_dim if factorised, else embed_dim)."""
        return self.lookup_dim if self.lookup_dim is not None else self.embed_dim

    def setup(self) -> None:
        self.codebook = self.param(
            "codebook",
            codebook_initializer(self.codebook_init, self.codebook_size),
            (self.codebook_size, self.code_dim),
            self.param_dtype,
        )
        if self.lookup_dim is not None:
            self.proj_in = nn.Dense(self.lookup_dim, dtype=self.dtype, param_dtype=self.param_dtype)
            self.proj_out = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        # Usage statistics are optional: declared when present or when they can be created, so
        # apply({"params": ...}) without a "vq_stats" collection still works.
        if self.has_variable(VQ_STATS, "cluster_size") or self.is_mutable_collection(VQ_STATS):
            self.cluster_size = self.variable(
                VQ_STATS, "cluster_size", jnp.zeros, (self.codebook_size,), jnp.float32
            )
        else:
            self.cluster_size = None

    def _codes(self) -> Array:
        codes = jnp.asarray(self.codebook, jnp.float32)
        return l2_normalize(codes) if self.l2_normalize else codes

    def _to_lookup(self, flat: Array) -> Array:
        x = self.proj_in(flat) if self.lookup_dim is not None else flat
        x = x.astype(jnp.float32)
        return l2_normalize(x) if self.l2_normalize else x

    def _from_lookup(self, x: Array) -> Array:
        if self.lookup_dim is not None:
            x = self.proj_out(x)
        return x.astype(self.dtype)

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., embed_dim] -> (z_q [..., embed_dim], QuantizerResult)."""
        check_last_dim(type(self).__name__, z, self.embed_dim)
        batch_shape = z.shape[:-1]
        x = self._to_lookup(z.reshape(-1, self.embed_dim))
        codes = self._codes()
        if self.entropy_weight:  # the regulariser needs every distance
            distances = squared_distances(x, codes)
            indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
            entropy_loss = entropy_regularizer(distances, self.entropy_temperature)
        else:
            blocked = {"auto": None, "blocked": True, "exhaustive": False}[self.search]
            indices = nearest_code(x, codes, blocked=blocked)
            entropy_loss = _zero()
        e = jnp.take(codes, indices, axis=0)

        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(x) - e))
        commitment_loss = jnp.mean(jnp.square(x - jax.lax.stop_gradient(e)))
        loss = (
            codebook_loss + self.beta * commitment_loss + self.entropy_weight * entropy_loss
        ).astype(jnp.float32)

        x_q = x + jax.lax.stop_gradient(e - x)  # straight-through estimator
        z_q = self._from_lookup(x_q).reshape(*batch_shape, self.embed_dim)

        counts = code_histogram(indices, self.codebook_size)
        if (
            train
            and self.cluster_size is not None
            and self.is_mutable_collection(VQ_STATS)
            and not self.is_initializing()
        ):
            d = self.usage_decay
            self.cluster_size.value = d * self.cluster_size.value + (1.0 - d) * counts
        return z_q, QuantizerResult(
            indices=indices.reshape(batch_shape),
            loss=loss,
            aux=codebook_aux(
                counts=counts,
                codebook_loss=codebook_loss,
                commitment_loss=commitment_loss,
                entropy_loss=entropy_loss,
            ),
        )

    def lookup(self, indices: Array) -> Array:
        """Code vectors in embed_dim space for integer ``indices`` [...] -> [..., embed_dim]."""
        check_indices(type(self).__name__, indices)
        e = jnp.take(self._codes(), indices.reshape(-1), axis=0)
        return self._from_lookup(e).reshape(*indices.shape, self.embed_dim)


# --------------------------------------------------------------------------------------------------
# EMA codebook (sonnet VectorQuantizerEMA) with optional dead-code restarts.


class EMAVectorQuantizer(nn.Module):
    """Vector quantizer whose codebook is an EMA of assigned encoder outputs (no codebook grads).

    ``"vq_stats"`` holds ``codebook`` [K, D], ``cluster_size`` [K] and ``embed_sum`` [K, D].
    With ``train=True`` and ``mutable=["vq_stats"]``:
      cluster_size <- decay * cluster_size + (1 - decay) * counts
      embed_sum    <- decay * embed_sum + (1 - decay) * onehot^T z
      codebook     <- embed_sum / laplace(cluster_size)
    The forward output uses the pre-update codebook. loss = beta * commitment_loss.

    Initial state: ``embed_sum = codebook`` and ``cluster_size = 1`` (sonnet starts from 0), so
    that codebook == embed_sum / cluster_size from the start; with zeros a code unused at the
    first step would be divided by ~epsilon and thrown far away from the data.

    Counts and sums are global: automatic under ``jax.jit`` with a sharded batch; under
    ``shard_map``/``pmap`` set ``axis_name`` and they are psum-ed so every device holds the same
    codebook (the returned losses stay per-shard means; average them like other losses).

    Dead-code restart (``dead_code_threshold > 0``, needs ``rngs={"dead_codes": key}``): codes
    whose updated cluster_size < threshold are set to encoder outputs sampled uniformly from the
    (global) batch, with cluster_size = threshold and embed_sum = threshold * new code, i.e. the
    state of a code that received ``threshold`` assignments per step at that vector; it survives
    if it keeps receiving at least ``threshold`` assignments per step on average, and is
    resampled otherwise. The number of restarts is sown into ``intermediates/num_restarted``.
    """

    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 0.0
    axis_name: str | None = None
    codebook_init: str = "variance_scaling"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_codebook_size(type(self).__name__, self.codebook_size)
        check_positive_int(type(self).__name__, "embed_dim", self.embed_dim)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"EMAVectorQuantizer: decay must be in [0, 1), got {self.decay}.")
        if self.dead_code_threshold < 0:
            raise ValueError(
                "EMAVectorQuantizer: dead_code_threshold must be >= 0 (0 disables restarts), "
                f"got {self.dead_code_threshold}."
            )
        check_codebook_init("EMAVectorQuantizer", self.codebook_init)
        super().__post_init__()

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    def setup(self) -> None:
        shape = (self.codebook_size, self.embed_dim)
        init_fn = codebook_initializer(self.codebook_init, self.codebook_size)
        self.codebook = self.variable(
            VQ_STATS, "codebook", lambda: init_fn(self.make_rng("params"), shape, jnp.float32)
        )
        self.cluster_size = self.variable(
            VQ_STATS, "cluster_size", lambda: jnp.ones((self.codebook_size,), jnp.float32)
        )
        self.embed_sum = self.variable(
            VQ_STATS, "embed_sum", lambda: jnp.array(self.codebook.value)
        )

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., embed_dim] -> (z_q [..., embed_dim], QuantizerResult)."""
        check_last_dim(type(self).__name__, z, self.embed_dim)
        batch_shape = z.shape[:-1]
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        codes = jax.lax.stop_gradient(self.codebook.value.astype(jnp.float32))
        indices = nearest_code(flat, codes)
        e = jnp.take(codes, indices, axis=0)
        commitment_loss = jnp.mean(jnp.square(flat - e))
        z_q = (flat + jax.lax.stop_gradient(e - flat)).astype(self.dtype)

        counts = code_histogram(indices, self.codebook_size)
        if self.axis_name is not None:
            counts = jax.lax.psum(counts, self.axis_name)
        num_restarted = jnp.zeros((), jnp.int32)
        if train and self.is_mutable_collection(VQ_STATS) and not self.is_initializing():
            num_restarted = self._update(jax.lax.stop_gradient(flat), indices, counts)
        aux = codebook_aux(counts=counts, commitment_loss=commitment_loss)
        if self.dead_code_threshold > 0:
            aux["num_restarted"] = num_restarted.astype(jnp.float32)
        return z_q.reshape(*batch_shape, self.embed_dim), QuantizerResult(
            indices=indices.reshape(batch_shape), loss=self.beta * commitment_loss, aux=aux
        )

    def _update(self, flat: Array, indices: Array, counts: Array) -> Array:
        """The EMA update of the codebook statistics; returns the number of restarted codes."""
        k = self.codebook_size
        embed_batch = code_sums(flat, indices, k)
        if self.axis_name is not None:
            embed_batch = jax.lax.psum(embed_batch, self.axis_name)
        d = self.decay
        cluster_size = d * self.cluster_size.value + (1.0 - d) * counts
        embed_sum = d * self.embed_sum.value + (1.0 - d) * embed_batch
        n = jnp.sum(cluster_size)
        smoothed = (cluster_size + self.epsilon) / (n + k * self.epsilon) * n
        codebook = embed_sum / smoothed[:, None]

        if self.dead_code_threshold > 0:
            if not self.has_rng("dead_codes"):
                raise ValueError(
                    "EMAVectorQuantizer with dead_code_threshold > 0 needs an rng stream for "
                    "restarts; pass rngs={'dead_codes': key} to apply()."
                )
            candidates = flat
            if self.axis_name is not None:
                candidates = jax.lax.all_gather(flat, self.axis_name, tiled=True)
            sampled = sample_vectors(self.make_rng("dead_codes"), candidates, k)
            codebook, dead = replace_dead_codes(
                codebook, cluster_size, sampled, self.dead_code_threshold
            )
            cluster_size = jnp.where(dead, jnp.float32(self.dead_code_threshold), cluster_size)
            embed_sum = jnp.where(dead[:, None], codebook * self.dead_code_threshold, embed_sum)
            num_restarted = jnp.sum(dead.astype(jnp.int32))
            self.sow("intermediates", "num_restarted", num_restarted)
        else:
            num_restarted = jnp.zeros((), jnp.int32)

        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self.codebook.value = codebook
        return num_restarted

    def lookup(self, indices: Array) -> Array:
        """Code vectors for integer ``indices`` [...] -> [..., embed_dim]."""
        check_indices(type(self).__name__, indices)
        e = jnp.take(self.codebook.value.astype(jnp.float32), indices.reshape(-1), axis=0)
        return e.astype(self.dtype).reshape(*indices.shape, self.embed_dim)


# --------------------------------------------------------------------------------------------------
# Finite scalar quantization.


def _validate_levels(levels: Any) -> tuple[int, ...]:
    try:
        levels = tuple(levels)
    except TypeError:
        levels = None
    if (
        not levels
        or not all(isinstance(lv, int | np.integer) and not isinstance(lv, bool) for lv in levels)
        or min(levels) < 2
    ):
        raise ValueError(
            f"FSQ: levels must be a non-empty tuple of ints >= 2, got {levels!r}; "
            "use e.g. levels=(8, 5, 5, 5)."
        )
    levels = tuple(int(lv) for lv in levels)
    if math.prod(levels) >= 2**31:
        raise ValueError(
            f"FSQ: prod(levels)={math.prod(levels)} does not fit int32 indices; use fewer levels."
        )
    return levels


def _fsq_consts(levels: Sequence[int]) -> tuple[Array, Array, Array]:
    lv = np.asarray(levels, np.float64)
    half_width = np.floor(lv / 2.0)
    basis = np.concatenate([[1], np.cumprod(np.asarray(levels, np.int64))[:-1]])
    return (
        jnp.asarray(lv, jnp.float32),
        jnp.asarray(half_width, jnp.float32),
        jnp.asarray(basis, jnp.int32),
    )


def fsq_bound(z: Array, levels: Sequence[int]) -> Array:
    """Squash z [..., len(levels)] so that rounding yields exactly levels[i] values per channel.

    Odd L: values in (-(L-1)/2, (L-1)/2). Even L: shifted by a half so the rounded grid is
    {-L/2, ..., L/2 - 1} and z = 0 still maps to 0 (for L >= 4; L = 2 is symmetric around z = 0).
    """
    lv, _, _ = _fsq_consts(levels)
    half_l = (lv - 1.0) * (1.0 - _FSQ_BOUND_EPS) / 2.0
    offset = jnp.where(jnp.mod(lv, 2.0) == 0.0, 0.5, 0.0)
    # arctanh(offset / half_l) maps z = 0 to exactly 0; L = 2 has no interior 0 (offset > half_l),
    # so it uses no shift and z = 0 sits on the decision boundary between its two values.
    ratio = offset / half_l
    shift = jnp.where(ratio < 1.0, jnp.arctanh(jnp.minimum(ratio, 0.5)), 0.0)
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset


def fsq_codes_to_indices(codes: Array, levels: Sequence[int]) -> Array:
    """Normalised FSQ codes [..., len(levels)] -> flat mixed-radix int32 indices [...]."""
    _, half_width, basis = _fsq_consts(levels)
    digits = jnp.round(codes.astype(jnp.float32) * half_width + half_width).astype(jnp.int32)
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)


def fsq_indices_to_codes(indices: Array, levels: Sequence[int]) -> Array:
    """Flat int indices [...] -> normalised float32 FSQ codes [..., len(levels)] in [-1, 1]."""
    lv, half_width, basis = _fsq_consts(levels)
    digits = (indices[..., None].astype(jnp.int32) // basis) % lv.astype(jnp.int32)
    return (digits.astype(jnp.float32) - half_width) / half_width


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): per-channel bounded rounding.

    embed_dim = len(levels), codebook_size = prod(levels). Each channel is squashed with a tanh
    bound, rounded with a straight-through estimator and scaled to [-1, 1]. No parameters and
    no auxiliary losses (all loss terms are 0).
    """

    levels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", _validate_levels(self.levels))
        super().__post_init__()

    @property
    def embed_dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def index_shape(self) -> tuple[int, ...]:
        return ()

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, QuantizerResult]:
        """Quantize z [..., len(levels)] -> (z_q on the level grid, QuantizerResult)."""
        del train  # FSQ has no state
        check_last_dim("FSQ", z, self.embed_dim)
        _, half_width, _ = _fsq_consts(self.levels)
        bounded = fsq_bound(z, self.levels)
        rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
        codes = rounded / half_width
        indices = fsq_codes_to_indices(jax.lax.stop_gradient(codes), self.levels)
        counts = code_histogram(indices, self.codebook_size)
        return codes.astype(self.dtype), QuantizerResult(
            indices=indices, loss=_zero(), aux=codebook_aux(counts=counts)
        )

    def codes_to_indices(self, codes: Array) -> Array:
        """Normalised codes [..., embed_dim] -> flat int32 indices [...]."""
        return fsq_codes_to_indices(codes, self.levels)

    def indices_to_codes(self, indices: Array) -> Array:
        """Flat indices [...] -> codes [..., embed_dim] in the module dtype."""
        return fsq_indices_to_codes(indices, self.levels).astype(self.dtype)

    def lookup(self, indices: Array) -> Array:
        """Same as :meth:`indices_to_codes` (contract name)."""
        check_indices("FSQ", indices)
        return self.indices_to_codes(indices)
