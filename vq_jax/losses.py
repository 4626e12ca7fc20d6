"""Pure loss functions for VQ-VAE / VQGAN training.

Everything here is a side-effect-free ``jnp`` function (no I/O, no randomness), so it can be used
inside ``jax.jit`` / ``jax.grad`` / ``shard_map`` unchanged. GAN losses act on (PatchGAN) logits
of any shape; all reductions are plain means over every element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

GAN_KINDS = ("hinge", "non_saturating", "vanilla")

PyTree = Any


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute error over all elements."""
    return jnp.mean(jnp.abs(x - y))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error over all elements."""
    return jnp.mean(jnp.square(x - y))


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(
            f"unknown GAN loss kind {kind!r}; use one of {', '.join(repr(k) for k in GAN_KINDS)}"
        )


def discriminator_loss(kind: str, logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator loss on real / fake logits (lower is better for D).

    hinge:                    0.5 * (mean relu(1 - real) + mean relu(1 + fake))
    non_saturating / vanilla: 0.5 * (mean softplus(-real) + mean softplus(fake)),
                              i.e. the binary cross-entropy of sigmoid(logits) (both GAN
                              formulations share this D objective; they differ only for G).
    """
    _check_kind(kind)
    logits_real = jnp.asarray(logits_real, jnp.float32)
    logits_fake = jnp.asarray(logits_fake, jnp.float32)
    if kind == "hinge":
        real = jnp.mean(jax.nn.relu(1.0 - logits_real))
        fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
    else:
        real = jnp.mean(jax.nn.softplus(-logits_real))
        fake = jnp.mean(jax.nn.softplus(logits_fake))
    return 0.5 * (real + fake)


def generator_loss(kind: str, logits_fake: jax.Array) -> jax.Array:
    """Generator (adversarial) loss on the discriminator's logits for generated images.

    hinge:          -mean(fake)
    non_saturating: mean softplus(-fake)   (= -log sigmoid(fake))
    vanilla:        -mean softplus(fake)   (= mean log(1 - sigmoid(fake)), the saturating minimax
                                            objective; gradients vanish when D is confident)
    """
    _check_kind(kind)
    logits_fake = jnp.asarray(logits_fake, jnp.float32)
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    return -jnp.mean(jax.nn.softplus(logits_fake))


def _global_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(
            "adaptive_weight got an empty gradient pytree; pass the gradients w.r.t. "
            "the decoder's last-layer weight"
        )
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


def adaptive_weight(
    rec_grad: PyTree,
    gan_grad: PyTree,
    *,
    disc_weight: float = 1.0,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> jax.Array:
    """VQGAN adaptive discriminator weight (Esser et al. 2021, eq. 7).

    lambda = clip(||rec_grad|| / (||gan_grad|| + eps), 0, max_weight) * disc_weight, where both
    gradients are taken w.r.t. the decoder's last-layer weight (arrays or pytrees; the norm is the
    global L2 norm over all leaves). The ratio is wrapped in ``stop_gradient``: it is a balancing
    coefficient, not something to optimise.
    """
    ratio = _global_norm(rec_grad) / (_global_norm(gan_grad) + eps)
    ratio = jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))
    return ratio * disc_weight


def r1_penalty(disc_fn: Callable[[jax.Array], jax.Array], real_images: jax.Array) -> jax.Array:
    """R1 gradient penalty (Mescheder et al. 2018): mean_i ||d sum(D(x_i)) / d x_i||^2.

    ``disc_fn`` maps a batch of images [B, ...] to logits (any shape with leading B, e.g.
    PatchGAN [B, h, w, 1]); patch logits of each example are summed. The per-example gradient is
    obtained from the gradient of the batch sum, which is exact when D treats examples
    independently (no batch statistics). Returns the *unweighted* scalar; the caller adds
    ``gamma / 2 * r1_penalty(...)`` to the discriminator loss (the gamma/2 convention of the paper).
    Differentiable w.r.t. parameters closed over by ``disc_fn``.
    """
    real_images = jnp.asarray(real_images, jnp.float32)
    grads = jax.grad(lambda x: jnp.sum(disc_fn(x).astype(jnp.float32)))(real_images)
    per_example = jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=-1)
    return jnp.mean(per_example)


def lecam_loss(
    logits_real: jax.Array,
    logits_fake: jax.Array,
    ema_real: jax.Array,
    ema_fake: jax.Array,
) -> jax.Array:
    """LeCam regulariser (Tseng et al. 2021) for the discriminator.

    mean(relu(logits_real - ema_fake)^2) + mean(relu(ema_real - logits_fake)^2), where ``ema_*``
    are exponential moving averages of the mean real / fake logits (see ``update_lecam_ema``).
    The caller multiplies by its LeCam weight.
    """
    ema_real = jax.lax.stop_gradient(jnp.asarray(ema_real, jnp.float32))
    ema_fake = jax.lax.stop_gradient(jnp.asarray(ema_fake, jnp.float32))
    real = jnp.mean(jnp.square(jax.nn.relu(logits_real.astype(jnp.float32) - ema_fake)))
    fake = jnp.mean(jnp.square(jax.nn.relu(ema_real - logits_fake.astype(jnp.float32))))
    return real + fake


def update_lecam_ema(
    ema_real: jax.Array,
    ema_fake: jax.Array,
    logits_real: jax.Array,
    logits_fake: jax.Array,
    decay: float,
) -> tuple[jax.Array, jax.Array]:
    """Return updated (ema_real, ema_fake): ema <- decay * ema + (1 - decay) * mean(logits)."""
    mean_real = jax.lax.stop_gradient(jnp.mean(logits_real.astype(jnp.float32)))
    mean_fake = jax.lax.stop_gradient(jnp.mean(logits_fake.astype(jnp.float32)))
    new_real = decay * ema_real + (1.0 - decay) * mean_real
    new_fake = decay * ema_fake + (1.0 - decay) * mean_fake
    return new_real, new_fake


def feature_matching_loss(
    feats_real: Sequence[jax.Array], feats_fake: Sequence[jax.Array]
) -> jax.Array:
    """Mean over layers of the mean L1 distance between D's intermediate features.

    Real features are treated as constants (``stop_gradient``); gradients flow into the fakes.
    """
    feats_real, feats_fake = list(feats_real), list(feats_fake)
    if len(feats_real) != len(feats_fake) or not feats_real:
        raise ValueError(
            f"feature_matching_loss needs equally many (>0) real and fake feature maps, got "
            f"{len(feats_real)} and {len(feats_fake)}; pass the same D layers for both"
        )
    per_layer = [
        jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32) - f.astype(jnp.float32)))
        for r, f in zip(feats_real, feats_fake, strict=True)
    ]
    return jnp.mean(jnp.stack(per_layer))


def ema_params(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """Polyak averaging: ema <- decay * ema + (1 - decay) * params (leaf-wise, keeps ema dtypes)."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(jnp.asarray(e).dtype), ema, params
    )
