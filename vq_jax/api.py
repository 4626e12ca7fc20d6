"""The user API over workdirs: `load` a tokenizer, `load_prior` a prior; encode, decode, sample.

A trained tokenizer in three lines:

tok = vq_jax.load("W")
tokens = tok.encode(images)      # uint8 [N,H,W,C] -> int32 [N,h,w]
images = tok.decode(tokens)      # -> uint8 [N,H,W,C]

Pixels are uint8 in [0, 255]. Float pixels are taken only with their range stated:
`tok.encode(x, value_range=(-1, 1))` (what training feeds the model), `(0, 1)` or `(0, 255)`;
any other dtype (int64, bool, a Python list) is refused with the fix, as are NaN/Inf values,
floats outside the stated range and an empty batch: a guessed convention would give tokens
that silently disagree with the uint8 ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import checkpoints, data, priors, validate
from vq_jax import state as state_lib
from vq_jax.cpu import xla_options
from vq_jax.errors import MissingFileError, UserError
from vq_jax.metrics import to_uint8
from vq_jax.nets.transformer import check_labels

# The float conventions `Tokenizer.encode` accepts (stated with value_range=...).
FLOAT_RANGES = ((-1.0, 1.0), (0.0, 1.0), (0.0, 255.0))


def restore_state(
    workdir: str,
    make_init: Callable[[mlc.ConfigDict], Callable[[jax.Array], Any]],
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[mlc.ConfigDict, Any, int]:
    """(config, state, step) of a workdir's checkpoint (the newest restorable one by default).

    `make_init(config)` returns the state's init function, whose abstract output is the restore
    target; arrays land on `sharding` (default: this process's first device).
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise MissingFileError(
            f"No checkpoints in {workdir!r} (expected {ckpt_dir}); train one first with "
            f"`python train.py --config=... --workdir={workdir}`."
        )
    ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False, read_only=True)  # never writes
    try:
        if not ckpt.steps():
            raise MissingFileError(
                f"{ckpt_dir} holds no complete checkpoint; train (or let training reach "
                "train.checkpoint_every) first."
            )
        if step is not None and step not in ckpt.steps():
            raise UserError(
                f"step={step}: {ckpt_dir} has no checkpoint at that step; valid: one of "
                f"{ckpt.steps()}, or leave it unset (--step) for the newest."
            )
        config = mlc.ConfigDict(ckpt.read_config(step))
        init_fn = make_init(config)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = checkpoints.abstract_like(
            jax.eval_shape(init_fn, jax.random.key(config.seed)), sharding
        )
        if step is None:
            step, state, _, _ = ckpt.restore_latest(abstract)
        else:
            state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return config, state, step


def restore_params(
    workdir: str,
    step: int | None = None,
    *,
    use_ema: bool = True,
    sharding: jax.sharding.Sharding | None = None,
):
    """(config, components, params, model_state, step) of a tokenizer workdir."""
    built = {}

    def make_init(config):
        if "prior" in config:
            raise UserError(
                f"{workdir} holds a prior, not a tokenizer; load it with vq_jax.load_prior "
                f"(sample.py --prior_workdir={workdir}), or pass the tokenizer's workdir "
                f"(config.tokenizer_workdir={config.tokenizer_workdir!r})."
            )
        built["comps"] = comps = state_lib.build(config)
        return functools.partial(state_lib.init_state, comps, ema=config.train.ema_decay > 0)

    config, state, step = restore_state(workdir, make_init, step, sharding)
    params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
    return config, built["comps"], params, state["model_state"], step


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
    def codebook_size(self) -> int:
        return self.model.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.model.ch_mult) - 1)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The tokens of one image: (h, w), or (h, w, depth) for residual VQ."""
        f = self.downsample_factor
        index_shape = tuple(getattr(self.model.quantizer, "index_shape", ()))
        return (self.image_shape[0] // f, self.image_shape[1] // f, *index_shape)

    @property
    def variables(self) -> dict:
        """The model's variables, {'params': ..., **model_state}, as `model.apply` takes them."""
        return {"params": self.params, **self.model_state}

    def as_float(
        self, images: np.ndarray, value_range: tuple[float, float] | None = None
    ) -> jax.Array:
        """uint8 [N,H,W,C] (or float in the stated `value_range`) -> float32 in [-1, 1];
        dtype, range, finiteness, emptiness and shape checked (see the module docstring)."""
        if not isinstance(images, np.ndarray | jax.Array):
            raise UserError(
                f"images is a {type(images).__name__}; pass an array: np.asarray(images, "
                "np.uint8) for pixels in [0, 255] (or floats with value_range=(lo, hi))."
            )
        images = np.asarray(images)
        shape_hint = f"[N, {', '.join(str(d) for d in self.image_shape)}]"
        if images.ndim == 3:
            images = images[..., None] if self.image_shape[2] == 1 else images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise UserError(
                f"images have shape {images.shape[1:] if images.ndim == 4 else images.shape} but "
                f"this tokenizer takes {self.image_shape} images, i.e. {shape_hint} (preprocess "
                "them the way training did: vq_jax.data.preprocess)."
            )
        if images.shape[0] == 0:
            raise UserError(f"images is an empty batch (shape {images.shape}); pass N >= 1.")
        lo_hi = None if value_range is None else tuple(float(v) for v in value_range)
        if images.dtype == np.uint8:
            if lo_hi not in (None, (0.0, 255.0)):
                raise UserError(
                    f"value_range={value_range} for uint8 images; uint8 pixels are [0, 255]: drop "
                    "value_range (it is for float images)."
                )
            return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        if images.dtype.kind != "f":
            raise UserError(
                f"images have dtype {images.dtype}; pass uint8 pixels in [0, 255] "
                "(images.astype(np.uint8)) or floats with value_range=(-1, 1), (0, 1) or (0, 255)."
            )
        if lo_hi not in FLOAT_RANGES:
            raise UserError(
                f"float images need their range stated: value_range={value_range} is not one of "
                f"{[tuple(r) for r in FLOAT_RANGES]}; e.g. tok.encode(x, value_range=(-1, 1)) for "
                "what training feeds the model, or pass uint8 pixels."
            )
        x = images.astype(np.float32)
        if not np.isfinite(x).all():
            raise UserError(
                f"images hold {int(np.sum(~np.isfinite(x)))} NaN/Inf values; pass finite pixels."
            )
        lo, hi = lo_hi
        tol = 1e-3 * (hi - lo)
        if x.min() < lo - tol or x.max() > hi + tol:
            raise UserError(
                f"images span [{x.min():.4g}, {x.max():.4g}] but value_range={value_range}; pass "
                "the range they are in (e.g. (0, 255) for pixel values) or rescale them."
            )
        return jnp.asarray((x - lo) * (2.0 / (hi - lo)) - 1.0)

    @functools.cached_property
    def _encode(self):
        return jax.jit(
            lambda v, x: self.model.apply(v, x, method="encode")[1].indices,
            compiler_options=xla_options.compiler_options(),
        )

    @functools.cached_property
    def _decode(self):
        return jax.jit(
            lambda v, t: self.model.apply(v, t, method="decode_indices"),
            compiler_options=xla_options.compiler_options(),
        )

    def encode(
        self, images: np.ndarray, *, value_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        """uint8 [N,H,W,C] -> int32 token grids [N, *token_shape]; float images only with their
        `value_range` stated: (-1, 1), (0, 1) or (0, 255)."""
        return np.asarray(self._encode(self.variables, self.as_float(images, value_range)))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int32 token grids [N, *token_shape] -> uint8 images [N, H, W, C]."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 + len(self.token_shape) or tuple(tokens.shape[1:]) != self.token_shape:
            raise UserError(
                f"tokens have shape {tokens.shape} but this tokenizer decodes "
                f"[N, {', '.join(map(str, self.token_shape))}] grids."
            )
        size = self.codebook_size
        if tokens.size and (tokens.min() < 0 or tokens.max() >= size):
            raise UserError(
                f"token values must lie in [0, {size}); got [{tokens.min()}, {tokens.max()}]."
            )
        out = self._decode(self.variables, jnp.asarray(tokens, jnp.int32))
        return to_uint8(np.asarray(out))

    def reconstruct(
        self, images: np.ndarray, *, value_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        return self.decode(self.encode(images, value_range=value_range))


def load(
    workdir: str,
    step: int | None = None,
    *,
    use_ema: bool = True,
    sharding: jax.sharding.Sharding | None = None,
) -> Tokenizer:
    """Loads the tokenizer trained in `workdir` (its EMA parameters when present)."""
    config, comps, params, model_state, step = restore_params(
        workdir, step, use_ema=use_ema, sharding=sharding
    )
    return Tokenizer(config, comps.model, params, model_state, step)


def split_source(tok: Tokenizer, split: str, *, data_dir: str | None = None) -> tuple[Any, Any]:
    """(source, preprocess_fn) of a split of the tokenizer's dataset, as training reads it."""
    config = tok.config.copy_and_resolve_references()
    if data_dir is not None:
        config.input.data_dir = data_dir
    config.input.train_split = config.input.eval_split = split
    _, source = data.config_sources(config)
    return source, data.config_preprocess(config)


def iterate_split(
    tok: Tokenizer,
    split: str,
    *,
    batch_size: int = 256,
    num: int | None = None,
    data_dir: str | None = None,
):
    """Yields (uint8 images, float images, labels) batches of a split of the tokenizer's dataset."""
    source, preprocess_fn = split_source(tok, split, data_dir=data_dir)
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


# --- stage 2 ------------------------------------------------------------------------------------


def check_num(num: Any) -> None:
    """`num` images to make: an int >= 1 (0 or a negative number is refused, not rounded)."""
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 1:
        raise UserError(f"num={num!r}: the number of images must be an int >= 1 (e.g. num=64).")


def token_mask_from_pixels(pixel_mask: np.ndarray, factor: int) -> np.ndarray:
    """Tokens whose f x f receptive block touches a masked pixel: bool [N,H,W] -> [N,H/f,W/f]."""
    n, h, w = pixel_mask.shape
    return pixel_mask.reshape(n, h // factor, factor, w // factor, factor).any(axis=(2, 4))


def resolve_sampling(sampling: mlc.ConfigDict, overrides: dict[str, Any]) -> mlc.ConfigDict:
    """A copy of a prior's config.sampling with the overrides that are not None."""
    sc = sampling.copy_and_resolve_references()
    for k, v in overrides.items():
        if v is not None:
            sc[k] = v
    return sc


@dataclasses.dataclass
class Prior:
    """A trained prior and the tokenizer whose tokens it models: generation, inpainting and
    (image-conditional priors) upsampling / image-to-image."""

    config: mlc.ConfigDict
    comps: Any  # state.PriorComponents
    params: Any
    tokenizer: Tokenizer
    step: int
    condition_tokenizer: Tokenizer | None = None  # condition 'image': encodes the condition

    @property
    def num_classes(self) -> int:
        return self.comps.model.num_classes

    @property
    def condition(self) -> str:
        """none | class | image (see vq_jax.priors)."""
        return self.comps.condition

    def _labels(self, num: int, labels: np.ndarray | int | None) -> jax.Array | None:
        if self.num_classes and labels is None:
            labels = np.arange(num) % self.num_classes
        if labels is not None:  # the API's input: dtype and count; check_labels: the range
            given = np.asarray(labels)
            if given.dtype.kind not in "iu" or given.ndim > 1 or given.size not in (1, num):
                raise UserError(
                    f"labels={labels!r}: give one int class or {num} of them (an int array "
                    f"[{num}]) in [0, {self.num_classes}), or none to cycle through the classes."
                )
            labels = np.broadcast_to(given.astype(np.int32), (num,))
        return check_labels(labels, self.num_classes, num, null_ok=False)

    def sample_tokens(
        self,
        num: int,
        *,
        labels=None,
        seed: int = 0,
        known_tokens=None,
        known_mask=None,
        cond_tokens=None,
        **overrides,
    ) -> np.ndarray:
        """Token grids [num, *token_shape]; `known_*` (same shape) are kept fixed (inpainting);
        `cond_tokens` ([num, *cond_shape], image-conditional priors) are the condition
        tokenizer's. Grids with a depth axis are sampled as one sequence, raster order with depth
        fastest."""
        check_num(num)
        sc = resolve_sampling(self.config.sampling, overrides)
        validate.check_sampling(sc)
        key = jax.random.key(seed)
        lab = self._labels(num, labels)
        flat = lambda a: None if a is None else jnp.asarray(np.asarray(a).reshape(num, -1))
        if (cond_tokens is None) != (self.comps.cond_len == 0):
            raise UserError(
                "condition tokens are needed by (and only by) an image-conditional prior; this "
                f"one's condition is {self.condition!r} (use upsample() for image conditions)."
            )
        tokens = priors.get(self.comps.kind).sample(
            self.comps.model,
            self.params,
            key,
            num,
            labels=lab,
            cond=flat(cond_tokens),
            known_tokens=flat(known_tokens),
            known_mask=flat(known_mask),
            settings=sc,
        )
        return np.asarray(tokens).reshape(num, *self.comps.token_shape)

    def generate(self, num: int, *, labels=None, seed: int = 0, **overrides):
        """(uint8 images [num,H,W,C], tokens [num,h,w], labels [num] or None)."""
        tokens = self.sample_tokens(num, labels=labels, seed=seed, **overrides)
        lab = self._labels(num, labels)
        return self.tokenizer.decode(tokens), tokens, None if lab is None else np.asarray(lab)

    def inpaint(
        self, images: np.ndarray, pixel_mask: np.ndarray, *, labels=None, seed: int = 0, **overrides
    ):
        """Resamples the tokens under `pixel_mask` (bool [N,H,W], True = fill in).

        Returns (completed uint8 images, tokens, token_mask); tokens outside the mask are the
        image's own and never change.
        """
        images = np.asarray(images)
        h, w = self.tokenizer.image_shape[:2]
        pixel_mask = np.asarray(pixel_mask, bool)
        if pixel_mask.ndim == 2:
            pixel_mask = np.broadcast_to(pixel_mask, (len(images), *pixel_mask.shape))
        if pixel_mask.shape != (len(images), h, w):
            raise UserError(
                f"the inpainting mask has shape {pixel_mask.shape[1:]} but the images are {h}x{w}; "
                "give one mask pixel per image pixel (True = fill in)."
            )
        empty = [i for i in range(len(images)) if not pixel_mask[i].any()]
        if empty:
            raise UserError(
                f"the inpainting mask of image(s) {empty[:10]} selects no pixel, so nothing would "
                "be filled in; mark the region to fill with True (sample.py: --box=y0,x0,y1,x1 "
                "with y0 < y1 and x0 < x1)."
            )
        known = self.tokenizer.encode(images)
        token_mask = token_mask_from_pixels(pixel_mask, self.tokenizer.downsample_factor)
        if known.ndim > 3:  # a depth axis: every stage of a masked position is resampled
            token_mask = np.broadcast_to(token_mask[..., None], known.shape)
        tokens = self.sample_tokens(
            len(images),
            labels=labels,
            seed=seed,
            known_tokens=known,
            known_mask=~token_mask,
            **overrides,
        )
        return self.tokenizer.decode(tokens), tokens, token_mask

    def upsample(
        self,
        lr_images: np.ndarray,
        *,
        num_samples: int = 1,
        seed: int = 0,
        batch_size: int = 256,
        **overrides,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Samples full-resolution images given condition images (e.g. low-resolution ones).

        lr_images: uint8 [N, h, w, C] (or float in [-1, 1]) of the condition tokenizer's input
        shape. Several samples per input on request (super-resolution is one-to-many). Returns
        (uint8 images [N, num_samples, H, W, C], tokens [N, num_samples, h', w']). Batches of
        `batch_size` sequences; batch j is sampled with seed + j.
        """
        if self.condition != "image" or self.condition_tokenizer is None:
            raise UserError(
                f"this prior's condition is {self.condition!r}: upsampling needs a prior trained "
                "with config.prior.condition='image' and a condition tokenizer (e.g. "
                "configs/prior.py:fashion_mnist_sr); use generate / inpaint with this one."
            )
        if num_samples < 1 or batch_size < 1:
            raise UserError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1.")
        ctok = self.condition_tokenizer
        lr = np.asarray(lr_images)
        if lr.ndim == 3 and ctok.image_shape[2] == 1 and lr.shape[1:] == ctok.image_shape[:2]:
            lr = lr[..., None]
        if lr.ndim != 4 or tuple(lr.shape[1:]) != ctok.image_shape:
            h, w, c = ctok.image_shape
            raise UserError(
                f"low-resolution images have shape {lr.shape[1:]} but this prior's condition "
                f"tokenizer takes {h}x{w}x{c} images ({ctok.config.input.get('downsample', 1)}x "
                "area-downsampled, as vq_jax.data.area_downsample makes them); resize them first."
            )
        cond = np.repeat(ctok.encode(lr), num_samples, axis=0)
        total = len(cond)
        tokens = np.concatenate(
            [
                self.sample_tokens(
                    min(batch_size, total - i),
                    seed=seed + j,
                    cond_tokens=cond[i : i + batch_size],
                    **overrides,
                )
                for j, i in enumerate(range(0, total, batch_size))
            ]
        )
        images = np.concatenate(
            [self.tokenizer.decode(tokens[i : i + batch_size]) for i in range(0, total, batch_size)]
        )
        n = len(lr)
        return (
            images.reshape(n, num_samples, *images.shape[1:]),
            tokens.reshape(n, num_samples, *tokens.shape[1:]),
        )


def load_condition_tokenizer(
    config: mlc.ConfigDict, tok: Tokenizer, *, sharding: jax.sharding.Sharding | None = None
) -> Tokenizer | None:
    """The condition tokenizer of an image-conditional prior config (None for other conditions).

    Checked before any data is read: it is set and trained, it reads the same dataset as the
    tokenizer (example i of one is example i of the other), and it sees the same prepared image
    (resolution * input.downsample) at `config.condition_scale` times lower resolution when that
    is set. Each mistake is one UserError naming config.condition_tokenizer_workdir.
    """
    if priors.condition_of(config.prior) != "image":
        return None
    path = config.get("condition_tokenizer_workdir", "")
    field = f"config.condition_tokenizer_workdir={path!r}"
    if not path:
        raise UserError(
            "config.prior.condition='image' needs a condition tokenizer; set "
            "--config.condition_tokenizer_workdir=W (a trained vq-jax tokenizer of the condition "
            "images, e.g. trained with configs/vqvae.py:fashion_mnist_lr8)."
        )
    try:
        ctok = load(path, sharding=sharding)
    except MissingFileError as e:
        raise MissingFileError(f"{field}: {e}") from e
    except UserError as e:
        raise UserError(f"{field}: {e}") from e
    ci, ti = ctok.config.input, tok.config.input
    if (ci.dataset, ci.get("synthetic_size")) != (ti.dataset, ti.get("synthetic_size")):
        raise UserError(
            f"{field} was trained on {ci.dataset!r} but the tokenizer on {ti.dataset!r}; the "
            "condition must come from the same examples: train it on the tokenizer's dataset."
        )
    c_full = ci.resolution * ci.get("downsample", 1)
    t_full = ti.resolution * ti.get("downsample", 1)
    scale = config.get("condition_scale", 0)
    if c_full != t_full or (scale and ti.resolution != scale * ci.resolution):
        want = f"{ti.resolution // scale}x{ti.resolution // scale} " if scale else ""
        raise UserError(
            f"{field} takes {ci.resolution}x{ci.resolution} images prepared from "
            f"{c_full}x{c_full} ones, but this prior needs {want}condition images of the "
            f"tokenizer's {t_full}x{t_full} images ({scale or 'any'}x smaller; "
            f"config.condition_scale={scale}): train it with input.resolution="
            f"{ti.resolution // (scale or 1)} and input.downsample={scale or 1} "
            "(e.g. configs/vqvae.py:fashion_mnist_lr8)."
        )
    return ctok


def condition_grid(ctok: Tokenizer | None) -> tuple[tuple[int, int] | None, int]:
    """(token grid, codebook size) of a condition tokenizer, (None, 0) without one."""
    return (None, 0) if ctok is None else (ctok.token_shape, ctok.codebook_size)


def iterate_condition_pairs(
    prior: Prior, split: str, *, num: int | None = None, batch_size: int = 256, data_dir=None
):
    """Yields (uint8 condition images, uint8 full-resolution images, labels) batches of a split:
    the same examples through the condition tokenizer's and the tokenizer's preprocessing."""
    if prior.condition_tokenizer is None:
        raise UserError(
            f"this prior's condition is {prior.condition!r}; only image-conditional priors have "
            "condition images."
        )
    kw = dict(batch_size=batch_size, num=num, data_dir=data_dir)
    lows = iterate_split(prior.condition_tokenizer, split, **kw)
    highs = iterate_split(prior.tokenizer, split, **kw)
    for (lr, _, lab), (hr, _, _) in zip(lows, highs, strict=True):
        yield lr, hr, lab


def read_image(path: str, shape: tuple[int, int, int], what: str = "--image") -> np.ndarray:
    """uint8 [H, W, C] of an image file, converted to `shape`'s channels; a missing file or one
    of another size is a one-line UserError."""
    from PIL import Image

    if not os.path.isfile(path):
        raise MissingFileError(f"{what}={path}: no such file.")
    with Image.open(path) as im:
        a = np.asarray(im.convert("L" if shape[2] == 1 else "RGB"))
    a = a[..., None] if a.ndim == 2 else a
    if a.shape[:2] != tuple(shape[:2]):
        raise UserError(
            f"{what}={path} is {a.shape[0]}x{a.shape[1]} but {shape[0]}x{shape[1]} is needed; "
            "resize it first (for upsampling: area-downsample the full image)."
        )
    return a


def box_mask(num: int, h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """bool [num, h, w], True inside the pixel box (y0, x0, y1, x1): the part to fill in."""
    y0, x0, y1, x1 = box
    mask = np.zeros((num, h, w), bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


def load_prior(prior_workdir: str, step: int | None = None) -> Prior:
    """Loads a prior and the tokenizer named by its config (`tokenizer_workdir`), and for an
    image-conditional prior its condition tokenizer (`condition_tokenizer_workdir`)."""
    built = {}

    def make_init(config):
        if "prior" not in config:
            raise UserError(
                f"{prior_workdir} holds a tokenizer, not a prior; load it with vq_jax.load "
                f"(sample.py --workdir={prior_workdir}), or train a prior on it with "
                f"configs/prior.py --config.tokenizer_workdir={prior_workdir}."
            )
        tok = load(config.tokenizer_workdir)
        ctok = load_condition_tokenizer(config, tok)
        built["tok"], built["ctok"] = tok, ctok
        built["comps"] = comps = state_lib.build_prior(
            config, tok.token_shape, tok.codebook_size, *condition_grid(ctok)
        )
        return functools.partial(state_lib.init_prior_state, comps)

    config, state, step = restore_state(prior_workdir, make_init, step)
    return Prior(config, built["comps"], state["params"], built["tok"], step, built["ctok"])
