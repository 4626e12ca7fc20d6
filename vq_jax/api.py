"""Use a trained tokenizer from its workdir in three lines:

tok = vq_jax.load("W")
tokens = tok.encode(images)      # uint8 [N,H,W,C] (or float in [-1,1]) -> int32 [N,h,w]
images = tok.decode(tokens)      # -> uint8 [N,H,W,C]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import checkpoints
from vq_jax import state as state_lib
from vq_jax.metrics import to_uint8


def config_from_dict(d: dict) -> mlc.ConfigDict:
    """The ConfigDict saved with a checkpoint (lists back to tuples where the schema wants them)."""
    return mlc.ConfigDict(d)


def restore_params(workdir: str, step: int | None = None, *, use_ema: bool = True):
    """(config, params, model_state, step) of a tokenizer workdir's checkpoint."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train one first with "
            f"`python train.py --config=... --workdir={workdir}`."
        )
    ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(
                f"{ckpt_dir} holds no complete checkpoint; train (or let training reach "
                "train.checkpoint_every) first."
            )
        config = config_from_dict(ckpt.read_config(step))
        comps = state_lib.build(config)
        key = jax.random.key(config.seed)
        init_fn = functools.partial(state_lib.init_state, comps, ema=config.train.ema_decay > 0)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = checkpoints.abstract_like(jax.eval_shape(init_fn, key), sharding)
        if step is None:
            restored = ckpt.restore_latest(abstract)
            assert restored is not None
            step, state, _, _ = restored
        else:
            state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
    return config, comps, params, state["model_state"], step


@dataclasses.dataclass
class Tokenizer:
    """A trained VQ tokenizer: images <-> token grids."""

    config: mlc.ConfigDict
    model: Any
    params: Any
    model_state: Any
    step: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        r = self.config.input.resolution
        return (r, r, self.config.input.channels)

    @property
    def token_shape(self) -> tuple[int, int]:
        f = 2 ** (len(self.config.model.ch_mult) - 1)
        return (self.image_shape[0] // f, self.image_shape[1] // f)

    def _variables(self) -> dict:
        return {"params": self.params, **self.model_state}

    def _as_float(self, images: np.ndarray) -> jax.Array:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None] if self.image_shape[2] == 1 else images[None]
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images have shape {images.shape[1:]} but this tokenizer takes {self.image_shape} "
                "(preprocess them the way training did: vq_jax.data.preprocess)."
            )
        if images.dtype == np.uint8:
            return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        return jnp.asarray(images, jnp.float32)

    @functools.cached_property
    def _encode(self):
        return jax.jit(lambda v, x: self.model.apply(v, x, method="encode")[1].indices)

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda v, t: self.model.apply(v, t, method="decode_indices"))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] (or float in [-1, 1]) -> int32 token grids [N, h, w]."""
        return np.asarray(self._encode(self._variables(), self._as_float(images)))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int32 token grids [N, h, w] -> uint8 images [N, H, W, C]."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(
                f"tokens have shape {tokens.shape} but this tokenizer decodes [N, "
                f"{self.token_shape[0]}, {self.token_shape[1]}] grids."
            )
        size = self.model.quantizer.codebook_size
        if tokens.size and (tokens.min() < 0 or tokens.max() >= size):
            raise ValueError(
                f"token values must lie in [0, {size}); got [{tokens.min()}, {tokens.max()}]."
            )
        out = self._decode(self._variables(), jnp.asarray(tokens, jnp.int32))
        return to_uint8(np.asarray(out))

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(images))


def load(workdir: str, step: int | None = None, *, use_ema: bool = True) -> Tokenizer:
    """Loads the tokenizer trained in `workdir` (its EMA parameters when present)."""
    config, comps, params, model_state, step = restore_params(workdir, step, use_ema=use_ema)
    return Tokenizer(config, comps.model, params, model_state, step)


def iterate_split(
    tok: Tokenizer,
    split: str,
    *,
    batch_size: int = 256,
    num: int | None = None,
    data_dir: str | None = None,
):
    """Yields (uint8 images, float images, labels) batches of a split of the tokenizer's dataset."""
    from vq_jax import data, trainer  # deferred: the API itself needs no input pipeline

    config = tok.config.copy_and_resolve_references()
    if data_dir is not None:
        config.input.data_dir = data_dir
    config.input.train_split = config.input.eval_split = split
    _, source = trainer.make_sources(config)
    preprocess_fn = trainer.make_preprocess(config)
    seen = 0
    for batch in data.make_eval_batches(
        source,
        batch_size=batch_size,
        preprocess_fn=preprocess_fn,
        process_index=0,
        process_count=1,
    ):
        keep = batch["mask"] > 0
        if num is not None:
            keep &= np.cumsum(keep) + seen <= num
        if not keep.any():
            break
        images = np.asarray(batch["image"])[keep]
        seen += int(keep.sum())
        yield to_uint8(images), images, np.asarray(batch["label"])[keep]
        if num is not None and seen >= num:
            break
