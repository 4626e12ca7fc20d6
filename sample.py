"""Use a trained tokenizer or prior.

  python sample.py --workdir=W --mode=reconstruct --split=test --num=64 --out=recon.npz
  python sample.py --workdir=W --mode=encode --split=test --out=tokens.npz
  python sample.py --workdir=W --mode=decode --tokens=tokens.npz --out=decoded.npz
  python sample.py --prior_workdir=P --mode=generate [--class=K] --num=N --seed=S --out=gen.npz
  python sample.py --prior_workdir=P --mode=inpaint --split=test --num=8 --box=8,8,24,24 \
      --out=inpaint.npz          # or --image=IMG.png --mask=MASK.png (white = fill in)
  python sample.py --prior_workdir=P --mode=upsample --split=test --num=8 --samples=4 \
      --out=sr.npz               # or --image=LR.png (an image-conditional prior's input size)

Each .npz gets a PNG grid next to it. Tokenizer EMA parameters are used when the run kept them.
"""

import os

import numpy as np
from absl import app, flags, logging

import vq_jax
from vq_jax import api, cpu, data, errors, metrics

MODES = ("reconstruct", "encode", "decode", "generate", "inpaint", "upsample")
PRIOR_MODES = ("generate", "inpaint", "upsample")
_WORKDIR = flags.DEFINE_string("workdir", None, "Tokenizer workdir (with checkpoints/).")
_PRIOR = flags.DEFINE_string(
    "prior_workdir", None, "Prior workdir (generate / inpaint / upsample)."
)
_SAMPLES = flags.DEFINE_integer(
    "samples", 1, "Upsampling: samples per input (super-resolution is one-to-many).", lower_bound=1
)
_CLASS = flags.DEFINE_integer(
    "class", None, "Class to generate (class-conditional priors).", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BOX = flags.DEFINE_list("box", None, "Inpainting box y0,x0,y1,x1 in pixels (split images).")
_IMAGE = flags.DEFINE_string(
    "image", None, "Inpainting: one image file; upsampling: one low-resolution image file."
)
_MASK = flags.DEFINE_string("mask", None, "Inpainting: mask image (white = fill in).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Override config.sampling.temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Override config.sampling.top_k.")
_TOP_P = flags.DEFINE_float("top_p", None, "Override config.sampling.top_p.")
_CFG = flags.DEFINE_float("cfg_scale", None, "Override config.sampling.cfg_scale.")
_MG_STEPS = flags.DEFINE_integer(
    "maskgit_steps", None, "Override config.sampling.maskgit_steps.", lower_bound=1
)
_MODE = flags.DEFINE_enum("mode", "reconstruct", MODES, "What to do.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split for reconstruct / encode.")
_NUM = flags.DEFINE_integer(
    "num", None, "Number of images (default: 64 for reconstruct, all for encode).", lower_bound=1
)
_OUT = flags.DEFINE_string("out", None, "Output .npz path.")
_TOKENS = flags.DEFINE_string("tokens", None, "Token .npz (key 'indices' or 'tokens') to decode.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.input.data_dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
_BATCH = flags.DEFINE_integer(
    "batch_size", 256, "Batch size for encoding / decoding.", lower_bound=1
)
flags.mark_flags_as_required(["out"])


def save(out: str, grid_images: np.ndarray, ncols: int, **arrays: np.ndarray) -> None:
    """Writes the arrays to `out` and a readable PNG grid of (at most GRID_MAX_IMAGES, whole
    rows) `grid_images`, each upscaled to >= GRID_MIN_TILE pixels, next to it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, **arrays)
    png = os.path.splitext(out)[0] + ".png"
    shown = max(ncols, metrics.GRID_MAX_IMAGES // ncols * ncols)
    metrics.save_png(png, metrics.readable_grid(grid_images[:shown], ncols=ncols))
    part = f" (the first {shown} of {len(grid_images)})" if len(grid_images) > shown else ""
    print(f"wrote {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())}) and {png}{part}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; -v 0 brings it back
    cpu.enable("auto")  # the native CPU kernels where they help (builds once, one line)
    mode = _MODE.value
    if mode in PRIOR_MODES:
        if not _PRIOR.value:
            raise app.UsageError(f"--mode={mode} needs --prior_workdir=P (a trained prior).")
        return run_prior(mode, api.load_prior(_PRIOR.value, _STEP.value))
    if not _WORKDIR.value:
        raise app.UsageError(f"--mode={mode} needs --workdir=W (a trained tokenizer).")
    tok = vq_jax.load(_WORKDIR.value, _STEP.value)
    if mode == "decode":
        if not _TOKENS.value:
            raise app.UsageError("--mode=decode needs --tokens=FILE.npz")
        if not os.path.isfile(_TOKENS.value):
            raise errors.MissingFileError(
                f"--tokens={_TOKENS.value}: no such file; write one with --mode=encode "
                "(an .npz with an 'indices' or 'tokens' array)."
            )
        tokens = read_tokens(_TOKENS.value)
        images = np.concatenate(
            [tok.decode(tokens[i : i + _BATCH.value]) for i in range(0, len(tokens), _BATCH.value)]
        )
        save(_OUT.value, images[:64], 8, images=images, indices=tokens.astype(np.int32))
        return
    num = _NUM.value if _NUM.value is not None else (64 if mode == "reconstruct" else None)
    originals, recons, indices, labels = [], [], [], []
    for u8, _, lab in api.iterate_split(
        tok, _SPLIT.value, batch_size=_BATCH.value, num=num, data_dir=_DATA_DIR.value
    ):
        idx = tok.encode(u8)
        indices.append(idx)
        labels.append(lab)
        if mode == "reconstruct":
            originals.append(u8)
            recons.append(tok.decode(idx))
    indices_np = np.concatenate(indices).astype(np.int32)
    labels_np = np.concatenate(labels).astype(np.int32)
    if mode == "encode":
        grid = tok.decode(indices_np[:64])
        save(_OUT.value, grid, 8, indices=indices_np, labels=labels_np)
        return
    orig, rec = np.concatenate(originals), np.concatenate(recons)
    n = min(len(orig), 8)
    rows = [
        np.concatenate([orig[i : i + n], rec[i : i + n]]) for i in range(0, min(len(orig), 32), n)
    ]
    save(
        _OUT.value,
        np.concatenate(rows),
        n,
        originals=orig,
        reconstructions=rec,
        indices=indices_np,
        labels=labels_np,
    )


def read_tokens(path: str) -> np.ndarray:
    """The 'indices' (or 'tokens') array of an .npz written by --mode=encode / generate."""
    fix = "pass an .npz written by sample.py --mode=encode (or generate / inpaint)"
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # text, pickle, truncated: numpy's words mislead
        raise errors.UserError(f"--tokens={path} is not an .npz file; {fix}.") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise errors.UserError(f"--tokens={path} holds a bare array, not an .npz; {fix}.")
    with f:
        key = "indices" if "indices" in f else "tokens"
        if key not in f:
            raise errors.UserError(
                f"--tokens={path} has no 'indices' or 'tokens' array (it has {list(f.keys())}); "
                f"{fix}."
            )
        return f[key]


def parse_box(box: list[str], h: int, w: int) -> tuple[int, int, int, int]:
    """--box=y0,x0,y1,x1 as ints inside an h x w image (a box outside it would mask nothing)."""
    try:
        y0, x0, y1, x1 = (int(v) for v in box)
    except ValueError:
        raise errors.UserError(f"--box={','.join(box)}: give four integers y0,x0,y1,x1.") from None
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise errors.UserError(
            f"--box={y0},{x0},{y1},{x1} is not a box inside the {h}x{w} images; valid: "
            f"0 <= y0 < y1 <= {h} and 0 <= x0 < x1 <= {w} (pixels), e.g. --box=8,8,24,24."
        )
    return y0, x0, y1, x1


def run_prior(mode: str, prior: api.Prior) -> None:
    overrides = dict(
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        cfg_scale=_CFG.value,
        maskgit_steps=_MG_STEPS.value,
    )
    tok = prior.tokenizer
    if mode == "upsample":
        return run_upsample(prior, overrides)
    if mode == "generate":
        num = _NUM.value or 64
        labels = _CLASS.value
        images, tokens, labels = prior.generate(num, labels=labels, seed=_SEED.value, **overrides)
        arrays = dict(images=images, tokens=tokens.astype(np.int32))
        if labels is not None:
            arrays["labels"] = labels.astype(np.int32)
        ncols = 8 if labels is None or _CLASS.value is not None else prior.num_classes
        save(_OUT.value, images, min(ncols, num), **arrays)
        return
    h, w = tok.image_shape[:2]
    if _IMAGE.value:
        if not _MASK.value:
            raise app.UsageError("--image needs --mask=MASK.png (white = fill in)")
        originals = api.read_image(_IMAGE.value, tok.image_shape)[None]
        mask = api.read_image(_MASK.value, (h, w, 1), "--mask")[None, ..., 0] > 127
        labels = None if _CLASS.value is None else np.array([_CLASS.value])
    else:
        if not _BOX.value or len(_BOX.value) != 4:
            raise app.UsageError("--mode=inpaint needs --box=y0,x0,y1,x1 or --image/--mask")
        y0, x0, y1, x1 = parse_box(_BOX.value, h, w)
        originals, labels = [], []
        for u8, _, lab in api.iterate_split(
            tok, _SPLIT.value, num=_NUM.value or 8, data_dir=_DATA_DIR.value
        ):
            originals.append(u8)
            labels.append(lab)
        originals, labels = np.concatenate(originals), np.concatenate(labels)
        mask = api.box_mask(len(originals), h, w, (y0, x0, y1, x1))
    if not prior.num_classes:
        labels = None
    completed, tokens, token_mask = prior.inpaint(
        originals, mask, labels=labels, seed=_SEED.value, **overrides
    )
    masked = np.where(mask[..., None], np.uint8(128), originals)
    n = len(originals)
    save(
        _OUT.value,
        np.concatenate([originals, masked, completed]),
        n,
        originals=originals,
        masked=masked,
        completed=completed,
        tokens=tokens.astype(np.int32),
        token_mask=token_mask,
    )


def run_upsample(prior: api.Prior, overrides: dict) -> None:
    """LR | bicubic | samples | truth (split images) for an image-conditional prior."""
    if prior.condition != "image":
        raise errors.UserError(
            f"--mode=upsample needs an image-conditional prior; {_PRIOR.value} has condition "
            f"{prior.condition!r} (train one with configs/prior.py:fashion_mnist_sr), or use "
            "--mode=generate / inpaint."
        )
    shape = prior.tokenizer.image_shape
    if _IMAGE.value:
        lows = api.read_image(_IMAGE.value, prior.condition_tokenizer.image_shape)[None]
        truth = None
    else:
        pairs = list(
            api.iterate_condition_pairs(
                prior, _SPLIT.value, num=_NUM.value or 8, data_dir=_DATA_DIR.value
            )
        )
        lows, truth = (np.concatenate([p[i] for p in pairs]) for i in (0, 1))
    samples, tokens = prior.upsample(
        lows, num_samples=_SAMPLES.value, seed=_SEED.value, batch_size=_BATCH.value, **overrides
    )
    bicubic = data.upsample_images(lows, shape[:2], "bicubic")
    nearest = data.upsample_images(lows, shape[:2], "nearest")
    columns = [nearest[:, None], bicubic[:, None], samples]
    arrays = dict(low_res=lows, bicubic=bicubic, samples=samples, tokens=tokens)
    if truth is not None:
        columns.append(truth[:, None])
        arrays["originals"] = truth
    rows = np.concatenate(columns, axis=1)  # [N, 2 + samples (+ 1), H, W, C]
    save(_OUT.value, rows.reshape(-1, *shape), rows.shape[1], **arrays)


def main_reporting_errors(argv: list[str]) -> None:
    """`main`, with user errors (bad workdir, tokens, labels, files) printed as one line."""
    try:
        main(argv)
    except errors.UserError as e:
        errors.exit_with("sample.py", e)


if __name__ == "__main__":
    app.run(main_reporting_errors)
