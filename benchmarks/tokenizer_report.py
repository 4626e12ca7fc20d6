"""Compares trained tokenizers: a markdown table of their final test-set evaluation, a grid of
the same test images reconstructed by each, and their training curves.

  python -m benchmarks.tokenizer_report --workdirs=/tmp/fm_vqvae,/tmp/fm_vqgan \\
      --names=VQ-VAE,VQGAN --out=docs/fashion_mnist

Writes OUT_grid.png, OUT_curves.png and OUT.md (the table, also printed).
"""

import glob
import json
import os

import numpy as np
from absl import app, flags

import vq_jax
from vq_jax import api, metrics

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Tokenizer workdirs to compare.")
_NAMES = flags.DEFINE_list("names", None, "Display names, one per workdir.")
_OUT = flags.DEFINE_string("out", None, "Output path prefix.")
_NUM = flags.DEFINE_integer("num", 10, "Test images in the grid.")
_STEP = flags.DEFINE_integer("step", None, "Compare at this step (default: each run's last).")
flags.mark_flags_as_required(["workdirs", "out"])

CURVES = (
    "train/rec_loss",
    "train/quant_loss",
    "train/g_adv",
    "train/d_loss",
    "train/adaptive_weight",
    "train/usage",
)


def final_eval(workdir: str, step: int | None) -> dict:
    if step is not None:
        path = os.path.join(workdir, "eval", f"step_{step}.json")
    else:
        files = glob.glob(os.path.join(workdir, "eval", "step_*.json"))
        path = max(files, key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
    with open(path) as f:
        return json.load(f)


def wall_minutes(rows: list[dict], step: int) -> float:
    """Training time up to `step` implied by the logged rates (compile and eval excluded)."""
    train = [r for r in rows if "train/steps_per_sec" in r and r["step"] <= step]
    total, prev = 0.0, 0
    for r in train:
        total += (r["step"] - prev) / r["train/steps_per_sec"]
        prev = r["step"]
    return total / 60


def plot(rows_by_name: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(k in r for rows in rows_by_name.values() for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        for i, (name, rows) in enumerate(rows_by_name.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:  # one colour per run in every panel
                ax.plot(*zip(*pts, strict=True), label=name, color=f"C{i}")
        ax.set_title(key.split("/")[1], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    workdirs = _WORKDIRS.value
    names = _NAMES.value or [os.path.basename(w.rstrip("/")) for w in workdirs]
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    lines = [
        "| tokenizer | steps | train time (min) | test PSNR (dB) | test SSIM | codebook usage "
        "| codes used | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows_by_name, grid_rows = {}, []
    for name, workdir in zip(names, workdirs, strict=True):
        ev = final_eval(workdir, _STEP.value)
        rows = [r for r in metrics.read_metrics(workdir) if r["step"] <= ev["step"]]
        rows_by_name[name] = rows
        lines.append(
            f"| {name} | {ev['step']} | {wall_minutes(rows, ev['step']):.1f} | {ev['psnr']:.2f} | "
            f"{metrics.ssim_text(ev)} | {ev['codebook_usage']:.3f} | {ev['codes_used']} | "
            f"{ev['codebook_perplexity']:.1f} |"
        )
        tok = vq_jax.load(workdir, ev["step"])
        u8, _, _ = next(api.iterate_split(tok, tok.config.input.eval_split, num=_NUM.value))
        if not grid_rows:
            grid_rows.append(u8)
        grid_rows.append(tok.reconstruct(u8))
    table = "\n".join(lines)
    print(table)
    with open(_OUT.value + ".md", "w") as f:
        f.write(table + "\n")
    grid = metrics.image_grid(np.concatenate(grid_rows), ncols=_NUM.value)
    metrics.save_png(_OUT.value + "_grid.png", grid)
    plot(rows_by_name, _OUT.value + "_curves.png")
    print(
        f"wrote {_OUT.value}.md, {_OUT.value}_grid.png (rows: originals, {', '.join(names)}), "
        f"{_OUT.value}_curves.png"
    )


if __name__ == "__main__":
    app.run(main)
