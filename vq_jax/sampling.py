"""Samplers for the stage-2 priors: KV-cache autoregressive decoding and MaskGIT decoding.

Both samplers are ``jax.jit``-compiled with the module and the shape-determining arguments
static (``model``, ``batch_size``, ``top_k``, ``num_steps``, ``cfg_scale``, ``return_history``);
the whole decode loop is one ``lax.scan`` / ``lax.fori_loop`` inside one compiled program.
``params`` is the model's ``'params'`` collection.

Classifier-free guidance (``cfg_scale = s > 0``, class-conditional models only): the
conditional batch and a batch with the null class id (``model.num_classes``) run together and
the logits used for sampling are ``cond + s * (cond - uncond) = (1 + s) * cond - s * uncond``,
so ``s = 0`` is plain conditional sampling.
"""

import functools
import math

import jax
import jax.numpy as jnp

from vq_jax.nets.transformer import GPT, MaskGITTransformer, init_cache


def filter_logits(
    logits: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Temperature-scale, then top-k, then top-p (nucleus) filter logits [..., K] (float32).

    top-k (``top_k > 0``, static) keeps the ``k`` largest logits (ties with the k-th are kept
    too). top-p keeps the smallest set of most probable tokens (of the top-k-filtered,
    temperature-scaled distribution) whose total probability is ``>= top_p``; ``top_p >= 1``
    keeps everything. Removed entries are ``-inf``.
    """
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use a small value (e.g. 1e-4) or "
            "top_k=1 for greedy decoding."
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
    logits = logits.astype(jnp.float32) / temperature
    k = logits.shape[-1]
    if 0 < top_k < k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if isinstance(top_p, int | float) and top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # keep a token iff the tokens strictly more probable hold less than top_p of the mass;
    # the first token is always kept
    keep_sorted = (mass_before < top_p) | (jnp.arange(k) == 0) | (top_p >= 1.0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def _labels_for(model: GPT | MaskGITTransformer, labels: jax.Array | None, batch_size: int):
    """Validate labels; return the model labels for the (possibly CFG-doubled) batch."""
    if model.num_classes == 0:
        if labels is not None:
            raise ValueError(
                "labels were given but the model is unconditional (num_classes=0); drop labels."
            )
        return None
    if labels is None:
        raise ValueError(
            f"the model is class-conditional (num_classes={model.num_classes}); pass labels "
            f"[batch_size] (id {model.num_classes} = null class for unconditional samples)."
        )
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {labels.shape}.")
    return labels


def _check_cfg(model: GPT | MaskGITTransformer, cfg_scale: float) -> bool:
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (0 disables guidance), got {cfg_scale}.")
    if cfg_scale > 0 and model.num_classes == 0:
        raise ValueError(
            "cfg_scale > 0 needs a class-conditional model (num_classes > 0); set cfg_scale=0."
        )
    return cfg_scale > 0


def _guide(logits: jax.Array, cfg_scale: float, batch_size: int) -> jax.Array:
    """Combine [cond; uncond] logits: (1 + s) * cond - s * uncond."""
    cond, uncond = logits[:batch_size], logits[batch_size:]
    return cond + cfg_scale * (cond - uncond)


def _known(
    tokens: jax.Array | None, mask: jax.Array | None, batch_size: int, length: int, what: str
) -> tuple[jax.Array, jax.Array]:
    """Validate an inpainting (tokens, mask) pair; default: nothing known."""
    if (tokens is None) != (mask is None):
        raise ValueError(f"pass both {what} tokens and their mask, or neither.")
    if tokens is None:
        return jnp.zeros((batch_size, length), jnp.int32), jnp.zeros((batch_size, length), bool)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (batch_size, length):
        raise ValueError(
            f"{what} tokens must have shape ({batch_size}, {length}) (batch, flattened h*w), "
            f"got {tokens.shape}."
        )
    mask = jnp.asarray(mask, bool)
    try:
        mask = jnp.broadcast_to(mask, (batch_size, length))
    except ValueError as err:
        raise ValueError(
            f"{what} mask of shape {mask.shape} does not broadcast to ({batch_size}, {length}); "
            "pass a bool mask [L] or [B, L]."
        ) from err
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "top_k", "cfg_scale"))
def sample_autoregressive(
    model: GPT,
    params,
    key: jax.Array,
    batch_size: int,
    labels: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    cfg_scale: float = 0.0,
    prefix: jax.Array | None = None,
    prefix_mask: jax.Array | None = None,
) -> jax.Array:
    """Sample token sequences [batch_size, L] from a :class:`GPT` in raster order.

    One ``lax.scan`` over the ``L`` positions, one token per step through the KV cache.
    Inpainting: where ``prefix_mask`` ([L] or [B, L] bool) is True the token of ``prefix``
    [B, L] is kept and teacher-forced into the cache; other positions are sampled conditioned
    on everything before them (raster order, so later known tokens are not seen earlier).
    Sampling uses :func:`filter_logits` (temperature, top_k, top_p) and optional CFG (module doc).
    """
    length = model.seq_len
    use_cfg = _check_cfg(model, cfg_scale)
    labels = _labels_for(model, labels, batch_size)
    prefix, prefix_mask = _known(prefix, prefix_mask, batch_size, length, "prefix")
    if use_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
    rows = 2 * batch_size if use_cfg else batch_size
    cache = init_cache(model, rows)

    def step(carry, xs):
        cache, prev = carry
        step_key, known_tok, is_known = xs
        inputs = jnp.concatenate([prev, prev]) if use_cfg else prev
        logits, updated = model.apply(
            {"params": params, "cache": cache},
            inputs[:, None],
            labels,
            train=False,
            decode=True,
            mutable=["cache"],
        )
        logits = logits[:, 0]
        if use_cfg:
            logits = _guide(logits, cfg_scale, batch_size)
        logits = filter_logits(logits, temperature, top_k, top_p)
        tok = jax.random.categorical(step_key, logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(is_known, known_tok, tok)
        return (updated["cache"], tok), tok

    xs = (jax.random.split(key, length), prefix.T, prefix_mask.T)
    init = (cache, jnp.zeros((batch_size,), jnp.int32))
    _, tokens = jax.lax.scan(step, init, xs)
    return tokens.T


def maskgit_schedule(num_unknown: jax.Array, step: jax.Array, num_steps: int) -> jax.Array:
    """Tokens still masked after 0-based ``step``: floor(U cos(pi/2 (step+1)/T)).

    Clamped to ``>= 1`` before the last step (when ``U >= 1``) and 0 after it. A 1e-3 slack
    before the floor keeps exact integer products (e.g. U=16, cos(pi/3)) exact in float32.
    """
    step = jnp.asarray(step, jnp.int32)
    ratio = jnp.cos(0.5 * math.pi * (step + 1).astype(jnp.float32) / num_steps)
    num = jnp.floor(num_unknown.astype(jnp.float32) * ratio + 1e-3).astype(jnp.int32)
    num = jnp.where(step < num_steps - 1, jnp.maximum(num, 1), 0)
    return jnp.clip(num, 0, num_unknown)


@functools.partial(
    jax.jit, static_argnames=("model", "batch_size", "num_steps", "cfg_scale", "return_history")
)
def sample_maskgit(
    model: MaskGITTransformer,
    params,
    key: jax.Array,
    batch_size: int,
    labels: jax.Array | None = None,
    num_steps: int = 8,
    temperature: float | jax.Array = 1.0,
    choice_temperature: float | jax.Array = 4.5,
    known_tokens: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    cfg_scale: float = 0.0,
    return_history: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MaskGIT iterative parallel decoding -> tokens [batch_size, L] (no mask ids left).

    Starts all-masked (or from ``known_tokens`` where ``known_mask`` is True; those never
    change). Step ``t = 0..T-1`` (``lax.fori_loop``): sample every masked position from
    softmax(logits / temperature); confidence = log p(sampled) under the untempered model
    softmax (after CFG) + Gumbel noise *
    ``choice_temperature * (1 - t / T)`` (annealed), +inf for known / already fixed tokens;
    keep the :func:`maskgit_schedule` count (relative to the U unknown positions) of least
    confident tokens masked. ``return_history=True`` also returns the number of masked tokens
    after each step, int32 [T, batch_size].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    length, mask_id = model.seq_len, model.mask_id
    use_cfg = _check_cfg(model, cfg_scale)
    labels = _labels_for(model, labels, batch_size)
    known_tokens, known_mask = _known(known_tokens, known_mask, batch_size, length, "known")
    if use_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
    tokens = jnp.where(known_mask, known_tokens, mask_id)
    num_unknown = length - jnp.sum(known_mask, axis=-1, dtype=jnp.int32)

    def body(t, carry):
        tokens, key, history = carry
        key, key_sample, key_noise = jax.random.split(key, 3)
        inputs = jnp.concatenate([tokens, tokens]) if use_cfg else tokens
        logits = model.apply({"params": params}, inputs, labels, train=False)
        if use_cfg:
            logits = _guide(logits, cfg_scale, batch_size)
        logits = logits.astype(jnp.float32)
        sampled = jax.random.categorical(key_sample, logits / temperature, axis=-1)
        sampled = sampled.astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)  # model belief, independent of temperature
        conf = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
        noise_scale = choice_temperature * (1.0 - t.astype(jnp.float32) / num_steps)
        conf = conf + noise_scale * jax.random.gumbel(key_noise, conf.shape)
        is_masked = tokens == mask_id
        candidate = jnp.where(is_masked, sampled, tokens)
        conf = jnp.where(is_masked, conf, jnp.inf)
        num_masked = maskgit_schedule(num_unknown, t, num_steps)
        ranks = jnp.argsort(jnp.argsort(conf, axis=-1), axis=-1)
        tokens = jnp.where(ranks < num_masked[:, None], mask_id, candidate)
        history = history.at[t].set(jnp.sum(tokens == mask_id, axis=-1, dtype=jnp.int32))
        return tokens, key, history

    history = jnp.zeros((num_steps, batch_size), jnp.int32)
    tokens, _, history = jax.lax.fori_loop(0, num_steps, body, (tokens, key, history))
    return (tokens, history) if return_history else tokens
