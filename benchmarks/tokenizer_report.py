"""Compares trained tokenizers: a markdown table of their final test-set evaluation, a grid of
the same test images reconstructed by each, their training curves, and bars of codebook usage
(and rFID / LPIPS where `vq_jax.evaluate` JSONs are given). A residual-VQ tokenizer's usage is
the mean of its stages' usages (each stage's codebook counted on its own), the stages listed.

  python -m benchmarks.tokenizer_report --workdirs=/tmp/fm_vqvae,/tmp/fm_vqgan \\
      --names=VQ-VAE,VQGAN --out=docs/fashion_mnist [--evals=E1.json,E2.json]

Writes OUT_grid.png, OUT_curves.png, OUT_bars.png and OUT.md (the table, also printed).
"""

import glob
import json
import os

import numpy as np
from absl import app, flags

import vq_jax
from vq_jax import api, errors, metrics
from vq_jax.errors import UserError


def _define_flags() -> None:
    f = flags
    f.DEFINE_list("workdirs", None, "Tokenizer workdirs to compare.")
    f.DEFINE_list("names", None, "Display names, one per workdir.")
    f.DEFINE_string("out", None, "Output path prefix.")
    f.DEFINE_integer("num", 10, "Test images in the grid.")
    f.DEFINE_integer("step", None, "Compare at this step (default: each run's last).")
    f.DEFINE_list(
        "evals", None, "vq_jax.evaluate JSONs, one per workdir ('' for none): rFID, LPIPS."
    )
    f.mark_flags_as_required(["workdirs", "out"])


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
                color = f"C{i}" if len(rows_by_name) <= 10 else plt.cm.tab20(i % 20)
                ax.plot(*zip(*pts, strict=True), label=name, color=color)
        ax.set_title(key.split("/")[1], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def train_tokens_per_sec(rows: list[dict], config, token_shape: tuple[int, ...]) -> float:
    """Median logged training rate in tokens/s: steps/s x global batch x tokens per image."""
    rates = [r["train/steps_per_sec"] for r in rows if "train/steps_per_sec" in r]
    if not rates:
        return float("nan")
    return float(np.median(rates)) * config.input.batch_size * int(np.prod(token_shape))


def _read_eval(path: str) -> dict:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise UserError(f"--evals: no file {path}; run python -m vq_jax.evaluate --out={path}")
    with open(path) as f:
        return json.load(f)


def plot_bars(names: list[str], table_rows: list[dict], path: str) -> None:
    """Codebook usage (and rFID / LPIPS where measured) per tokenizer, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("usage", "codebook usage (test; residual VQ: mean of the stages)")]
    keys += [
        (k, t) for k, t in (("rfid", "rFID"), ("lpips", "LPIPS")) if any(k in r for r in table_rows)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.0, 0.35 * len(names)) * len(keys), 3.2))
    for ax, (key, title) in zip(np.atleast_1d(axes), keys, strict=True):
        ax.bar(range(len(names)), [r.get(key, np.nan) for r in table_rows], color="C0")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        if key == "usage":
            ax.axhline(0.95, color="C3", lw=0.8, ls="--")
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(
    workdirs: list[str],
    names: list[str],
    out: str,
    *,
    num: int = 10,
    step: int | None = None,
    evals: list[str] | None = None,
) -> list[dict]:
    """Writes OUT.md, OUT_grid.png, OUT_curves.png and OUT_bars.png; returns the table rows."""
    evals = evals or [""] * len(workdirs)
    if not len(names) == len(evals) == len(workdirs):
        raise UserError(
            f"--names ({len(names)}) and --evals ({len(evals)}) need one entry per workdir "
            f"({len(workdirs)}); use '' for a workdir without an evaluation"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lines = [
        "| tokenizer | steps | train time (min) | train tokens/s | test PSNR (dB) | test SSIM "
        "| codebook usage | codes used | perplexity | rFID (N) | LPIPS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows_by_name, grid_rows, table_rows = {}, [], []
    for name, workdir, eval_path in zip(names, workdirs, evals, strict=True):
        ev = final_eval(workdir, step)
        extra = _read_eval(eval_path)
        rows = [r for r in metrics.read_metrics(workdir) if r["step"] <= ev["step"]]
        rows_by_name[name] = rows
        tok = vq_jax.load(workdir, ev["step"])
        tps = train_tokens_per_sec(rows, tok.config, tok.token_shape)
        stages = metrics.stage_usages(ev)  # residual VQ: each stage's own codebook
        usage = float(np.mean(stages)) if stages else ev["codebook_usage"]
        row = {"name": name, "usage": usage, "tokens_per_sec": tps}
        usage_cell = f"{ev['codebook_usage']:.3f}"
        if stages:
            usage_cell = f"{usage:.3f} (stages {metrics.stage_usage_text(ev)})"
        rfid = lpips = "-"
        if "rfid" in extra:
            row["rfid"] = extra["rfid"]
            rfid = f"{extra['rfid']:.2f} ({extra['rfid_num']})"
        if "lpips" in extra:
            row["lpips"] = extra["lpips"]
            lpips = f"{extra['lpips']:.4f}"
        table_rows.append(row)
        lines.append(
            f"| {name} | {ev['step']} | {wall_minutes(rows, ev['step']):.1f} | {tps:,.0f} | "
            f"{ev['psnr']:.2f} | {metrics.ssim_text(ev)} | {usage_cell} | "
            f"{ev['codes_used']} | {ev['codebook_perplexity']:.1f} | {rfid} | {lpips} |"
        )
        u8, _, _ = next(api.iterate_split(tok, tok.config.input.eval_split, num=num))
        if not grid_rows:
            grid_rows.append(u8)
        grid_rows.append(tok.reconstruct(u8))
    table = "\n".join(lines)
    print(table)
    with open(out + ".md", "w") as f:
        f.write(table + "\n")
    grid = metrics.image_grid(np.concatenate(grid_rows), ncols=num)
    metrics.save_png(out + "_grid.png", grid)
    plot(rows_by_name, out + "_curves.png")
    plot_bars(names, table_rows, out + "_bars.png")
    print(
        f"wrote {out}.md, {out}_grid.png (rows: originals, {', '.join(names)}), "
        f"{out}_curves.png, {out}_bars.png"
    )
    return table_rows


def main(argv):
    del argv
    f = flags.FLAGS
    workdirs = f.workdirs
    names = f.names or [os.path.basename(w.rstrip("/")) for w in workdirs]
    try:
        report(workdirs, names, f.out, num=f.num, step=f.step, evals=f.evals)
    except UserError as e:
        errors.exit_with("tokenizer_report", e)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
