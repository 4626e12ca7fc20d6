"""Use a trained tokenizer: reconstruct, encode a split to tokens, or decode tokens to images.

  python sample.py --workdir=W --mode=reconstruct --split=test --num=64 --out=recon.npz
  python sample.py --workdir=W --mode=encode --split=test --out=tokens.npz
  python sample.py --workdir=W --mode=decode --tokens=tokens.npz --out=decoded.npz

Each .npz gets a PNG grid next to it. EMA parameters are used when the run kept them.
"""

import os

import numpy as np
from absl import app, flags, logging

import vq_jax
from vq_jax import api, metrics

MODES = ("reconstruct", "encode", "decode")
_WORKDIR = flags.DEFINE_string("workdir", None, "Tokenizer workdir (with checkpoints/).")
_MODE = flags.DEFINE_enum("mode", "reconstruct", MODES, "What to do.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split for reconstruct / encode.")
_NUM = flags.DEFINE_integer(
    "num", None, "Number of images (default: 64 for reconstruct, all for encode)."
)
_OUT = flags.DEFINE_string("out", None, "Output .npz path.")
_TOKENS = flags.DEFINE_string("tokens", None, "Token .npz (key 'indices' or 'tokens') to decode.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.input.data_dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size for encoding / decoding.")
flags.mark_flags_as_required(["workdir", "out"])


def save(out: str, grid_images: np.ndarray, ncols: int, **arrays: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, **arrays)
    png = os.path.splitext(out)[0] + ".png"
    metrics.save_png(png, metrics.image_grid(grid_images, ncols=ncols))
    print(f"wrote {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())}) and {png}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; -v 0 brings it back
    tok = vq_jax.load(_WORKDIR.value, _STEP.value)
    mode = _MODE.value
    if mode == "decode":
        if not _TOKENS.value:
            raise app.UsageError("--mode=decode needs --tokens=FILE.npz")
        with np.load(_TOKENS.value) as f:
            key = "indices" if "indices" in f else "tokens"
            if key not in f:
                raise app.UsageError(f"{_TOKENS.value} has no 'indices' or 'tokens' array.")
            tokens = f[key]
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


if __name__ == "__main__":
    app.run(main)
