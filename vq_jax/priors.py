"""The prior interface: a kind of stage-2 prior is one registry entry naming its network, its
loss and its sampler; everything else (state, steps, api, trainer) looks it up by key.

Two independent axes describe a prior (``config.prior``):

* ``kind`` (:data:`KINDS`): ``autoregressive`` (a causal :class:`GPT`, next-token loss, KV-cache
  sampling) or ``maskgit`` (a bidirectional :class:`MaskGITTransformer`, masked-token loss,
  iterative parallel decoding). A new kind is one :class:`PriorKind` and one :func:`register`.
* ``condition`` (:data:`CONDITIONS`): ``none``, ``class`` (a class label, the start / class
  token) or ``image`` (the token grid of a second, condition tokenizer: a GPT prefix, a MaskGIT
  input that is never masked). Every kind serves every condition through the same network
  fields (``num_classes``, ``cond_len``, ``cond_vocab``), so the conditional variants need no
  entries of their own: kinds x conditions would be six entries saying the same thing twice.

Configs written before ``condition`` existed mean ``class`` when ``num_classes > 0`` and
``none`` otherwise (:func:`condition_of`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import linen as nn

from vq_jax import prior_losses, sampling
from vq_jax.errors import UserError
from vq_jax.nets.transformer import GPT, MaskGITTransformer

CONDITIONS = ("none", "class", "image")

# loss(model, params, tokens [B, L], labels [B] | None, cond [B, P] | None, *, rngs, mask_key,
#      train, label_smoothing) -> (loss, accuracy); only target tokens are counted.
LossFn = Callable[..., tuple[jax.Array, jax.Array]]
# sample(model, params, key, num, *, labels, cond, known_tokens, known_mask, settings)
#      -> tokens [num, L]; settings is config.sampling (temperature, top_k, ...).
SampleFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class PriorKind:
    """One kind of prior: its network class, its training loss and its sampler."""

    name: str
    network: type[nn.Module]
    loss: LossFn
    sample: SampleFn


_REGISTRY: dict[str, PriorKind] = {}


def register(kind: PriorKind) -> PriorKind:
    """Adds a kind under ``kind.name`` (``config.prior.kind``)."""
    _REGISTRY[kind.name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> PriorKind:
    """The registered kind ``name``; an unknown name is a one-line UserError."""
    if name not in _REGISTRY:
        raise UserError(
            f"config.prior.kind={name!r} is unknown; use one of {kinds()} "
            f"(e.g. --config.prior.kind=maskgit)."
        )
    return _REGISTRY[name]


def condition_of(prior_config: Mapping[str, Any]) -> str:
    """``config.prior.condition``. Absent (older workdirs) it means what ``num_classes`` meant:
    ``class`` when ``num_classes > 0``, else ``none``; ``class`` with ``num_classes=0`` is
    ``none`` too (``--config.prior.num_classes=0`` keeps meaning unconditional)."""
    cond = prior_config.get("condition", None)
    if not cond or cond == "class":
        return "class" if prior_config.get("num_classes", 0) else "none"
    if cond not in CONDITIONS:
        raise UserError(
            f"config.prior.condition={cond!r} is unknown; use one of {CONDITIONS} "
            "(image: also set config.condition_tokenizer_workdir)."
        )
    return cond


# --- autoregressive -----------------------------------------------------------------------------


def _ar_loss(model, params, tokens, labels, cond, *, rngs, mask_key, train, label_smoothing):
    del mask_key, label_smoothing
    logits = model.apply({"params": params}, tokens, labels, train=train, cond=cond, rngs=rngs)
    return prior_losses.ar_loss(logits, tokens)  # logits cover the target positions only


def _ar_sample(model, params, key, num, *, labels, cond, known_tokens, known_mask, settings):
    return sampling.sample_autoregressive(
        model,
        params,
        key,
        num,
        labels=labels,
        temperature=settings["temperature"],
        top_k=int(settings["top_k"]),
        top_p=settings["top_p"],
        cfg_scale=float(settings["cfg_scale"]),
        prefix=known_tokens,
        prefix_mask=known_mask,
        cond=cond,
    )


# --- maskgit ------------------------------------------------------------------------------------


def _maskgit_loss(model, params, tokens, labels, cond, *, rngs, mask_key, train, label_smoothing):
    masked, mask = prior_losses.maskgit_mask(mask_key, tokens, model.mask_id)
    logits = model.apply({"params": params}, masked, labels, train=train, cond=cond, rngs=rngs)
    return prior_losses.maskgit_loss(
        logits, tokens, mask, label_smoothing=label_smoothing if train else 0.0
    )


def _maskgit_sample(model, params, key, num, *, labels, cond, known_tokens, known_mask, settings):
    return sampling.sample_maskgit(
        model,
        params,
        key,
        num,
        labels=labels,
        num_steps=int(settings["maskgit_steps"]),
        temperature=settings["temperature"],
        choice_temperature=settings["choice_temperature"],
        cfg_scale=float(settings["cfg_scale"]),
        known_tokens=known_tokens,
        known_mask=known_mask,
        cond=cond,
    )


register(PriorKind("autoregressive", GPT, _ar_loss, _ar_sample))
register(PriorKind("maskgit", MaskGITTransformer, _maskgit_loss, _maskgit_sample))
