"""Stage-2 priors over VQ token grids: a causal GPT and a bidirectional MaskGIT transformer.

Both read a token grid flattened in raster order, ``tokens [B, L]`` with ``L = h * w`` and ids in
``[0, vocab_size)`` (the codebook size K), and return float32 logits ``[B, L, K]``.

* :class:`GPT` (Esser et al., 2021, stage 2): ``logits[:, i]`` predicts token ``i`` from the start
  token and tokens ``< i``. The start token is a learned class embedding; an unconditional model
  (``num_classes=0``) has one class, which is its learned start-of-sequence embedding. A
  class-conditional model has ``num_classes + 1`` class embeddings: the extra id ``num_classes``
  is the "null class" used for classifier-free guidance (drop labels to it during training).
  ``decode=True`` runs incremental decoding with a key/value cache in the flax ``'cache'``
  collection (see :func:`init_cache`).
* :class:`MaskGITTransformer` (Chang et al., 2022): bidirectional; input ids are in ``[0, K]``
  where ``K`` is the mask id; a class token (``num_classes + 1`` ids, the last is the null class)
  is prepended and dropped again at the output. Logits never include the mask id.

Blocks are pre-norm (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual) with
learned position embeddings. ``dtype`` is the compute dtype (bfloat16 is fine); parameters are
float32; attention logits/softmax and the output logits are float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vq_jax.errors import UserError

Dtype = jnp.dtype | type

_INIT = nn.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5


def _check_dims(embed_dim: int, num_heads: int) -> None:
    if num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(
            f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose num_heads "
            "dividing embed_dim (e.g. embed_dim=512, num_heads=8)."
        )


def check_labels(labels, num_classes: int, batch: int, *, null_ok: bool = True):
    """The one label check of the priors: labels [batch] in [0, num_classes] (id num_classes is
    the null class when ``null_ok``), or None for an unconditional model (num_classes=0).

    Returns int32 labels (or None). Range checks run on concrete values only (not under jit).
    Raises UserError (a ValueError) naming the fix.
    """
    if num_classes == 0:
        if labels is not None:
            raise UserError(
                "labels were given to an unconditional prior (num_classes=0); drop the labels or "
                "build the model with num_classes set to the number of classes."
            )
        return None
    if labels is None:
        raise UserError(
            f"this prior is class-conditional (num_classes={num_classes}) and needs labels [B]; "
            f"pass labels, using id {num_classes} (the null class) for unconditional inputs."
        )
    concrete = not isinstance(labels, jax.core.Tracer)
    labels = np.asarray(labels) if concrete else labels
    if labels.shape != (batch,):
        raise UserError(
            f"labels must have shape ({batch},) matching the batch, got {labels.shape}."
        )
    if concrete and labels.size:
        top = num_classes if null_ok else num_classes - 1
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > top:
            raise UserError(
                f"class labels must lie in [0, {top}] (num_classes={num_classes}"
                f"{', the last id is the null class' if null_ok else ''}); got [{lo}, {hi}]."
            )
    return jnp.asarray(labels, jnp.int32)


def _start_ids(labels: jax.Array | None, num_classes: int, batch: int) -> jax.Array:
    """Class ids of the start/class token: labels, or the single SOS id 0 when unconditional."""
    labels = check_labels(labels, num_classes, batch)
    return jnp.zeros((batch,), jnp.int32) if labels is None else labels


def _check_cond(cond: jax.Array | None, cond_len: int, batch: int) -> None:
    """Condition tokens [B, cond_len] for a conditional model, none otherwise."""
    if cond_len == 0:
        if cond is not None:
            raise UserError(
                "condition tokens were given to a prior without an image condition (cond_len=0)."
            )
        return
    if cond is None or cond.shape != (batch, cond_len):
        got = None if cond is None else cond.shape
        raise UserError(
            f"this prior is conditioned on {cond_len} condition tokens per example; pass cond "
            f"[{batch}, {cond_len}] (the condition tokenizer's grid, flattened), got {got}."
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention with einsum matmuls and a float32 softmax.

    With ``decode=True`` the keys/values of the ``T`` new positions are written into the cache
    variables ``cached_key``/``cached_value`` [B, cache_len, H, D] at offset ``start`` and the
    queries attend over the whole cache (causally masked, so unwritten slots are never read).
    """

    num_heads: int
    dropout: float = 0.0
    cache_len: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        causal: bool,
        train: bool = False,
        decode: bool = False,
        start: jax.Array | int = 0,
    ) -> jax.Array:
        b, t, c = x.shape
        _check_dims(c, self.num_heads)
        h, d = self.num_heads, c // self.num_heads
        qkv = nn.DenseGeneral(
            (3, h, d), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT, name="qkv"
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if decode:
            if not causal or self.cache_len <= 0:
                raise ValueError("decode=True needs causal attention with cache_len > 0.")
            shape = (b, self.cache_len, h, d)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
            zero = jnp.zeros((), jnp.int32)
            offset = (zero, jnp.asarray(start, jnp.int32), zero, zero)
            ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), offset)
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), offset)
            k, v = ck.value, cv.value
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(d))
        if causal:
            q_pos = start + jnp.arange(t)
            k_pos = jnp.arange(k.shape[1])
            allowed = k_pos[None, :] <= q_pos[:, None]
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(self.dtype), v.astype(self.dtype))
        return nn.DenseGeneral(
            c,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_INIT,
            name="out",
        )(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, mlp_ratio * C)."""

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    cache_len: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        causal: bool,
        train: bool = False,
        decode: bool = False,
        start: jax.Array | int = 0,
    ) -> jax.Array:
        c = x.shape[-1]

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT, name=name
            )

        y = SelfAttention(self.num_heads, self.dropout, self.cache_len, self.dtype, name="attn")(
            norm("norm1")(x), causal=causal, train=train, decode=decode, start=start
        )
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = dense(round(self.mlp_ratio * c), "mlp_in")(norm("norm2")(x))
        y = dense(c, "mlp_out")(nn.gelu(y))
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class _Trunk(nn.Module):
    """Embedding dropout -> num_layers blocks -> final LayerNorm -> float32 logits over K."""

    vocab_size: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    dropout: float
    cache_len: int
    dtype: Dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        causal: bool,
        train: bool,
        decode: bool = False,
        start: jax.Array | int = 0,
    ) -> jax.Array:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.num_layers):
            x = Block(
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.cache_len,
                self.dtype,
                name=f"block_{i}",
            )(x, causal=causal, train=train, decode=decode, start=start)
        x = nn.LayerNorm(_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="norm_out")(x)
        logits = nn.Dense(
            self.vocab_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_INIT,
            name="head",
        )(x)
        return logits.astype(jnp.float32)


class _TokenPrior(nn.Module):
    """The fields, input checks, embeddings and trunk that GPT and MaskGIT share."""

    vocab_size: int
    seq_len: int
    num_classes: int = 0
    num_layers: int = 8
    num_heads: int = 8
    embed_dim: int = 512
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    cond_len: int = 0  # image-conditional: number of condition tokens
    cond_vocab: int = 0  # image-conditional: the condition tokenizer's codebook size

    @nn.nowrap
    def _check_inputs(
        self, tokens: jax.Array, labels: jax.Array | None, max_len: int
    ) -> tuple[int, int, jax.Array]:
        """(batch, length, start/class token ids) of tokens [B, T <= max_len] and labels."""
        if tokens.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} expects tokens [B, T], got shape {tokens.shape}; "
                "flatten h*w."
            )
        b, t = tokens.shape
        if t > max_len:
            raise ValueError(
                f"sequence of {t} tokens is longer than seq_len={self.seq_len}; build the model "
                "with seq_len = h * w of the token grid."
            )
        _check_dims(self.embed_dim, self.num_heads)
        return b, t, _start_ids(labels, self.num_classes, b)

    @nn.nowrap
    def _embed(self, num: int, name: str) -> nn.Embed:
        return nn.Embed(
            num,
            self.embed_dim,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=_INIT,
            name=name,
        )

    @nn.nowrap
    def _trunk(self, cache_len: int) -> _Trunk:
        return _Trunk(
            self.vocab_size,
            self.num_layers,
            self.num_heads,
            self.mlp_ratio,
            self.dropout,
            cache_len,
            self.dtype,
            name="trunk",
        )


class GPT(_TokenPrior):
    """Decoder-only causal transformer prior: tokens [B, T<=L] -> logits [B, T, vocab_size].

    ``logits[:, i]`` predicts token ``i`` given the start token (class embedding), the
    ``cond_len`` condition tokens (image-conditional priors: a prefix from a second tokenizer,
    ids in ``[0, cond_vocab)``, own embedding ``cond_embed``) and tokens ``< i``; the last input
    token is never read. Only target positions get logits: the condition is context, never a
    prediction. Parameter names: tok_embed, class_embed, [cond_embed], pos_embed,
    trunk/{block_i, norm_out, head}.

    Decoding (``decode=True``, ``mutable=['cache']``, cache from :func:`init_cache`) runs over the
    whole sequence ``[start, condition, targets]`` of ``cond_len + L`` positions: each call takes
    the inputs for the next ``T`` positions ``p..p+T-1`` (``p`` = cache index), where the input
    at position ``p`` is sequence element ``p - 1`` (condition token ``p - 1`` for
    ``1 <= p <= cond_len``, then target token ``p - 1 - cond_len``; the value at position 0 is
    ignored: the start token is used), and returns the logits at those positions (the one at
    position ``cond_len + j`` predicts target token ``j``). Feeding more than ``cond_len + L``
    positions in total is not checked inside jit (slices clamp). Pass the same labels on every
    decode call (they are read at position 0 only).
    """

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        labels: jax.Array | None = None,
        train: bool = False,
        decode: bool = False,
        cond: jax.Array | None = None,
    ) -> jax.Array:
        total = self.cond_len + self.seq_len
        b, t, cls_ids = self._check_inputs(tokens, labels, total if decode else self.seq_len)
        if not decode:
            _check_cond(cond, self.cond_len, b)
        tok_embed = self._embed(self.vocab_size, "tok_embed")
        class_embed = self._embed(self.num_classes + 1, "class_embed")
        cond_embed = self._embed(self.cond_vocab, "cond_embed") if self.cond_len else None
        pos_embed = self.param("pos_embed", _INIT, (total, self.embed_dim), jnp.float32)

        if decode:
            initialized = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            start = index.value
            if initialized:
                index.value = start + t
            positions = start + jnp.arange(t)
            ids = tokens.astype(jnp.int32)
            x = tok_embed(jnp.clip(ids, 0, self.vocab_size - 1))
            if cond_embed is not None:
                in_cond = (positions >= 1) & (positions <= self.cond_len)
                xc = cond_embed(jnp.clip(ids, 0, self.cond_vocab - 1))
                x = jnp.where(in_cond[None, :, None], xc, x)
            length = t
        else:
            start = jnp.zeros((), jnp.int32)
            x = tok_embed(tokens[:, :-1].astype(jnp.int32))
            if cond_embed is not None:
                x = jnp.concatenate([cond_embed(cond.astype(jnp.int32)), x], axis=1)
            x = jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1)
            length = self.cond_len + t
            positions = jnp.arange(length)
        x = jnp.where((positions == 0)[None, :, None], class_embed(cls_ids)[:, None, :], x)
        pos = jax.lax.dynamic_slice_in_dim(pos_embed, start, length, axis=0)
        x = (x + pos[None].astype(x.dtype)).astype(self.dtype)
        logits = self._trunk(total)(x, causal=True, train=train, decode=decode, start=start)
        return logits if decode else logits[:, self.cond_len :]


def init_cache(model: GPT, batch_size: int) -> dict:
    """Fresh (all-zero, index 0) decoding cache of ``model`` for ``batch_size`` sequences.

    Only shapes are traced (``jax.eval_shape``); no parameters are created. Use as
    ``model.apply({'params': p, 'cache': cache}, x, labels, decode=True, mutable=['cache'])``.
    """
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    labels = jnp.zeros((batch_size,), jnp.int32) if model.num_classes else None
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, labels, train=False, decode=True)
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


class MaskGITTransformer(_TokenPrior):
    """Bidirectional masked-token transformer: tokens [B, T<=L] in [0, K] -> logits [B, T, K].

    Id ``K = vocab_size`` (:attr:`mask_id`) marks masked positions. A class token (ids
    ``0..num_classes``, the last one the null class; unconditional models have only id 0) is
    prepended, then (image-conditional priors) the ``cond_len`` condition tokens ``cond``
    [B, cond_len] with their own embedding ``cond_embed`` (ids in ``[0, cond_vocab)``; they are
    a separate input, so they can never be masked); both are dropped again at the output. The
    position table has ``1 + cond_len + L`` rows. Parameter names: tok_embed, class_embed,
    [cond_embed], pos_embed, trunk/{block_i, norm_out, head}.
    """

    @property
    def mask_id(self) -> int:
        """Token id of a masked position (= vocab_size)."""
        return self.vocab_size

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        labels: jax.Array | None = None,
        train: bool = False,
        cond: jax.Array | None = None,
    ) -> jax.Array:
        b, t, cls_ids = self._check_inputs(tokens, labels, self.seq_len)
        _check_cond(cond, self.cond_len, b)
        x = self._embed(self.vocab_size + 1, "tok_embed")(tokens.astype(jnp.int32))
        cls = self._embed(self.num_classes + 1, "class_embed")(cls_ids)
        prefix = [cls[:, None, :]]
        if self.cond_len:
            prefix.append(self._embed(self.cond_vocab, "cond_embed")(cond.astype(jnp.int32)))
        n_prefix = 1 + self.cond_len
        pos_embed = self.param(
            "pos_embed", _INIT, (n_prefix + self.seq_len, self.embed_dim), jnp.float32
        )
        x = jnp.concatenate([*prefix, x], axis=1)
        x = (x + pos_embed[None, : n_prefix + t].astype(x.dtype)).astype(self.dtype)
        logits = self._trunk(0)(x, causal=False, train=train)
        return logits[:, n_prefix:]
