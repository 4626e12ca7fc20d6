"""Pure training and evaluation steps: no I/O, no config tree, jittable and shardable.

`make_tokenizer_step` returns `train_step(state, batch, key, phase) -> (state, measurements)`.
The generator (encoder, quantizer, decoder) and the discriminator each have their own optax
optimizer; an update of one never touches the other's parameters or optimizer state. `phase`
(a `Phase`, static under jit: `phase_at(settings, step)` on the host) says which adversarial
parts the step holds, so before `disc_start` no discriminator work is traced at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vq_jax import losses, metrics, prior_losses, priors
from vq_jax.state import Components, PriorComponents, State, rng_stream

Measurements = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss fields the step needs (built from config.loss by the trainer)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    adversarial: str = "hinge"
    disc_weight: float = 0.8
    adaptive_weight: bool = True
    disc_start: int = 0
    disc_train_start: int = 0
    feature_matching_weight: float = 0.0
    r1_weight: float = 0.0
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    ema_decay: float = 0.0


class Phase(NamedTuple):
    """Which adversarial parts a tokenizer step holds (static under jit: one executable each).

    generator_adversarial: the generator loss has the discriminator's terms (from disc_start).
    discriminator:         the discriminator is updated (from disc_train_start).
    """

    generator_adversarial: bool
    discriminator: bool


def phase_at(s: LossSettings, step: int) -> Phase:
    """The phase of the update from `step` to `step + 1` (a host-side integer)."""
    return Phase(step >= s.disc_start, step >= s.disc_train_start)


LastLayer = tuple[jax.Array, Callable[[jax.Array], jax.Array]]


def last_layer_grad(last_layer: LastLayer, grad_out: jax.Array) -> jax.Array:
    """d(loss)/d(kernel) of the decoder's last layer, from d(loss)/d(output).

    `last_layer` is the model's `(kernel, kernel -> output)` (VQModel.last_layer): the output is
    linear in the kernel given the layer's input, so the gradient of any loss term with respect
    to the kernel needs only that input and the term's gradient with respect to the output
    image. This gives taming's adaptive weight without a second backward pass through the
    decoder.
    """
    kernel, apply = last_layer
    _, vjp = jax.vjp(apply, kernel.astype(jnp.float32))
    return vjp(grad_out.astype(jnp.float32))[0]


def _zeros(names: Iterable[str]) -> Measurements:
    return {k: jnp.zeros((), jnp.float32) for k in names}


def keep_if_finite(
    new: State, old: State, aux: Measurements, checked: Iterable[str]
) -> tuple[State, Measurements]:
    """skip_nonfinite: `new` where the measurements `checked` (those present) are all finite,
    else `old`; reports `skipped` (1 when the update was dropped)."""
    finite = jnp.all(jnp.stack([jnp.isfinite(aux[k]) for k in checked if k in aux]))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return new, dict(aux, skipped=1.0 - finite.astype(jnp.float32))


def reconstruction_loss(
    s: LossSettings, x: jax.Array, recon: jax.Array, perceptual: Callable | None = None
) -> jax.Array:
    """l1 * |x - r| + l2 * (x - r)^2 + perceptual_weight * LPIPS(x, r): taming's `nll` term."""
    loss = jnp.zeros((), jnp.float32)
    if s.l1_weight:
        loss += s.l1_weight * losses.l1_loss(x, recon)
    if s.l2_weight:
        loss += s.l2_weight * losses.l2_loss(x, recon)
    if s.perceptual_weight and perceptual is not None:
        loss += s.perceptual_weight * perceptual(x, recon)
    return loss


def reconstruction_loss_and_grad(
    s: LossSettings, x: jax.Array, recon: jax.Array, perceptual: Callable | None = None
) -> tuple[jax.Array, jax.Array, Measurements]:
    """`reconstruction_loss`, its gradient g with respect to `recon` from one backward pass, and
    the LPIPS value (as {"perceptual": ...}) when that term is on.

    The adaptive weight needs g on its own. The returned loss is `value + sum(g * (recon -
    stop_gradient(recon)))`: the same value, and the same gradient g with respect to `recon`,
    so the caller's backward pass reuses g instead of differentiating the loss (LPIPS's VGG16,
    the bulk of a VQGAN step) a second time.
    """
    use_lpips = bool(s.perceptual_weight) and perceptual is not None

    def loss_fn(r: jax.Array) -> tuple[jax.Array, Measurements]:
        if not use_lpips:
            return reconstruction_loss(s, x, r), {}
        lp = perceptual(x, r)
        return reconstruction_loss(s, x, r) + s.perceptual_weight * lp, {"perceptual": lp}

    fixed = jax.lax.stop_gradient(recon)
    (value, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(fixed)
    g = jax.lax.stop_gradient(g)
    return value + jnp.sum(g * (recon - fixed)), g, terms


# Measurements of the adversarial parts: zeros in a phase without them, so every phase reports
# the same names.
_G_ADV_NAMES = ("g_adv", "adaptive_weight", "feature_matching")


def _disc_names(s: LossSettings) -> tuple[str, ...]:
    extra = (("r1",) if s.r1_weight else ()) + (("lecam",) if s.lecam_weight else ())
    return ("logits_real", "logits_fake", *extra, "d_loss", "l2_disc_grads")


class TokenizerUpdates(NamedTuple):
    """The two halves of a tokenizer step; each writes only its own part of the state."""

    generator: Callable[..., tuple[State, Measurements, jax.Array]]
    discriminator: Callable[..., tuple[State, Measurements]] | None


def make_tokenizer_updates(comps: Components, s: LossSettings) -> TokenizerUpdates:
    """`generator(state, x, rngs, adversarial=True) -> (state, aux, recon)` and (VQGAN)
    `discriminator(state, x, fake, active=True) -> (state, aux)`; the flags are Python bools
    (a `Phase`'s fields): off, the discriminator is not applied at all."""
    model, disc = comps.model, comps.disc

    def disc_apply(disc_params: Any, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        return disc.apply({"params": disc_params}, images, return_features=True)

    def generator_loss(
        params: Any, state: State, x: jax.Array, rngs: dict[str, jax.Array], adversarial: bool
    ):
        variables = {"params": params, **state["model_state"]}
        (recon, qres), new_vars = model.apply(
            variables, x, train=True, rngs=rngs, mutable=["vq_stats", "intermediates"]
        )
        rec, rec_grad_img, rec_terms = reconstruction_loss_and_grad(s, x, recon, comps.perceptual)
        loss = rec + qres.loss
        aux: Measurements = {
            "rec_loss": rec,
            "l1": losses.l1_loss(x, recon),
            "l2": losses.l2_loss(x, recon),
            "quant_loss": qres.loss,
            **qres.aux,  # every measurement the quantizer kind gives, under its own name
        }
        aux.update(rec_terms)
        if disc is not None and adversarial:
            last_layer = model.last_layer(params, new_vars["intermediates"])
            adv, adv_aux = adversarial_terms(state, x, recon, rec_grad_img, last_layer)
            loss += adv
            aux.update(adv_aux)
        elif disc is not None:
            aux.update(_zeros(_G_ADV_NAMES))
        model_state = {k: v for k, v in new_vars.items() if k != "intermediates"}
        aux["loss"] = loss
        return loss, (aux, model_state, recon)

    def adversarial_terms(state, x, recon, rec_grad_img, last_layer: LastLayer):
        """lambda * G_adv + feature matching (the phase from `disc_start` on)."""
        disc_params = state["disc_params"]
        g_adv_fn = lambda r: losses.generator_loss(s.adversarial, disc_apply(disc_params, r)[0])
        g_adv = g_adv_fn(recon)
        if s.adaptive_weight:
            # Gradients of the two terms w.r.t. the decoder's last-layer kernel, via d/d(recon).
            adv_grad_img = jax.grad(g_adv_fn)(jax.lax.stop_gradient(recon))
            lam = losses.adaptive_weight(
                last_layer_grad(last_layer, rec_grad_img),
                last_layer_grad(last_layer, adv_grad_img),
                disc_weight=s.disc_weight,
            )
        else:
            lam = jnp.asarray(s.disc_weight, jnp.float32)
        fm = jnp.zeros((), jnp.float32)
        if s.feature_matching_weight:
            _, feats_real = disc_apply(disc_params, x)
            _, feats_fake = disc_apply(disc_params, recon)
            fm = losses.feature_matching_loss(feats_real, feats_fake)
        total = lam * g_adv + s.feature_matching_weight * fm
        return total, {"g_adv": g_adv, "adaptive_weight": lam, "feature_matching": fm}

    def d_loss_fn(disc_params: Any, state: State, x: jax.Array, fake: jax.Array):
        logits_real, _ = disc_apply(disc_params, x)
        logits_fake, _ = disc_apply(disc_params, fake)
        d_loss = losses.discriminator_loss(s.adversarial, logits_real, logits_fake)
        aux = {"logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        if s.r1_weight:
            r1 = losses.r1_penalty(lambda im: disc_apply(disc_params, im)[0], x)
            d_loss += s.r1_weight * r1
            aux["r1"] = r1
        if s.lecam_weight:
            ls = state["loss_state"]
            lecam = losses.lecam_loss(logits_real, logits_fake, ls["lecam_real"], ls["lecam_fake"])
            d_loss += s.lecam_weight * lecam
            aux["lecam"] = lecam
        aux["d_loss"] = d_loss
        return d_loss, aux

    def discriminator_update(
        state: State, x: jax.Array, fake: jax.Array, active: bool = True
    ) -> tuple[State, Measurements]:
        """One discriminator step on real vs stop_gradient(reconstruction); touches only D's
        parameters, D's optimizer state and the loss statistics. Not `active` (before
        disc_train_start): the state as it is, zero measurements."""
        aux = _zeros(_disc_names(s))
        new = dict(state)
        if active:
            (_, aux), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
                state["disc_params"], state, x, jax.lax.stop_gradient(fake)
            )
            updates, new["disc_opt_state"] = comps.disc_tx.update(
                grads, state["disc_opt_state"], state["disc_params"]
            )
            new["disc_params"] = optax.apply_updates(state["disc_params"], updates)
            ls = state["loss_state"]
            new["loss_state"] = dict(
                zip(
                    ("lecam_real", "lecam_fake"),
                    losses.update_lecam_ema(
                        ls["lecam_real"],
                        ls["lecam_fake"],
                        aux["logits_real"],
                        aux["logits_fake"],
                        s.lecam_decay,
                    ),
                    strict=True,
                )
            )
            aux["l2_disc_grads"] = optax.tree.norm(grads)
        aux["disc_active"] = jnp.asarray(float(active), jnp.float32)
        aux["disc_lr"] = comps.disc_schedule(state["step"] - s.disc_train_start)
        return new, aux

    def generator_update(
        state: State, x: jax.Array, rngs: dict[str, jax.Array], adversarial: bool = True
    ) -> tuple[State, Measurements, jax.Array]:
        """One generator step (encoder, quantizer, decoder); D's state is read, never written.
        Not `adversarial` (before disc_start): the discriminator's terms are left out."""
        (_, (aux, model_state, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state["params"], state, x, rngs, adversarial
        )
        updates, opt_state = comps.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, params=params, opt_state=opt_state, model_state=model_state)
        aux["l2_grads"] = optax.tree.norm(grads)
        aux["lr"] = comps.schedule(state["step"])
        if "ema_params" in state:
            new["ema_params"] = losses.ema_params(state["ema_params"], params, s.ema_decay)
        return new, aux, recon

    return TokenizerUpdates(generator_update, discriminator_update if disc is not None else None)


def make_tokenizer_step(
    comps: Components, s: LossSettings, *, skip_nonfinite: bool = False
) -> Callable[..., tuple[State, Measurements]]:
    """The tokenizer train step `train_step(state, batch, key, phase=None)` for VQ-VAE (no
    discriminator: `phase` is ignored) or VQGAN (`phase` required: `phase_at(s, step)`, a
    static argument under jit).

    With `skip_nonfinite`, a step whose losses or gradient norms are not finite leaves the state
    as it was (but for the step counter) and reports `skipped=1`.
    """
    updates = make_tokenizer_updates(comps, s)

    def train_step(
        state: State, batch: dict[str, jax.Array], key: jax.Array, phase: Phase | None = None
    ):
        if updates.discriminator is not None and phase is None:
            raise TypeError(
                "a VQGAN train step needs its phase: train_step(state, batch, key, "
                "phase_at(settings, step)), with phase static under jit (static_argnums=3)"
            )
        key = jax.random.fold_in(key, state["step"])
        rngs = {"dropout": rng_stream(key, "dropout"), "dead_codes": rng_stream(key, "dead_codes")}
        x = batch["image"]
        adversarial = phase is not None and phase.generator_adversarial
        new_state, aux, recon = updates.generator(state, x, rngs, adversarial)
        if updates.discriminator is not None:
            # D trains against the reconstruction made before this step's generator update.
            new_state, disc_aux = updates.discriminator(new_state, x, recon, phase.discriminator)
            aux.update(disc_aux)
        if skip_nonfinite:
            checked = ("loss", "l2_grads", "d_loss", "l2_disc_grads")
            new_state, aux = keep_if_finite(new_state, state, aux, checked)
        new_state["step"] = state["step"] + 1
        return new_state, aux

    return train_step


def make_eval_step(comps: Components) -> Callable[..., Measurements]:
    """`eval_step(params, model_state, batch) -> sums` over the real (mask=1) examples.

    Returns per-batch sums (not means) so the trainer can reduce exactly over a whole split;
    `code_counts` holds the histograms of codebook indices, one per stage: [depth, K].
    """
    model = comps.model
    codebook_size = model.quantizer.codebook_size
    depth = math.prod(getattr(model.quantizer, "index_shape", ()))

    def eval_step(params: Any, model_state: Any, batch: dict[str, jax.Array]) -> Measurements:
        x, mask = batch["image"], batch["mask"]
        recon, qres = model.apply({"params": params, **model_state}, x, train=False)
        recon = jnp.clip(recon, -1.0, 1.0)
        per_image = {
            "l1": jnp.abs(recon - x).mean(axis=(1, 2, 3)),
            "mse": jnp.square(recon - x).mean(axis=(1, 2, 3)),
            "psnr": metrics.psnr(x, recon),
        }
        if metrics.ssim_defined(x.shape):  # left out below 11x11 (e.g. 8x8 LR), never NaN
            per_image["ssim"] = metrics.ssim(x, recon)
        sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
        sums["count"] = mask.sum()
        # Any token shape: [B, h, w] or [B, h, w, depth]; one histogram per stage, [depth, K].
        idx = qres.indices.reshape(qres.indices.shape[0], -1, depth)
        weights = jnp.broadcast_to(mask.reshape(-1, 1, 1), idx.shape)
        sums["code_counts"] = jax.vmap(
            lambda i, w: metrics.code_histogram(i, codebook_size, mask=w), in_axes=2
        )(idx, weights)
        return sums

    return eval_step


# --- stage 2: the prior ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """The prior-training fields the step needs (from config.prior)."""

    class_dropout: float = 0.0  # classifier-free guidance: labels -> null class
    label_smoothing: float = 0.0  # maskgit


def _prior_logits_and_loss(
    comps: PriorComponents,
    s: PriorSettings,
    params: Any,
    tokens: jax.Array,
    labels: jax.Array | None,
    key: jax.Array,
    train: bool,
    cond: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) of the prior on flattened token grids [B, L] (its kind's loss)."""
    rngs = {"dropout": rng_stream(key, "dropout")} if train else {}
    return priors.get(comps.kind).loss(
        comps.model,
        params,
        tokens,
        labels,
        cond,
        rngs=rngs,
        mask_key=rng_stream(key, "mask"),
        train=train,
        label_smoothing=s.label_smoothing,
    )


def _prior_inputs(comps: PriorComponents, batch: dict[str, jax.Array]):
    """(tokens [B, L], labels [B] or None, condition tokens [B, P] or None) of a batch."""
    tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
    labels = batch["label"] if comps.model.num_classes else None
    cond = batch["cond"].reshape(tokens.shape[0], -1) if comps.cond_len else None
    return tokens, labels, cond


def make_prior_step(
    comps: PriorComponents, s: PriorSettings, *, skip_nonfinite: bool = False
) -> Callable[[State, dict[str, jax.Array], jax.Array], tuple[State, Measurements]]:
    """`train_step(state, {'tokens': [B, h, w], 'label': [B], ['cond': [B, h', w']]}, key) ->
    (state, measurements)`; 'cond' (the condition tokenizer's grid) for image conditions."""

    def train_step(state: State, batch: dict[str, jax.Array], key: jax.Array):
        key = jax.random.fold_in(key, state["step"])
        tokens, labels, cond = _prior_inputs(comps, batch)
        if labels is not None and s.class_dropout > 0:
            labels = prior_losses.drop_labels(
                rng_stream(key, "class_dropout"), labels, comps.model.num_classes, s.class_dropout
            )

        def loss_fn(params):
            return _prior_logits_and_loss(comps, s, params, tokens, labels, key, True, cond)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = comps.tx.update(grads, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
        aux = {
            "loss": loss,
            "accuracy": accuracy,
            "perplexity": jnp.exp(loss),
            "l2_grads": optax.tree.norm(grads),
            "lr": comps.schedule(state["step"]),
        }
        if skip_nonfinite:
            new, aux = keep_if_finite(new, state, aux, ("loss", "l2_grads"))
        new["step"] = state["step"] + 1
        return new, aux

    return train_step


def make_prior_eval_step(comps: PriorComponents, s: PriorSettings) -> Callable[..., Measurements]:
    """`eval_step(params, batch, key) -> {'loss', 'accuracy'}` (no dropout; MaskGIT masks drawn
    from the cosine schedule with `key`, so the held-out loss is comparable across evals)."""

    def eval_step(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> Measurements:
        tokens, labels, cond = _prior_inputs(comps, batch)
        loss, accuracy = _prior_logits_and_loss(comps, s, params, tokens, labels, key, False, cond)
        return {"loss": loss, "accuracy": accuracy}

    return eval_step
