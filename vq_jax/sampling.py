"""Samplers for the stage-2 priors: KV-cache autoregressive decoding and MaskGIT decoding.

The decoders take a logits function, not a module, so any prior kind can use them:

* :func:`decode_autoregressive` takes ``step_fn(cache, inputs [B, T]) -> (logits [B, T, K],
  cache)`` (incremental decoding over a key/value cache) and an optional ``prefix`` [B, P]
  (condition tokens, prefilled in one call and never sampled);
* :func:`decode_maskgit` takes ``logits_fn(tokens [B, L]) -> logits [B, L, K]``.

Guidance, labels and condition tokens live inside the logits function. :func:`sample_autoregressive`
and :func:`sample_maskgit` build those functions for the modules of ``vq_jax.nets.transformer``
and are ``jax.jit``-compiled with the module and the shape-determining arguments static
(``model``, ``batch_size``, ``top_k``, ``num_steps``, ``cfg_scale``, ``return_history``); the
whole decode loop is one ``lax.scan`` / ``lax.fori_loop`` inside one compiled program.
``params`` is the model's ``'params'`` collection.

Classifier-free guidance (``cfg_scale = s > 0``, class-conditional models only): the
conditional batch and a batch with the null class id (``model.num_classes``) run together and
the logits used for sampling are ``cond + s * (cond - uncond) = (1 + s) * cond - s * uncond``,
so ``s = 0`` is plain conditional sampling.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vq_jax.errors import UserError
from vq_jax.nets.transformer import GPT, MaskGITTransformer, check_labels, init_cache
from vq_jax.prior_losses import cosine_mask_ratio

LogitsFn = Callable[[jax.Array], jax.Array]
StepFn = Callable[[object, jax.Array], tuple[jax.Array, object]]


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
        raise UserError(
            f"temperature must be > 0, got {temperature}; use a small value (e.g. 1e-4) or "
            "top_k=1 for greedy decoding."
        )
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
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
    """Validate labels (the one label check); return int32 labels or None."""
    return check_labels(labels, model.num_classes, batch_size)


def _check_cfg(model: GPT | MaskGITTransformer, cfg_scale: float) -> bool:
    if cfg_scale < 0:
        raise UserError(f"cfg_scale must be >= 0 (0 disables guidance), got {cfg_scale}.")
    if cfg_scale > 0 and model.num_classes == 0:
        raise UserError(
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
        raise UserError(f"pass both {what} tokens and their mask, or neither.")
    if tokens is None:
        return jnp.zeros((batch_size, length), jnp.int32), jnp.zeros((batch_size, length), bool)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (batch_size, length):
        raise UserError(
            f"{what} tokens must have shape ({batch_size}, {length}) (batch, flattened h*w), "
            f"got {tokens.shape}."
        )
    mask = jnp.asarray(mask, bool)
    try:
        mask = jnp.broadcast_to(mask, (batch_size, length))
    except ValueError as err:
        raise UserError(
            f"{what} mask of shape {mask.shape} does not broadcast to ({batch_size}, {length}); "
            "pass a bool mask [L] or [B, L]."
        ) from err
    return tokens, mask


def decode_autoregressive(
    step_fn: StepFn,
    cache,
    key: jax.Array,
    batch_size: int,
    length: int,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    prefix: jax.Array | None = None,
    known_tokens: jax.Array | None = None,
    known_mask: jax.Array | None = None,
) -> jax.Array:
    """Sample ``length`` tokens [batch_size, length] in raster order through a KV cache.

    ``step_fn(cache, inputs [B, T]) -> (logits [B, T, K], cache)`` feeds the inputs of the next
    ``T`` sequence positions (input at position p = sequence element p - 1; position 0 is the
    start token). A ``prefix`` [B, P] (condition tokens) is prefilled in one call and never
    sampled: the first sampled token is predicted at position P. Where ``known_mask`` ([L] or
    [B, L] bool) is True the token of ``known_tokens`` [B, L] is kept and teacher-forced.
    """
    known_tokens, known_mask = _known(known_tokens, known_mask, batch_size, length, "prefix")
    prev = jnp.zeros((batch_size,), jnp.int32)
    if prefix is not None and prefix.shape[1]:
        prefix = jnp.asarray(prefix, jnp.int32)
        inputs = jnp.concatenate([prev[:, None], prefix[:, :-1]], axis=1)
        _, cache = step_fn(cache, inputs)
        prev = prefix[:, -1]

    def step(carry, xs):
        cache, prev = carry
        step_key, known_tok, is_known = xs
        logits, cache = step_fn(cache, prev[:, None])
        logits = filter_logits(logits[:, 0], temperature, top_k, top_p)
        tok = jax.random.categorical(step_key, logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(is_known, known_tok, tok)
        return (cache, tok), tok

    xs = (jax.random.split(key, length), known_tokens.T, known_mask.T)
    _, tokens = jax.lax.scan(step, (cache, prev), xs)
    return tokens.T


def gpt_step_fn(
    model: GPT, params, labels: jax.Array | None, cfg_scale: float, batch_size: int
) -> StepFn:
    """The KV-cache step function of a :class:`GPT` (with CFG when ``cfg_scale > 0``)."""
    use_cfg = _check_cfg(model, cfg_scale)
    if use_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])

    def step_fn(cache, inputs):
        inputs = jnp.concatenate([inputs, inputs]) if use_cfg else inputs
        logits, updated = model.apply(
            {"params": params, "cache": cache},
            inputs,
            labels,
            train=False,
            decode=True,
            mutable=["cache"],
        )
        if use_cfg:
            logits = _guide(logits, cfg_scale, batch_size)
        return logits, updated["cache"]

    return step_fn


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
    cond: jax.Array | None = None,
) -> jax.Array:
    """Sample token sequences [batch_size, L] from a :class:`GPT` in raster order.

    One ``lax.scan`` over the ``L`` positions, one token per step through the KV cache
    (:func:`decode_autoregressive`); an image-conditional GPT's condition tokens ``cond``
    [batch_size, cond_len] are prefilled first. Inpainting: where ``prefix_mask`` ([L] or
    [B, L] bool) is True the token of ``prefix`` [B, L] is kept and teacher-forced into the
    cache; other positions are sampled conditioned on everything before them (raster order, so
    later known tokens are not seen earlier). Sampling uses :func:`filter_logits` (temperature,
    top_k, top_p) and optional CFG (module doc).
    """
    labels = _labels_for(model, labels, batch_size)
    cond = _cond_for(model, cond, batch_size)
    use_cfg = _check_cfg(model, cfg_scale)
    cache = init_cache(model, 2 * batch_size if use_cfg else batch_size)
    step_fn = gpt_step_fn(model, params, labels, cfg_scale, batch_size)
    return decode_autoregressive(
        step_fn,
        cache,
        key,
        batch_size,
        model.seq_len,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        prefix=cond,
        known_tokens=prefix,
        known_mask=prefix_mask,
    )


def _cond_for(model, cond: jax.Array | None, batch_size: int) -> jax.Array | None:
    """Condition tokens [batch_size, cond_len] (int32) for an image-conditional model."""
    cond_len = getattr(model, "cond_len", 0)
    if cond_len == 0:
        if cond is not None:
            raise UserError("cond was given but the model has no image condition (cond_len=0).")
        return None
    if cond is None:
        raise UserError(f"the model is image-conditional; pass cond [{batch_size}, {cond_len}].")
    cond = jnp.asarray(cond, jnp.int32).reshape(cond.shape[0], -1)
    if cond.shape != (batch_size, cond_len):
        raise UserError(f"cond must have shape ({batch_size}, {cond_len}), got {cond.shape}.")
    return cond


def maskgit_schedule(num_unknown: jax.Array, step: jax.Array, num_steps: int) -> jax.Array:
    """Tokens still masked after 0-based ``step``: floor(U * r((step+1)/T)).

    ``r`` is :func:`vq_jax.prior_losses.cosine_mask_ratio`, the schedule training draws its
    mask ratios from. Clamped to ``>= 1`` before the last step (when ``U >= 1``) and 0 after it.
    A 1e-3 slack before the floor keeps exact integer products (e.g. U=16, cos(pi/3)) exact in
    float32.
    """
    step = jnp.asarray(step, jnp.int32)
    ratio = cosine_mask_ratio((step + 1).astype(jnp.float32) / num_steps)
    num = jnp.floor(num_unknown.astype(jnp.float32) * ratio + 1e-3).astype(jnp.int32)
    num = jnp.where(step < num_steps - 1, jnp.maximum(num, 1), 0)
    return jnp.clip(num, 0, num_unknown)


def decode_maskgit(
    logits_fn: LogitsFn,
    key: jax.Array,
    batch_size: int,
    length: int,
    mask_id: int,
    *,
    num_steps: int = 8,
    temperature: float | jax.Array = 1.0,
    choice_temperature: float | jax.Array = 4.5,
    known_tokens: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    return_history: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MaskGIT iterative parallel decoding -> tokens [batch_size, length] (no mask ids left).

    ``logits_fn(tokens [B, length]) -> logits [B, length, K]`` (``mask_id`` marks masked
    positions). Starts all-masked (or from ``known_tokens`` where ``known_mask`` is True; those
    never change). Step ``t = 0..T-1`` (``lax.fori_loop``): sample every masked position from
    softmax(logits / temperature); confidence = log p(sampled) under the untempered softmax +
    Gumbel noise * ``choice_temperature * (1 - t / T)`` (annealed), +inf for known / already
    fixed tokens; keep the :func:`maskgit_schedule` count (relative to the U unknown positions)
    of least confident tokens masked. ``return_history=True`` also returns the number of masked
    tokens after each step, int32 [T, batch_size].
    """
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}.")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}.")
    known_tokens, known_mask = _known(known_tokens, known_mask, batch_size, length, "known")
    tokens = jnp.where(known_mask, known_tokens, mask_id)
    num_unknown = length - jnp.sum(known_mask, axis=-1, dtype=jnp.int32)

    def body(t, carry):
        tokens, key, history = carry
        key, key_sample, key_noise = jax.random.split(key, 3)
        logits = logits_fn(tokens).astype(jnp.float32)
        sampled = jax.random.categorical(key_sample, logits / temperature, axis=-1)
        sampled = sampled.astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)  # model belief, independent of temperature
        conf = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
        noise_scale = choice_temperature * (1.0 - t.astype(jnp.float32) / num_steps)
        conf = conf + noise_scale * jax.random.gumbel(key_noise, conf.shape)
        is_masked = (tokens == mask_id) & ~known_mask  # a known id may equal mask_id (condition)
        candidate = jnp.where(is_masked, sampled, tokens)
        conf = jnp.where(is_masked, conf, jnp.inf)
        num_masked = maskgit_schedule(num_unknown, t, num_steps)
        ranks = jnp.argsort(jnp.argsort(conf, axis=-1), axis=-1)
        tokens = jnp.where(ranks < num_masked[:, None], mask_id, candidate)
        still = (tokens == mask_id) & ~known_mask
        history = history.at[t].set(jnp.sum(still, axis=-1, dtype=jnp.int32))
        return tokens, key, history

    history = jnp.zeros((num_steps, batch_size), jnp.int32)
    tokens, _, history = jax.lax.fori_loop(0, num_steps, body, (tokens, key, history))
    return (tokens, history) if return_history else tokens


def maskgit_logits_fn(
    model: MaskGITTransformer,
    params,
    labels: jax.Array | None,
    cfg_scale: float,
    batch_size: int,
    cond: jax.Array | None = None,
) -> LogitsFn:
    """The logits function of a :class:`MaskGITTransformer` (CFG when ``cfg_scale > 0``).

    Image-conditional models see the sequence ``[cond; targets]`` ([B, P + L]); the condition
    part is passed to the network as ``cond`` and gets zero logits, so a decoder that keeps it
    known (:func:`sample_maskgit` does) never changes it.
    """
    use_cfg = _check_cfg(model, cfg_scale)
    if use_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
    p = 0 if cond is None else cond.shape[1]

    def logits_fn(tokens):
        inputs = jnp.concatenate([tokens, tokens]) if use_cfg else tokens
        c = None if p == 0 else inputs[:, :p]
        logits = model.apply({"params": params}, inputs[:, p:], labels, train=False, cond=c)
        if use_cfg:
            logits = _guide(logits, cfg_scale, batch_size)
        if p:
            logits = jnp.concatenate([jnp.zeros_like(logits[:, :1]).repeat(p, 1), logits], 1)
        return logits

    return logits_fn


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
    cond: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MaskGIT decoding (:func:`decode_maskgit`) of a :class:`MaskGITTransformer` ->
    tokens [batch_size, L].

    An image-conditional model decodes the sequence ``[cond; targets]`` with the condition
    tokens ``cond`` [batch_size, cond_len] known (never masked, never changed) and returns the
    targets. ``known_tokens`` / ``known_mask`` ([B, L] / [L] or [B, L]) fix target tokens
    (inpainting).
    """
    labels = _labels_for(model, labels, batch_size)
    cond = _cond_for(model, cond, batch_size)
    length = model.seq_len
    logits_fn = maskgit_logits_fn(model, params, labels, cfg_scale, batch_size, cond)
    if cond is not None:
        known_tokens, known_mask = _known(known_tokens, known_mask, batch_size, length, "known")
        known_tokens = jnp.concatenate([cond, known_tokens], axis=1)
        known_mask = jnp.concatenate([jnp.ones_like(cond, bool), known_mask], axis=1)
        length += cond.shape[1]
    out = decode_maskgit(
        logits_fn,
        key,
        batch_size,
        length,
        model.mask_id,
        num_steps=num_steps,
        temperature=temperature,
        choice_temperature=choice_temperature,
        known_tokens=known_tokens,
        known_mask=known_mask,
        return_history=return_history,
    )
    p = 0 if cond is None else cond.shape[1]
    if return_history:
        return out[0][:, p:], out[1]
    return out[:, p:]
