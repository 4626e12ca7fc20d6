"""Fine-tuning: start a new tokenizer run from another workdir's generator (`train.init_from`).

Distinct from resume, which restores everything of the same run: here only the generator
(encoder, decoder, quantizer: `params` and the codebook statistics in `model_state`) comes
from the source workdir, a converted one or any trained one; the optimizer, the discriminator,
the EMA copy (set to the loaded weights) and the data stream start fresh. The source's
parameters are those `vq_jax.load` uses (its EMA copy when it kept one).

The generator's architecture is the source's: its `model` and `quantizer` config sections
replace the run's, except how the run computes (`model.dtype`). The
image channels must agree; the resolution may differ.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections as mlc

from vq_jax import api, checkpoints
from vq_jax.errors import UserError
from vq_jax.state import Components, State

KEEP_FROM_RUN = ("dtype",)  # model entries that say how, not what
REMOVED = ("conv_weight_grad",)  # model entries older sources carry that mean nothing now


def init_from(config: mlc.ConfigDict) -> str:
    """The source workdir of a fine-tuning run ("" for none; priors have none)."""
    if "prior" in config:
        return ""
    return config.train.get("init_from", "") or ""


def _source_config(source: str) -> dict:
    ckpt_dir = os.path.join(source, "checkpoints")
    if checkpoints.newest_step_dir(ckpt_dir) is None:
        raise UserError(
            f"config.train.init_from={source!r} holds no checkpoint ({ckpt_dir}); point it at a "
            "trained or converted tokenizer workdir (scripts/convert_checkpoint.py writes one)."
        )
    ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False, read_only=True)
    try:
        return ckpt.read_config()
    finally:
        ckpt.close()


def with_source_generator(config: mlc.ConfigDict, workdir: str) -> mlc.ConfigDict:
    """`config` with the generator architecture of its `train.init_from` workdir."""
    source = init_from(config)
    if not source:
        return config
    if os.path.abspath(source) == os.path.abspath(workdir):
        raise UserError(
            f"config.train.init_from={source!r} is this run's own workdir; to continue a run, "
            "drop init_from (a restart resumes), or pass a new --workdir to fine-tune."
        )
    # A fine-tuning run that has checkpoints resumes with the architecture it saved, so it does
    # not need the source any more (which may have moved since).
    own = os.path.join(workdir, "checkpoints")
    saved = _source_config(workdir if checkpoints.newest_step_dir(own) is not None else source)
    if "prior" in saved or "model" not in saved:
        raise UserError(
            f"config.train.init_from={source!r} is not a tokenizer workdir; point it at one "
            "written by train.py with a tokenizer config or by scripts/convert_checkpoint.py."
        )
    channels = saved["input"]["channels"]
    if config.input.channels != channels:
        raise UserError(
            f"config.input.channels={config.input.channels} but the generator in {source!r} takes "
            f"{channels}-channel images; pass --config.input.channels={channels} (and "
            "--config.input.convert_channels=True to convert grayscale <-> RGB data)."
        )
    out = config.copy_and_resolve_references()
    out.unlock()
    model = {k: v for k, v in saved["model"].items() if k not in REMOVED}
    for key in KEEP_FROM_RUN:
        if key in config.model:
            model[key] = config.model[key]
    out.model = mlc.ConfigDict(model)
    out.quantizer = mlc.ConfigDict(saved["quantizer"])
    out.lock()
    return out


def warm_start(state: State, comps: Components, source: str, sharding: Any) -> State:
    """A freshly initialised train state with the generator of `source` and fresh optimizer."""
    _, _, params, model_state, step = api.restore_params(source, sharding=sharding)
    want = jax.tree.structure(state["params"])
    if jax.tree.structure(params) != want:
        raise UserError(
            f"the generator in config.train.init_from={source!r} has another parameter tree "
            "than this run's model; fine-tune with the source's model and quantizer config."
        )
    state = dict(state)
    state["params"] = params
    state["model_state"] = model_state
    state["opt_state"] = jax.jit(comps.tx.init, out_shardings=sharding)(params)
    if "ema_params" in state:
        state["ema_params"] = jax.tree.map(lambda x: x.copy(), params)
    print(f"initialised the generator from {source} (its step {step})", flush=True)
    return state
