"""Super-resolution with image-conditional priors against bicubic upsampling and the ceiling.

On the first --num images of a split: the condition (low-resolution) images of the priors'
condition tokenizer, upsampled by
  bicubic            PIL bicubic (vq_jax.data.upsample_images) of the low-resolution image;
  each prior         its first sample (Prior.upsample), one per input;
  ceiling            the tokenizer's reconstruction of the true image (what a perfect prior
                     could at best produce, the tokenizer being the same);
measured against the true images: PSNR, SSIM, LPIPS (lower is better), FID (lower is better;
the N samples against the N true images). Writes OUT.json, OUT.md (the table) and OUT.png (the
grid: LR (nearest) | bicubic | samples of each prior | truth, one row per input).

  python -m benchmarks.upsample --prior_workdirs=/tmp/sr_gpt,/tmp/sr_maskgit \\
      --names=GPT,MaskGIT --split=test --num=10000 --out=docs/fashion_mnist_sr

--nofid / --nolpips skip those metrics (their weights: ~/.cache/vq_jax/*.npz by default).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vq_jax import api, cpu, data, metrics
from vq_jax import fid as fid_lib
from vq_jax.errors import UserError
from vq_jax.nets import lpips as lpips_lib


def _float(u8: np.ndarray) -> jax.Array:
    return jnp.asarray(u8, jnp.float32) / 127.5 - 1.0


class Scorer:
    """Per-method sums of PSNR / SSIM / LPIPS and Inception statistics against the truth."""

    def __init__(self, lpips_weights: str | None, inception_weights: str | None, batch: int):
        self.lpips_fn = None
        if lpips_weights:
            params = lpips_lib.load_lpips_params(lpips_weights)
            self.lpips_fn = jax.jit(lambda a, b: lpips_lib.LPIPS().apply({"params": params}, a, b))
        self.inception = inception_weights
        if inception_weights:
            fid_lib.feature_fn(inception_weights)  # fail early on bad weights
        self.batch = batch
        self.sums: dict[str, dict[str, float]] = {}
        self.stats: dict[str, fid_lib.StatsAccumulator] = {}
        self.count: dict[str, int] = {}

    def _features(self, u8: np.ndarray) -> np.ndarray:
        return fid_lib.inception_features(u8, weights=self.inception, batch_size=self.batch)

    def add(self, name: str, images: np.ndarray, truth: np.ndarray) -> None:
        x, y = _float(truth), _float(images)
        # SSIM is left out below its 11x11 window, never NaN
        ssim0 = {"ssim": 0.0} if metrics.ssim_defined(x.shape) else {}
        s = self.sums.setdefault(name, {"psnr": 0.0, "lpips": 0.0, **ssim0})
        s["psnr"] += float(np.sum(np.asarray(metrics.psnr(x, y)), dtype=np.float64))
        if "ssim" in s:
            s["ssim"] += float(np.sum(np.asarray(metrics.ssim(x, y)), dtype=np.float64))
        if self.lpips_fn is not None:
            s["lpips"] += float(np.sum(np.asarray(self.lpips_fn(x, y)), dtype=np.float64))
        if self.inception:
            self.stats.setdefault(name, fid_lib.StatsAccumulator()).add(self._features(images))
        self.count[name] = self.count.get(name, 0) + len(images)

    def add_truth(self, truth: np.ndarray) -> None:
        if self.inception:
            self.stats.setdefault("__truth__", fid_lib.StatsAccumulator()).add(
                self._features(truth)
            )

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for name, s in self.sums.items():
            n = self.count[name]
            row: dict[str, Any] = {"method": name, "num": n}
            row["psnr"] = s["psnr"] / n
            if "ssim" in s:
                row["ssim"] = s["ssim"] / n
            if self.lpips_fn is not None:
                row["lpips"] = s["lpips"] / n
            if self.inception:
                row["fid"] = self.stats["__truth__"].frechet_distance(self.stats[name])
            out.append(row)
        return out


def evaluate_upsampling(
    prior_workdirs: list[str],
    names: list[str],
    *,
    split: str = "test",
    num: int = 1000,
    batch_size: int = 250,
    grid_rows: int = 8,
    grid_samples: int = 3,
    seed: int = 0,
    lpips_weights: str | None = None,
    inception_weights: str | None = None,
    data_dir: str | None = None,
) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """(table rows, grid image, run info). Every prior must share the tokenizer and the
    condition tokenizer's input shape (the same low-resolution images go to all of them)."""
    t0 = time.time()
    priors = [api.load_prior(w) for w in prior_workdirs]
    first = priors[0]
    for p, w in zip(priors, prior_workdirs, strict=True):
        if p.condition != "image":
            raise UserError(f"{w} is not an image-conditional prior (condition {p.condition!r}).")
        if (p.tokenizer.image_shape, p.condition_tokenizer.image_shape) != (
            first.tokenizer.image_shape,
            first.condition_tokenizer.image_shape,
        ):
            raise UserError(f"{w} upsamples other shapes than {prior_workdirs[0]}.")
    shape = first.tokenizer.image_shape
    scorer = Scorer(lpips_weights, inception_weights, batch_size)
    grid_parts: list[np.ndarray] = []
    start = 0
    progress = metrics.ProgressLine(f"upsample {split}:", num, "images")
    for lows, truth, _ in api.iterate_condition_pairs(
        first, split, num=num, batch_size=batch_size, data_dir=data_dir
    ):
        progress.update(start)
        bicubic = data.upsample_images(lows, shape[:2], "bicubic")
        scorer.add_truth(truth)
        scorer.add("bicubic", bicubic, truth)
        k = grid_samples if start < grid_rows else 1
        columns = [data.upsample_images(lows, shape[:2], "nearest")[:, None], bicubic[:, None]]
        for name, p in zip(names, priors, strict=True):
            samples, _ = p.upsample(
                lows, num_samples=k, seed=seed + start, batch_size=batch_size * k
            )
            scorer.add(name, samples[:, 0], truth)
            columns.append(samples)
        scorer.add("ceiling (tokenizer reconstruction)", first.tokenizer.reconstruct(truth), truth)
        if start < grid_rows:
            columns.append(truth[:, None])
            grid_parts.append(np.concatenate(columns, axis=1)[: grid_rows - start])
        start += len(lows)
    rows = scorer.rows()
    grid_cells = np.concatenate(grid_parts)
    ncols = grid_cells.shape[1]
    grid = metrics.image_grid(grid_cells.reshape(-1, *shape), ncols=ncols)
    info = {
        "split": split,
        "num_images": start,
        "priors": dict(zip(names, prior_workdirs, strict=True)),
        "prior_steps": {n: p.step for n, p in zip(names, priors, strict=True)},
        "condition_tokenizer": first.config.condition_tokenizer_workdir,
        "tokenizer": first.config.tokenizer_workdir,
        "scale": shape[0] // first.condition_tokenizer.image_shape[0],
        "samples_scored_per_input": 1,
        "grid_columns": ["LR (nearest)", "bicubic"]
        + [f"{n} x{grid_samples}" for n in names]
        + ["truth"],
        "seconds": time.time() - t0,
    }
    return rows, grid, info


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in ("psnr", "ssim", "lpips", "fid") if k in rows[0]]
    heads = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "fid": "FID ↓"}
    lines = [
        "| method | " + " | ".join(heads[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


_WORKDIRS = flags.DEFINE_list("prior_workdirs", None, "Image-conditional prior workdirs.")
_NAMES = flags.DEFINE_list("names", None, "Display names, one per workdir.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_NUM = flags.DEFINE_integer("num", 1000, "Images scored (the split's first ones).")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per batch.")
_GRID = flags.DEFINE_integer("grid_rows", 8, "Inputs shown in the grid.")
_SAMPLES = flags.DEFINE_integer("grid_samples", 3, "Samples per input shown in the grid.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (batch j uses seed + its first index).")
_FID = flags.DEFINE_bool("fid", True, "Measure FID (needs --inception_weights).")
_LPIPS = flags.DEFINE_bool("lpips", True, "Measure LPIPS (needs --lpips_weights).")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "FID Inception .npz.")
_LPIPS_W = flags.DEFINE_string("lpips_weights", None, "LPIPS .npz.")
_OUT = flags.DEFINE_string("out", None, "Output prefix: OUT.json, OUT.md, OUT.png.")
flags.mark_flags_as_required(["prior_workdirs", "out"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    cpu.enable("auto")  # oneDNN convs on a CPU: Inception ~2x faster (no-op elsewhere)
    inception = os.path.expanduser(_INCEPTION.value or fid_lib.default_weights_path())
    lpips_w = os.path.expanduser(_LPIPS_W.value or lpips_lib.default_weights_path())
    rows, grid, info = evaluate_upsampling(
        _WORKDIRS.value,
        _NAMES.value or _WORKDIRS.value,
        split=_SPLIT.value,
        num=_NUM.value,
        batch_size=_BATCH.value,
        grid_rows=_GRID.value,
        grid_samples=_SAMPLES.value,
        seed=_SEED.value,
        lpips_weights=lpips_w if _LPIPS.value else None,
        inception_weights=inception if _FID.value else None,
    )
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value + ".json", "w") as f:
        json.dump({"rows": rows, **info}, f, indent=2)
    table = markdown_table(rows)
    with open(_OUT.value + ".md", "w") as f:
        f.write(table)
    metrics.save_png(_OUT.value + ".png", grid)
    print(table + f"grid: {_OUT.value}.png ({', '.join(info['grid_columns'])})")


if __name__ == "__main__":
    app.run(main)
