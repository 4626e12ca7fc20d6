"""Train state: a plain dict pytree, and its creation from a config.

This module and `trainer.py` are the only places that read the config tree; everything they
build (modules, optimizers) takes plain fields.

State layout (keys absent when unused):
  step            int32 scalar, the number of completed updates
  params          generator (VQModel) parameters
  model_state     non-parameter model variables (e.g. EMA codebook statistics `vq_stats`)
  opt_state       generator optax state
  ema_params      polyak average of `params` (train.ema_decay > 0)
  disc_params     discriminator parameters (VQGAN)
  disc_opt_state  discriminator optax state (VQGAN)
  loss_state      running statistics of the losses (LeCam EMAs; VQGAN)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from vq_jax import priors
from vq_jax.errors import MissingFileError, UserError
from vq_jax.nets import lpips
from vq_jax.nets import quantizers as quantizers_lib
from vq_jax.nets.autoencoder import downsample_factor
from vq_jax.nets.discriminator import NLayerDiscriminator
from vq_jax.nets.transformer import GPT, MaskGITTransformer
from vq_jax.nets.vqmodel import VQModel

State = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANTIZER_KINDS = ("vq", "ema", "fsq")


def rng_stream(key: jax.Array, name: str) -> jax.Array:
    """A named, independent stream of the run's single key (stable across Python runs)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise UserError(f"config.model.dtype={name!r} is not supported; use one of {list(DTYPES)}.")
    return DTYPES[name]


def build_quantizer(qc: mlc.ConfigDict, dtype: Any) -> Any:
    """The quantizer named by config.quantizer.kind."""
    if qc.kind not in QUANTIZER_KINDS:
        raise UserError(
            f"config.quantizer.kind={qc.kind!r} is unknown; use one of {QUANTIZER_KINDS}."
        )
    if qc.kind == "fsq":
        return quantizers_lib.FSQ(levels=tuple(qc.levels), dtype=dtype)
    if qc.codebook_size < 2:
        raise UserError(
            f"config.quantizer.codebook_size={qc.codebook_size} is too small; a codebook needs at "
            "least 2 entries (typical: 512 to 16384)."
        )
    if qc.kind == "ema":
        return quantizers_lib.EMAVectorQuantizer(
            codebook_size=qc.codebook_size,
            embed_dim=qc.embed_dim,
            beta=qc.beta,
            decay=qc.decay,
            epsilon=qc.epsilon,
            dead_code_threshold=qc.dead_code_threshold,
            dtype=dtype,
        )
    return quantizers_lib.VectorQuantizer(
        codebook_size=qc.codebook_size,
        embed_dim=qc.embed_dim,
        beta=qc.beta,
        l2_normalize=qc.l2_normalize,
        lookup_dim=qc.lookup_dim or None,
        entropy_weight=qc.entropy_weight,
        entropy_temperature=qc.entropy_temperature,
        codebook_init=qc.init,
        dtype=dtype,
    )


def build_model(config: mlc.ConfigDict) -> VQModel:
    """The VQModel (encoder, quantizer, decoder) described by config.model / config.quantizer."""
    m = config.model
    dtype = _dtype(m.dtype)
    return VQModel(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        attn_levels=tuple(m.get("attn_levels", ())),  # absent in older workdirs' configs
        z_channels=m.z_channels,
        in_channels=config.input.channels,
        dropout=m.dropout,
        num_groups=m.num_groups,
        dtype=dtype,
        conv_weight_grad=m.get("conv_weight_grad", "auto"),  # absent in older workdirs' configs
        quantizer=build_quantizer(config.quantizer, dtype),
    )


def has_discriminator(config: mlc.ConfigDict) -> bool:
    return "discriminator" in config


def build_discriminator(config: mlc.ConfigDict) -> NLayerDiscriminator | None:
    if not has_discriminator(config):
        return None
    d = config.discriminator
    return NLayerDiscriminator(
        ndf=d.ndf,
        n_layers=d.n_layers,
        norm=d.norm,
        num_groups=d.num_groups,
        dtype=_dtype(config.model.dtype),
        conv_weight_grad=config.model.get("conv_weight_grad", "auto"),
    )


def make_schedule(oc: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then constant or cosine decay to 0 at `total_steps`."""
    decay_steps = max(1, total_steps - oc.warmup_steps)
    if oc.schedule == "constant":
        main = optax.constant_schedule(oc.lr)
    elif oc.schedule == "cosine":
        main = optax.cosine_decay_schedule(oc.lr, decay_steps)
    else:
        raise UserError(
            f"optimizer schedule {oc.schedule!r} is unknown; use 'constant' or 'cosine'."
        )
    if oc.warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, oc.lr, oc.warmup_steps)
    return optax.join_schedules([warmup, main], [oc.warmup_steps])


def make_optimizer(
    oc: mlc.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam(W) with the config's schedule and optional global-norm clipping."""
    schedule = make_schedule(oc, total_steps)
    parts = []
    if oc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    if oc.weight_decay > 0:
        parts.append(
            optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
        )
    else:
        parts.append(optax.adam(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps))
    return optax.chain(*parts), schedule


@dataclasses.dataclass(frozen=True)
class Components:
    """Everything built from a config that the step and the trainer need."""

    model: VQModel
    disc: NLayerDiscriminator | None
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    disc_tx: optax.GradientTransformation | None
    disc_schedule: optax.Schedule | None
    image_shape: tuple[int, int, int]
    perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # LPIPS(x, y), mean


def validate_batch_sizes(config: mlc.ConfigDict) -> None:
    """Global batch sizes must split evenly over devices and processes."""
    for name in ("batch_size", "eval_batch_size"):
        bs = config.input[name]
        if bs % jax.device_count():
            raise UserError(
                f"config.input.{name}={bs} is not divisible by the {jax.device_count()} devices; "
                f"use a multiple of {jax.device_count()}."
            )
        if bs % jax.process_count():
            raise UserError(
                f"config.input.{name}={bs} is not divisible by the {jax.process_count()} processes."
            )


def validate_config(config: mlc.ConfigDict) -> None:
    """Checks that need no data and no compilation; raises UserError naming the fix."""
    res, factor = config.input.resolution, downsample_factor(tuple(config.model.ch_mult))
    if res % factor:
        raise UserError(
            f"config.input.resolution={res} is not divisible by the downsampling factor {factor} "
            f"(2**(len(config.model.ch_mult)-1) with ch_mult={tuple(config.model.ch_mult)}); "
            f"pick a resolution that is a multiple of {factor} or change config.model.ch_mult."
        )
    validate_batch_sizes(config)
    if config.quantizer.kind == "fsq":
        levels = tuple(config.quantizer.levels)
        if not levels or any(int(lv) < 2 for lv in levels):
            raise UserError(
                f"config.quantizer.levels={levels} is invalid: FSQ needs at least one level and "
                "each level >= 2 (e.g. (8, 5, 5, 5))."
            )
    build_quantizer(config.quantizer, jnp.float32)  # raises on bad kind / codebook size


def _lpips_params(path: str) -> dict:
    """The LPIPS weights at config.loss.lpips_weights; a missing or wrong file is a UserError."""
    try:
        return lpips.load_lpips_params(path)
    except FileNotFoundError as e:
        raise MissingFileError(f"config.loss.lpips_weights={path!r}: {e}") from e
    except ValueError as e:
        raise UserError(f"config.loss.lpips_weights={path!r}: {e}") from e


def build(config: mlc.ConfigDict) -> Components:
    validate_config(config)
    steps = config.train.steps
    tx, schedule = make_optimizer(config.optimizer.generator, steps)
    disc = build_discriminator(config)
    disc_tx = disc_schedule = None
    if disc is not None:
        disc_tx, disc_schedule = make_optimizer(config.optimizer.discriminator, steps)
    shape = (config.input.resolution, config.input.resolution, config.input.channels)
    perceptual = None
    if config.loss.get("perceptual_weight", 0.0) > 0:
        # Fails here, before any data or compilation, with the command that makes the file.
        params = _lpips_params(config.loss.lpips_weights)
        perceptual = lpips.lpips_loss_fn(params, dtype=_dtype(config.model.dtype))
    return Components(
        build_model(config), disc, tx, schedule, disc_tx, disc_schedule, shape, perceptual
    )


def init_state(comps: Components, key: jax.Array, *, ema: bool) -> State:
    """Initial state from the run's key; pure, so it can be jitted or eval_shape'd."""
    x = jnp.zeros((1, *comps.image_shape), jnp.float32)
    variables = comps.model.init(
        {"params": rng_stream(key, "params"), "dropout": rng_stream(key, "dropout")}, x
    )
    params = variables["params"]
    state: State = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": {k: v for k, v in variables.items() if k != "params"},
        "opt_state": comps.tx.init(params),
    }
    if ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    if comps.disc is not None:
        disc_params = comps.disc.init({"params": rng_stream(key, "disc_params")}, x)["params"]
        state["disc_params"] = disc_params
        state["disc_opt_state"] = comps.disc_tx.init(disc_params)
        state["loss_state"] = {"lecam_real": jnp.zeros(()), "lecam_fake": jnp.zeros(())}
    return state


# --- stage 2: the prior over token grids -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PriorComponents:
    """The prior network, its optimizer and the token grids it models (and is conditioned on)."""

    model: GPT | MaskGITTransformer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    token_shape: tuple[int, int]
    vocab_size: int
    kind: str  # the key of vq_jax.priors (config.prior.kind)
    condition: str = "none"  # none | class | image
    cond_shape: tuple[int, int] | None = None  # image: the condition tokenizer's token grid
    cond_vocab: int = 0  # image: the condition tokenizer's codebook size

    @property
    def cond_len(self) -> int:
        return 0 if self.cond_shape is None else self.cond_shape[0] * self.cond_shape[1]


def build_prior(
    config: mlc.ConfigDict,
    token_shape: tuple[int, int],
    vocab_size: int,
    cond_shape: tuple[int, int] | None = None,
    cond_vocab: int = 0,
) -> PriorComponents:
    """The prior of config.prior over token grids of `token_shape` with `vocab_size` codes;
    with condition 'image', conditioned on grids of `cond_shape` with `cond_vocab` codes."""
    pc = config.prior
    kind = priors.get(pc.kind)
    condition = priors.condition_of(pc)
    if condition == "image" and cond_shape is None:
        raise UserError(
            "config.prior.condition='image' needs a condition tokenizer; set "
            "--config.condition_tokenizer_workdir=W (a trained vq-jax tokenizer of the condition "
            "images, e.g. configs/vqvae.py:fashion_mnist_lr8)."
        )
    if condition != "image":
        cond_shape, cond_vocab = None, 0
    cond_len = 0 if cond_shape is None else cond_shape[0] * cond_shape[1]
    model = kind.network(
        vocab_size=vocab_size,
        seq_len=token_shape[0] * token_shape[1],
        num_classes=pc.num_classes if condition == "class" else 0,
        num_layers=pc.num_layers,
        num_heads=pc.num_heads,
        embed_dim=pc.embed_dim,
        mlp_ratio=pc.mlp_ratio,
        dropout=pc.dropout,
        dtype=_dtype(pc.dtype),
        cond_len=cond_len,
        cond_vocab=cond_vocab,
    )
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    return PriorComponents(
        model,
        tx,
        schedule,
        tuple(token_shape),
        vocab_size,
        kind=pc.kind,
        condition=condition,
        cond_shape=None if cond_shape is None else tuple(cond_shape),
        cond_vocab=cond_vocab,
    )


def init_prior_state(comps: PriorComponents, key: jax.Array) -> State:
    """Initial prior state: {'step', 'params', 'opt_state'} (pure)."""
    seq_len = comps.token_shape[0] * comps.token_shape[1]
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if comps.model.num_classes else None
    cond = jnp.zeros((1, comps.cond_len), jnp.int32) if comps.cond_len else None
    params = comps.model.init(
        {"params": rng_stream(key, "prior_params")}, tokens, labels, cond=cond
    )["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": comps.tx.init(params)}
