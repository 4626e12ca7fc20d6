"""Train state: a plain dict pytree, and its creation from a config.

This module and the training code (`trainer.py`, `loop.py`, `tasks/`) are the only places that
read the config tree; everything they build (modules, optimizers) takes plain fields.

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
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from vq_jax import priors
from vq_jax.errors import MissingFileError, UserError
from vq_jax.nets import lpips, quantizer_registry
from vq_jax.nets.autoencoder import downsample_factor
from vq_jax.nets.discriminator import NLayerDiscriminator
from vq_jax.nets.transformer import GPT, MaskGITTransformer
from vq_jax.nets.vqmodel import VQModel

State = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANTIZER_KINDS = quantizer_registry.names()


def rng_stream(key: jax.Array, name: str) -> jax.Array:
    """A named, independent stream of the run's single key (stable across Python runs)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise UserError(f"config.model.dtype={name!r} is not supported; use one of {list(DTYPES)}.")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer config resolved to plain values: the kind, the shared sizes and the kind's
    fields (its subsection, or for a workdir written before subsections, the flat fields it
    used), defaults filled in from the module."""

    kind: str
    codebook_size: Any
    embed_dim: Any
    fields: dict[str, Any]

    def as_config(self) -> dict[str, Any]:
        """The canonical config form (what decides the quantizer's state): for comparing a
        workdir's saved config with the current one, whatever layout each was written in."""
        return {
            "kind": self.kind,
            "codebook_size": self.codebook_size,
            "embed_dim": self.embed_dim,
            self.kind: dict(self.fields),
        }


def quantizer_spec(qc: Any) -> QuantizerSpec:
    """Resolves config.quantizer (a ConfigDict or the dict a checkpoint saved) to a spec.

    Today's layout: ``kind``, ``codebook_size``, ``embed_dim`` and one subsection per kind.
    The flat layout of workdirs written before the registry (one section mixing every kind's
    fields: beta, decay, levels, init, ...) is read through each kind's ``legacy`` names; its
    FSQ ignored codebook_size / embed_dim, so they are taken from the levels there.
    """
    kind_name = qc["kind"]
    kind = quantizer_registry.get(kind_name)
    if kind is None:
        raise UserError(
            f"config.quantizer.kind={kind_name!r} is unknown; valid: one of "
            f"{', '.join(map(repr, quantizer_registry.names()))}; set e.g. "
            "--config.quantizer.kind=vq."
        )
    fields = kind.defaults()
    codebook_size, embed_dim = qc.get("codebook_size"), qc.get("embed_dim")
    sub = qc.get(kind_name)
    if sub is not None:
        fields.update({k: v for k, v in dict(sub).items() if k in fields})
    else:  # a flat, pre-registry config
        fields.update({new: qc[old] for old, new in kind.legacy.items() if old in qc})
        if kind_name == "fsq":
            levels = tuple(fields["levels"])
            codebook_size, embed_dim = math.prod(levels), len(levels)
    if not kind.uses_embed_dim:
        embed_dim = None  # follows from the kind's fields (fsq: len(levels); lfq: bits)
    return QuantizerSpec(kind_name, codebook_size, embed_dim, fields)


def canonical_quantizer_config(qc: dict) -> dict:
    """`quantizer_spec(qc).as_config()`, or `qc` itself when it names no known kind."""
    try:
        return quantizer_spec(qc).as_config()
    except (UserError, KeyError, TypeError):
        return qc


def quantizer_problems(qc: Any) -> list[str]:
    """One line per problem of config.quantizer (kind, sizes, the kind's fields), naming the
    field, its value, what is valid and the flag that fixes it."""
    try:
        spec = quantizer_spec(qc)
    except UserError as e:
        return [str(e).rstrip(".")]
    kind = quantizer_registry.get(spec.kind)
    return [
        f"config.quantizer.{field}={value!r} is invalid for quantizer.kind={spec.kind!r}; "
        f"valid: {valid}; set e.g. --config.quantizer.{field}={example}"
        for field, value, valid, example in kind.check(
            spec.codebook_size, spec.embed_dim, spec.fields
        )
    ]


def build_quantizer(qc: Any, dtype: Any) -> Any:
    """The quantizer named by config.quantizer.kind (see quantizer_registry)."""
    found = quantizer_problems(qc)
    if found:
        raise UserError(found[0] + ".")
    spec = quantizer_spec(qc)
    kind = quantizer_registry.get(spec.kind)
    return kind.build(spec.codebook_size, spec.embed_dim, spec.fields, dtype)


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
    build_quantizer(config.quantizer, jnp.float32)  # raises on bad kind / sizes / fields


def _lpips_params(path: str) -> dict:
    """The LPIPS weights at config.loss.lpips_weights ("" means `lpips.default_weights_path()`:
    $VQ_JAX_LPIPS_WEIGHTS or ~/.cache/vq_jax/lpips_vgg16.npz); a missing or wrong file is a
    UserError that says how to make it."""
    path = path or lpips.default_weights_path()
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
    token_shape: tuple[int, ...]  # (h, w) or (h, w, depth); flattened row-major (depth fastest)
    vocab_size: int
    kind: str  # the key of vq_jax.priors (config.prior.kind)
    condition: str = "none"  # none | class | image
    cond_shape: tuple[int, ...] | None = None  # image: the condition tokenizer's token grid
    cond_vocab: int = 0  # image: the condition tokenizer's codebook size

    @property
    def cond_len(self) -> int:
        return 0 if self.cond_shape is None else math.prod(self.cond_shape)


def build_prior(
    config: mlc.ConfigDict,
    token_shape: tuple[int, ...],
    vocab_size: int,
    cond_shape: tuple[int, ...] | None = None,
    cond_vocab: int = 0,
) -> PriorComponents:
    """The prior of config.prior over token grids of `token_shape` with `vocab_size` codes;
    with condition 'image', conditioned on grids of `cond_shape` with `cond_vocab` codes.

    The sequence is the grid flattened row-major: raster order over positions and, for a
    tokenizer with a depth axis (residual VQ), its stages fastest: (0,0,d0), (0,0,d1), ...,
    (0,1,d0), ...; so an autoregressive prior predicts stage s of a position after its stages
    before s, and all stages of the positions before it."""
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
    cond_len = 0 if cond_shape is None else math.prod(cond_shape)
    model = kind.network(
        vocab_size=vocab_size,
        seq_len=math.prod(token_shape),
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
    seq_len = math.prod(comps.token_shape)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if comps.model.num_classes else None
    cond = jnp.zeros((1, comps.cond_len), jnp.int32) if comps.cond_len else None
    params = comps.model.init(
        {"params": rng_stream(key, "prior_params")}, tokens, labels, cond=cond
    )["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": comps.tx.init(params)}
