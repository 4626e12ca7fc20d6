"""gFID of class-conditional priors over a grid of sampling settings, with sampling times.

For every prior and every combination of --temperatures x --cfg_scales (x --maskgit_steps for
MaskGIT priors), N = --num_samples class-balanced samples against the split's Inception
statistics (cached, as `python -m vq_jax.evaluate --prior_workdir` does; the same seeds for
every setting). Writes OUT.json (one row per setting), OUT.md (the table) and OUT.png (left:
gFID against the CFG scale, one line per prior and temperature; right: gFID against the
sampling time per image, where the faster prior at equal gFID is the one further left).

  python -m benchmarks.prior_sweep --prior_workdirs=/tmp/prior_gpt,/tmp/prior_maskgit \\
      --names=GPT,MaskGIT --temperatures=0.8,1.0 --cfg_scales=0,1,3 --num_samples=1000 \\
      --out=docs/fashion_mnist_prior_sweep

--append adds settings to an existing OUT (a row with the same prior, settings and N is
replaced) and redraws it. Measure the best setting of each prior at N = 10000 with
`python -m vq_jax.evaluate`: FID depends on N, so compare the sweep's numbers only with each
other.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

from absl import app, flags, logging

from vq_jax import api, cpu, errors
from vq_jax import evaluate as evaluate_lib
from vq_jax import fid as fid_lib
from vq_jax.errors import UserError


def settings_grid(
    kind: str, temperatures: list[float], cfg_scales: list[float], maskgit_steps: list[int]
) -> list[dict[str, Any]]:
    """The sampling overrides swept for a prior of `kind` (maskgit_steps for MaskGIT only)."""
    steps: list[int | None] = list(maskgit_steps) if kind == "maskgit" and maskgit_steps else [None]
    return [
        {"temperature": t, "cfg_scale": c, **({"maskgit_steps": s} if s is not None else {})}
        for t, c, s in itertools.product(temperatures, cfg_scales, steps)
    ]


def sweep(
    prior_workdirs: list[str],
    names: list[str],
    *,
    temperatures: list[float],
    cfg_scales: list[float],
    maskgit_steps: list[int] = (),
    split: str = "test",
    num_samples: int = 1000,
    num_reference: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    inception_weights: str,
    stats_dir: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (prior, setting): gFID (N = num_samples vs the split) and sampling time."""
    if len(names) != len(prior_workdirs):
        raise UserError(f"--names has {len(names)} entries for {len(prior_workdirs)} workdirs.")
    fid_lib.feature_fn(inception_weights)  # fail early on bad weights
    rows = []
    for name, workdir in zip(names, prior_workdirs, strict=True):
        prior = api.load_prior(workdir)
        if not prior.num_classes and any(cfg_scales):
            raise UserError(f"{workdir} is unconditional: use --cfg_scales=0.")
        mu_r, sigma_r, n_ref = evaluate_lib.split_statistics(
            prior.tokenizer,
            split,
            inception_weights=inception_weights,
            batch_size=batch_size,
            stats_dir=stats_dir,
            num=num_reference,
        )
        for overrides in settings_grid(prior.comps.kind, temperatures, cfg_scales, maskgit_steps):
            t0 = time.time()
            acc, batch_seconds = evaluate_lib.sample_statistics(
                prior,
                num_samples=num_samples,
                batch_size=batch_size,
                seed=seed,
                inception_weights=inception_weights,
                **overrides,
            )
            row = {
                "name": name,
                "prior_workdir": workdir,
                "kind": prior.comps.kind,
                "step": prior.step,
                **overrides,
                "gfid": fid_lib.frechet_distance(mu_r, sigma_r, *acc.statistics()),
                "gfid_num_samples": num_samples,
                "gfid_num_reference": n_ref,
                "sample_seconds_per_image": evaluate_lib.per_image_seconds(
                    batch_seconds, batch_size
                ),
                "sampling": evaluate_lib.sampling_settings(prior, overrides),
                "seconds": time.time() - t0,
            }
            rows.append(row)
            print(_row_text(row), flush=True)
    return rows


def setting_key(r: dict[str, Any]) -> tuple:
    """What identifies a row: the prior, the sampled settings and N."""
    return (r["prior_workdir"], json.dumps(r["sampling"], sort_keys=True), r["gfid_num_samples"])


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` rows then `new` ones; a new row replaces an old one with the same setting_key."""
    keys = {setting_key(r) for r in new}
    return [r for r in old if setting_key(r) not in keys] + new


def _setting_text(r: dict[str, Any]) -> str:
    s = f"T={r['temperature']:g} cfg={r['cfg_scale']:g}"
    return s + (f" steps={r['maskgit_steps']}" if "maskgit_steps" in r else "")


def _row_text(r: dict[str, Any]) -> str:
    return (
        f"{r['name']} {_setting_text(r)}: gFID {r['gfid']:.2f} (N = {r['gfid_num_samples']}) | "
        f"{r['sample_seconds_per_image'] * 1e3:.2f} ms/image ({r['seconds']:.0f} s)"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per row, by prior (first seen first), temperature, CFG scale and steps."""
    lines = [
        "| prior | temperature | CFG scale | MaskGIT steps | gFID (N) | sampling ms / image |",
        "|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(dict.fromkeys(r["name"] for r in rows))}
    rows = sorted(
        rows,
        key=lambda r: (
            order[r["name"]],
            r["temperature"],
            r["cfg_scale"],
            r["sampling"].get("maskgit_steps", 0),
        ),
    )
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['temperature']:g} | {r['cfg_scale']:g} | "
            f"{r['sampling']['maskgit_steps'] if r['kind'] == 'maskgit' else '-'} | "
            f"{r['gfid']:.2f} ({r['gfid_num_samples']}) | "
            f"{r['sample_seconds_per_image'] * 1e3:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["name"], r["temperature"], r["sampling"].get("maskgit_steps"), r["kind"])
        lines.setdefault(key, []).append(r)
    for (name, t, steps, kind), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["cfg_scale"])
        label = f"{name}, T={t:g}" + (f", {steps} steps" if kind == "maskgit" else "")
        left.plot([r["cfg_scale"] for r in rs], [r["gfid"] for r in rs], "o-", label=label)
    left.set(xlabel="CFG scale", ylabel=f"gFID (N = {rows[0]['gfid_num_samples']})")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        right.scatter([r["sample_seconds_per_image"] * 1e3 for r in rs], [r["gfid"] for r in rs])
        right.scatter([], [], label=name, color=right.collections[-1].get_facecolor()[0])
        for r in rs:
            right.annotate(_setting_text(r), (r["sample_seconds_per_image"] * 1e3, r["gfid"]),
                           fontsize=6)  # fmt: skip
    right.set(xlabel="sampling + decoding, ms / image", ylabel="gFID")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _define_flags() -> None:
    """Defined when run as a script only, so tests can import this module beside others."""
    f = flags
    f.DEFINE_list("prior_workdirs", None, "Class-conditional prior workdirs.")
    f.DEFINE_list("names", None, "Display names, one per workdir.")
    f.DEFINE_list("temperatures", ["1.0"], "Sampling temperatures.")
    f.DEFINE_list("cfg_scales", ["0"], "Classifier-free guidance scales (0: off).")
    f.DEFINE_list("maskgit_steps", [], "MaskGIT decoding steps (default: the config's).")
    f.DEFINE_string("split", "test", "Reference split (the tokenizer's dataset).")
    f.DEFINE_integer("num_samples", 1000, "Samples per setting.")
    f.DEFINE_integer("num_reference", None, "First N split images (default: all).")
    f.DEFINE_integer("batch_size", 100, "Samples per batch.")
    f.DEFINE_integer("seed", 0, "Sampling seed (batch j uses seed + j).")
    f.DEFINE_string("inception_weights", None, "FID Inception .npz.")
    f.DEFINE_string("stats_dir", evaluate_lib.default_stats_dir(), "Split statistics cache.")
    f.DEFINE_string("out", None, "Output prefix: OUT.json, OUT.md, OUT.png.")
    f.DEFINE_bool("append", False, "Add the rows to OUT.json (same setting: replaced).")
    f.mark_flags_as_required(["prior_workdirs", "out"])


def _numbers(name: str, cast: type) -> list:
    values = flags.FLAGS[name].value
    try:
        return [cast(float(v)) for v in values]
    except ValueError as e:
        raise UserError(f"--{name}={','.join(values)}: give numbers, e.g. 0,1,3") from e


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    f = flags.FLAGS
    try:
        cpu.enable("auto")  # oneDNN convs on a CPU: Inception ~2x faster (no-op elsewhere)
        rows = sweep(
            f.prior_workdirs,
            f.names or f.prior_workdirs,
            temperatures=_numbers("temperatures", float),
            cfg_scales=_numbers("cfg_scales", float),
            maskgit_steps=_numbers("maskgit_steps", int),
            split=f.split,
            num_samples=f.num_samples,
            num_reference=f.num_reference,
            batch_size=f.batch_size,
            seed=f.seed,
            inception_weights=os.path.expanduser(
                f.inception_weights or fid_lib.default_weights_path()
            ),
            stats_dir=f.stats_dir,
        )
    except UserError as e:
        errors.exit_with("prior_sweep", e)
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    if f.append and os.path.isfile(f.out + ".json"):
        with open(f.out + ".json") as fh:
            rows = merge_rows(json.load(fh)["rows"], rows)
    with open(f.out + ".json", "w") as fh:
        json.dump({"rows": rows}, fh, indent=2)
    table = markdown_table(rows)
    with open(f.out + ".md", "w") as fh:
        fh.write(table)
    plot(rows, f.out + ".png")
    print(table + f"plot: {f.out}.png")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
