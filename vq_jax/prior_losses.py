"""Pure losses and masking for the stage-2 token priors (GPT and MaskGIT).

All functions are jittable and side-effect free. Logits are cast to float32 before any
softmax / cross-entropy.
"""

import math

import jax
import jax.numpy as jnp
import optax


def ar_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token loss: (mean cross-entropy over all positions, token accuracy).

    logits [..., K] (``logits[:, i]`` predicts ``targets[:, i]``), targets int [...].
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {logits.shape} and targets {targets.shape} disagree; logits must be "
            "targets.shape + (K,)."
        )
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return jnp.mean(ce), acc


def cosine_mask_ratio(u: jax.Array | float) -> jax.Array:
    """MaskGIT cosine schedule: fraction of tokens masked at progress ``u`` in [0, 1]."""
    return jnp.cos(0.5 * math.pi * jnp.asarray(u, jnp.float32))


def maskgit_mask(
    key: jax.Array,
    tokens: jax.Array,
    mask_id: int,
    ratio: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mask ``max(1, ceil(r * L))`` uniformly random positions per example.

    tokens int [B, L]. The per-example ratio ``r = cos(pi/2 * u)``, ``u ~ U(0, 1)``, unless
    ``ratio`` [B] is given (e.g. to pin it in tests). Returns ``(masked_tokens, mask)`` where
    ``masked_tokens`` has ``mask_id`` at the masked positions and ``mask`` is bool [B, L].
    """
    if tokens.ndim != 2:
        raise ValueError(f"maskgit_mask expects tokens [B, L], got shape {tokens.shape}.")
    b, length = tokens.shape
    key_ratio, key_pos = jax.random.split(key)
    if ratio is None:
        ratio = cosine_mask_ratio(jax.random.uniform(key_ratio, (b,)))
    ratio = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), (b,))
    num = jnp.clip(jnp.ceil(ratio * length), 1, length).astype(jnp.int32)
    # rank of each position under an iid uniform score = uniform random permutation
    scores = jax.random.uniform(key_pos, (b, length))
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    mask = ranks < num[:, None]
    return jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens), mask


def maskgit_loss(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy on masked positions only: (mean loss, accuracy over masked positions).

    logits [B, L, K] float, targets int [B, L] (the unmasked tokens), mask bool [B, L].
    ``label_smoothing`` mixes the one-hot target with the uniform distribution over K.
    Averages are over the masked positions of the whole batch (0 if nothing is masked).
    """
    if logits.shape[:-1] != targets.shape or mask.shape != targets.shape:
        raise ValueError(
            f"logits {logits.shape}, targets {targets.shape} and mask {mask.shape} disagree; "
            "need logits [B, L, K], targets [B, L], mask [B, L]."
        )
    logits = logits.astype(jnp.float32)
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(targets, k, dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    ce = optax.softmax_cross_entropy(logits, onehot)
    weight = mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weight), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * weight) / denom, jnp.sum(correct * weight) / denom


def drop_labels(key: jax.Array, labels: jax.Array, null_id: int, drop_prob: float) -> jax.Array:
    """Classifier-free-guidance training: replace each label by ``null_id`` w.p. ``drop_prob``.

    ``null_id`` is the model's ``num_classes`` (its extra "null class" embedding).
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}.")
    drop = jax.random.bernoulli(key, drop_prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_id, labels.dtype), labels)
