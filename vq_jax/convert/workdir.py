"""A source checkpoint -> an ordinary vq-jax workdir (its config and a step-0 checkpoint).

The workdir is written by the same `Checkpointer` and state layout as training, so `load`,
`sample.py`, prior training (`tokenizer_workdir`) and fine-tuning (`train.init_from`) read it
like any other; nothing after this module knows where the weights came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from vq_jax import checkpoints
from vq_jax import state as state_lib
from vq_jax.convert import llamagen, mapping, taming
from vq_jax.convert.arch import Architecture, ConversionError

SOURCES = ("taming", "llamagen")


def configure(base: mlc.ConfigDict, arch: Architecture, dtype: str) -> mlc.ConfigDict:
    """`base` (a tokenizer config) with the model, quantizer and image shape of `arch`."""
    config = base.copy_and_resolve_references()
    config.unlock()
    config.model.update(
        ch=arch.ch,
        ch_mult=tuple(arch.ch_mult),
        num_res_blocks=arch.num_res_blocks,
        attn_resolutions=(),
        attn_levels=tuple(arch.attn_levels),
        z_channels=arch.z_channels,
        dropout=0.0,
        num_groups=arch.num_groups,
        dtype=dtype,
    )
    config.quantizer.update(kind="vq", codebook_size=arch.codebook_size, embed_dim=arch.embed_dim)
    config.quantizer.vq.update(l2_normalize=arch.l2_normalize, lookup_dim=0, entropy_weight=0.0)
    config.input.update(resolution=arch.resolution, channels=arch.in_channels)
    config.lock()
    return config


def read_source(
    source: str, checkpoint: str, *, yaml_path: str | None = None, model: Any = None
) -> tuple[Architecture, Any, mapping.KeyFn, Any, str]:
    """(architecture, state dict, key function, ignored-key test, error hint) of a source."""
    if source == "taming":
        arch = taming.architecture(yaml_path)  # before reading a large checkpoint
        return arch, taming.state_dict(checkpoint), taming.torch_key, taming.ignored, taming.HINT
    if source == "llamagen":
        named = model if isinstance(model, llamagen.LlamaGenModel) else None
        named = named or llamagen.model_by_name(model)
        sd = llamagen.state_dict(checkpoint)
        arch = llamagen.architecture(sd, named)
        key_fn = llamagen.key_fn(len(arch.ch_mult))
        return arch, sd, key_fn, llamagen.ignored, llamagen.HINT
    raise ConversionError(f"--source={source!r} is unknown; use one of {', '.join(SOURCES)}.")


def write_workdir(config: mlc.ConfigDict, params: Any, workdir: str) -> None:
    """Saves `params` as step 0 of a fresh train state of `config` in `workdir`."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if checkpoints.newest_step_dir(ckpt_dir) is not None:
        raise ConversionError(
            f"--workdir={workdir!r} already holds checkpoints; give a new or empty directory."
        )
    comps = state_lib.build(config)
    ema = config.train.ema_decay > 0
    init = functools.partial(state_lib.init_state, comps, ema=ema)
    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, key)  # the layout; running the model is not needed
    params = jax.tree.map(jnp.asarray, params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["model_state"]),
        "opt_state": comps.tx.init(params),
    }
    if ema:
        state["ema_params"] = params
    if comps.disc is not None:  # a VQGAN base config: a fresh discriminator, as training has
        fresh = jax.jit(init)(key)
        state.update({k: fresh[k] for k in ("disc_params", "disc_opt_state", "loss_state")})
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        raise AssertionError("converted state layout differs from init_state's")
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
    config_dict = json.loads(config.to_json_best_effort())
    ckpt.save(0, state, {}, config_dict)  # no data position: a run from here starts it fresh
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def convert(
    source: str,
    checkpoint: str,
    workdir: str,
    *,
    base_config: mlc.ConfigDict,
    yaml_path: str | None = None,
    model: Any = None,
    dtype: str = "float32",
    resolution: int = 0,
) -> mlc.ConfigDict:
    """Converts a taming (`yaml_path`) or LlamaGen (`model`: 'VQ-16', 'VQ-8' or a
    `llamagen.LlamaGenModel`) checkpoint into a workdir; returns the config written.

    `base_config` gives everything that is not the generator's shape (data, losses, optimizer,
    seed), e.g. `configs/vqvae.py`'s default; `dtype` is the compute dtype (float32: exact);
    `resolution` > 0 replaces the source's image size (e.g. 384 for LlamaGen's VQ-16 at 24x24
    tokens; attention is placed by level, so the same blocks run).
    """
    if dtype not in state_lib.DTYPES:
        raise ConversionError(f"--dtype={dtype!r} is unknown; use one of {list(state_lib.DTYPES)}.")
    arch, sd, key_fn, ignored, hint = read_source(
        source, checkpoint, yaml_path=yaml_path, model=model
    )
    if resolution:
        arch = dataclasses.replace(arch, resolution=resolution)
    config = configure(base_config, arch, dtype)
    comps = state_lib.build(config)
    abstract = jax.eval_shape(
        functools.partial(state_lib.init_state, comps, ema=False), jax.random.key(0)
    )["params"]
    params = mapping.fill_params(sd, abstract, key_fn, source=source, ignored=ignored, hint=hint)
    write_workdir(config, params, workdir)
    return config
