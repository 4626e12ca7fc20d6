"""`python -m vq_jax.evaluate`: a tokenizer's rFID, LPIPS, PSNR, SSIM and codebook usage over a
whole split, and a prior's gFID; prints them and writes JSON.

  python -m vq_jax.evaluate --workdir=W [--split=test] [--num=N] [--out=W/eval/evaluate.json]
  python -m vq_jax.evaluate --prior_workdir=P [--num_samples=10000] [--num_reference=N]
      [--temperature=T] [--top_k=K] [--top_p=P] [--cfg_scale=S] [--maskgit_steps=S] [--seed=S]

Reconstruction metrics compare the tokenizer's input (the split preprocessed as training reads
it, e.g. Fashion-MNIST padded to 32x32) with its clipped reconstruction: PSNR / SSIM on floats in
[-1, 1] as the trainer's evaluation, LPIPS (VGG16, v0.1 heads) on the same floats, rFID (N = the
number of images, stated in the output) between the uint8 inputs and the uint8 reconstructions.
gFID compares N samples (class-balanced for a class-conditional prior: sample i has class
i mod num_classes) with the whole split; the split's Inception statistics are cached in
--stats_dir and reused (by rFID only when the SHA-256 of the images matches the one stored).
FID follows pytorch-fid's protocol (vq_jax/fid.py).

Weights: --inception_weights and --lpips_weights (defaults ~/.cache/vq_jax/*.npz; see
docs/lpips_weights.md for how to make them). --nofid / --nolpips skip those metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vq_jax import api, cpu, data, errors, metrics
from vq_jax import fid as fid_lib
from vq_jax.errors import UserError
from vq_jax.nets import lpips as lpips_lib


def default_stats_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "vq_jax", "fid_stats")


def stats_cache_path(stats_dir: str, config: Any, split: str, num: int) -> str:
    """fid_stats_<dataset>_<split>_<res>px_<channels>c_<num>.npz: what the statistics depend on
    (the preprocessing is the dataset's, at the tokenizer's resolution)."""
    ic = config.input
    name = re.sub(r"[^A-Za-z0-9]+", "-", str(ic.dataset)).strip("-")
    resize = re.sub(r"[^A-Za-z0-9]+", "-", str(ic.get("resize", "")))
    return os.path.join(
        stats_dir,
        f"fid_stats_{name}_{split}_{ic.resolution}px_{ic.channels}c_{resize}_{num}.npz",
    )


def _split_size(tok: api.Tokenizer, split: str, num: int | None) -> int:
    """How many images `num` (None: all) selects from the split."""
    source, _ = api.split_source(tok, split)
    return len(source) if num is None else min(num, len(source))


def _split_batches(tok: api.Tokenizer, split: str, batch_size: int, num: int | None):
    """(float images [B, H, W, C] of fixed shape, bool keep [B]) over the split (first `num`)."""
    source, preprocess_fn = api.split_source(tok, split)
    seen = 0
    for batch in data.make_eval_batches(source, batch_size=batch_size, preprocess_fn=preprocess_fn):
        keep = np.asarray(batch["mask"]) > 0
        if num is not None:
            keep &= np.cumsum(keep) + seen <= num
        if not keep.any():
            break
        seen += int(keep.sum())
        yield np.asarray(batch["image"]), keep
        if num is not None and seen >= num:
            break


def _make_reconstruct(tok: api.Tokenizer) -> Callable:
    model = tok.model

    def reconstruct(variables: Any, x: jax.Array) -> dict[str, jax.Array]:
        recon, qres = model.apply(variables, x, train=False)
        recon = jnp.clip(recon, -1.0, 1.0)
        out = {"recon": recon, "psnr": metrics.psnr(x, recon), "indices": qres.indices}
        if metrics.ssim_defined(x.shape):  # left out below 11x11 pixels, never NaN
            out["ssim"] = metrics.ssim(x, recon)
        return out

    return jax.jit(reconstruct)


def evaluate_tokenizer(
    workdir: str,
    *,
    split: str = "test",
    num: int | None = None,
    batch_size: int = 100,
    inception_weights: str | None = None,
    lpips_weights: str | None = None,
    stats_dir: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """rFID / LPIPS / PSNR / SSIM / codebook usage over `split` (its first `num` images).

    Pass ``inception_weights=None`` or ``lpips_weights=None`` to skip rFID or LPIPS.
    """
    t0 = time.time()
    tok = api.load(workdir, step)
    variables = {"params": tok.params, **tok.model_state}
    reconstruct = _make_reconstruct(tok)
    lpips_fn = None
    if lpips_weights is not None:
        lp = lpips_lib.load_lpips_params(lpips_weights)
        lpips_fn = jax.jit(lambda a, b: lpips_lib.LPIPS().apply({"params": lp}, a, b))
    features = None
    if inception_weights is not None:
        fid_lib.feature_fn(inception_weights)  # fail early on bad weights
        features = lambda u8: fid_lib.inception_features(
            u8, weights=inception_weights, batch_size=batch_size
        )
    real_acc, fake_acc = fid_lib.StatsAccumulator(), fid_lib.StatsAccumulator()
    # The inputs' Inception statistics depend only on the split: reuse the cached ones (written
    # by an earlier evaluation), which halves the Inception work of a repeat run. They are used
    # only if the SHA-256 of this run's input images matches the one stored with them (a folder
    # dataset's files may have changed); otherwise they are recomputed.
    real_cache = None
    if features is not None and stats_dir:
        real_cache = stats_cache_path(stats_dir, tok.config, split, _split_size(tok, split, num))
    cached_real = (
        fid_lib.load_statistics(real_cache) if real_cache and os.path.isfile(real_cache) else None
    )
    images_hash = hashlib.sha256()
    # Tokens with a depth axis (residual VQ): one histogram per stage (metrics.usage_summary).
    depth = int(np.prod(tok.token_shape[2:]))
    stage_counts = np.zeros((depth, tok.codebook_size), np.float64)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    progress = metrics.ProgressLine(f"evaluate {split}:", None, "images")
    for x, keep in _split_batches(tok, split, batch_size, num):
        progress.update(n)
        out = jax.device_get(reconstruct(variables, jnp.asarray(x)))
        sums["psnr"] += float(np.sum(out["psnr"][keep], dtype=np.float64))
        if "ssim" in out:
            sums["ssim"] += float(np.sum(out["ssim"][keep], dtype=np.float64))
        idx = out["indices"][keep].reshape(-1, depth)
        for stage in range(depth):
            stage_counts[stage] += np.bincount(idx[:, stage], minlength=tok.codebook_size)
        if lpips_fn is not None:
            d = np.asarray(lpips_fn(jnp.asarray(x), jnp.asarray(out["recon"])))
            sums["lpips"] += float(np.sum(d[keep], dtype=np.float64))
        if features is not None:
            real_u8 = metrics.to_uint8(x[keep])
            images_hash.update(real_u8.tobytes())
            if cached_real is None:
                real_acc.add(features(real_u8))
            fake_acc.add(features(metrics.to_uint8(out["recon"][keep])))
        n += int(keep.sum())
    if n == 0:
        raise UserError(f"split={split!r} of the tokenizer's dataset has no images")
    result: dict[str, Any] = {
        "workdir": workdir,
        "step": tok.step,
        "split": split,
        "num_images": n,
        "psnr": sums["psnr"] / n,
        **metrics.usage_summary(stage_counts),
    }
    if metrics.ssim_defined((1, *tok.image_shape)):
        result["ssim"] = sums["ssim"] / n
    if lpips_fn is not None:
        result["lpips"] = sums["lpips"] / n
        result["lpips_weights"] = lpips_weights
    if features is not None:
        if n < 2:
            raise UserError(f"rFID needs at least 2 images, got --num={n}")
        digest = images_hash.hexdigest()
        if cached_real is not None and (
            cached_real[2] != n or fid_lib.statistics_images_sha256(real_cache) != digest
        ):
            print(f"{real_cache} does not describe these {n} images; recomputing it", flush=True)
            cached_real = None
            for x, keep in _split_batches(tok, split, batch_size, num):
                real_acc.add(features(metrics.to_uint8(x[keep])))
        if cached_real is not None:
            mu, sigma, _ = cached_real
            result["rfid"] = fid_lib.frechet_distance(mu, sigma, *fake_acc.statistics())
            result["rfid_reference"] = real_cache
        else:
            if real_cache:  # the split's statistics, for gFID and later runs
                fid_lib.save_statistics(real_cache, *real_acc.statistics(), n, digest)
            result["rfid"] = real_acc.frechet_distance(fake_acc)
        result["rfid_num"] = n
        result["inception_weights"] = inception_weights
    result["seconds"] = time.time() - t0
    return result


def split_statistics(
    tok: api.Tokenizer,
    split: str,
    *,
    inception_weights: str,
    batch_size: int = 100,
    stats_dir: str | None = None,
    num: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Inception (mu, sigma, N) of the split (its first `num` images; default all) as the
    tokenizer sees it; cached in stats_dir."""
    n = _split_size(tok, split, num)
    path = stats_cache_path(stats_dir, tok.config, split, n) if stats_dir else None

    def compute():
        progress = metrics.ProgressLine(f"Inception statistics of {split}:", n, "images")

        def batches():
            done = 0
            for x, keep in _split_batches(tok, split, batch_size, n):
                progress.update(done)
                done += int(keep.sum())
                yield metrics.to_uint8(x[keep])

        return fid_lib.statistics_of(batches(), weights=inception_weights, batch_size=batch_size)

    return fid_lib.cached_statistics(path, compute)


def evaluate_prior(
    prior_workdir: str,
    *,
    split: str = "test",
    num_samples: int = 10_000,
    batch_size: int = 100,
    seed: int = 0,
    inception_weights: str,
    stats_dir: str | None = None,
    num_reference: int | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """gFID of `num_samples` samples (class-balanced when conditional: sample i has class
    i mod num_classes; batch j uses seed + j) against the split (its first `num_reference`
    images; default the whole split).

    ``sampling``: overrides of config.sampling (temperature, top_k, top_p, cfg_scale, ...).
    """
    t0 = time.time()
    prior = api.load_prior(prior_workdir)
    fid_lib.feature_fn(inception_weights)  # fail early on bad weights
    mu_r, sigma_r, n_ref = split_statistics(
        prior.tokenizer,
        split,
        inception_weights=inception_weights,
        batch_size=batch_size,
        stats_dir=stats_dir,
        num=num_reference,
    )
    acc, batch_seconds = sample_statistics(
        prior,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        inception_weights=inception_weights,
        **sampling,
    )
    return {
        "prior_workdir": prior_workdir,
        "step": prior.step,
        "kind": prior.comps.kind,
        "split": split,
        "gfid": fid_lib.frechet_distance(mu_r, sigma_r, *acc.statistics()),
        "gfid_num_samples": num_samples,
        "gfid_num_reference": n_ref,
        "class_balanced": bool(prior.num_classes),
        "sampling": sampling_settings(prior, sampling),
        "seed": seed,
        # sampling + decoding; the first batch includes compilation, so the per-image time is
        # over the later full batches when there are any
        "sample_seconds": sum(t for _, t in batch_seconds),
        "sample_seconds_per_image": per_image_seconds(batch_seconds, batch_size),
        "inception_weights": inception_weights,
        "seconds": time.time() - t0,
    }


def sample_statistics(
    prior: Any,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    inception_weights: str,
    **sampling: Any,
) -> tuple[fid_lib.StatsAccumulator, list[tuple[int, float]]]:
    """Inception statistics of `num_samples` samples of `prior` (class-balanced when
    conditional: sample i has class i mod num_classes; batch j uses seed + j), and the
    (images, seconds) of sampling + decoding each batch."""
    acc = fid_lib.StatsAccumulator()
    batch_seconds: list[tuple[int, float]] = []
    progress = metrics.ProgressLine("gFID samples:", num_samples, "images")
    for i, start in enumerate(range(0, num_samples, batch_size)):
        progress.update(start)
        b = min(batch_size, num_samples - start)
        labels = None
        if prior.num_classes:
            labels = (np.arange(start, start + b) % prior.num_classes).astype(np.int32)
        t = time.time()
        images, _, _ = prior.generate(b, labels=labels, seed=seed + i, **sampling)
        batch_seconds.append((b, time.time() - t))
        acc.add(
            fid_lib.inception_features(images, weights=inception_weights, batch_size=batch_size)
        )
    return acc, batch_seconds


def sampling_settings(prior: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The prior's config.sampling with the given (non-None) overrides: what was sampled with."""
    return api.resolve_sampling(prior.config.sampling, overrides).to_dict()


def per_image_seconds(batch_seconds: list[tuple[int, float]], batch_size: int) -> float:
    warm = [(b, t) for b, t in batch_seconds[1:] if b == batch_size] or batch_seconds
    return sum(t for _, t in warm) / max(sum(b for b, _ in warm), 1)


def _summary(r: dict[str, Any]) -> str:
    if "gfid" in r:
        return (
            f"gFID {r['gfid']:.3f} (N = {r['gfid_num_samples']} samples vs "
            f"{r['gfid_num_reference']} {r['split']} images) | sampling "
            f"{r['sample_seconds_per_image'] * 1e3:.1f} ms/image"
        )
    parts = [f"{r['split']} split, N = {r['num_images']}"]
    if "rfid" in r:
        parts.append(f"rFID {r['rfid']:.3f} (N = {r['rfid_num']})")
    if "lpips" in r:
        parts.append(f"LPIPS {r['lpips']:.4f}")
    parts += [
        f"PSNR {r['psnr']:.2f} dB",
        f"SSIM {metrics.ssim_text(r)}",
        f"codebook usage {r['codebook_usage']:.3f} ({r['codes_used']} codes)",
    ]
    if stages := metrics.stage_usage_text(r):
        parts.append("per stage " + stages)
    return " | ".join(parts)


def main(argv: list[str]) -> None:
    from absl import flags, logging

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; -v 0 brings it back
    try:
        cpu.enable("auto")  # the native CPU kernels where they help (builds once, one line)
        _main(argv)
    except errors.UserError as e:  # one line, exit 2
        errors.exit_with("evaluate", e)
    except (FileNotFoundError, ValueError) as e:  # missing weights, bad images: the same
        errors.exit_with("evaluate", UserError(errors.one_line(e)))


def _main(argv: list[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
    if bool(f.workdir) == bool(f.prior_workdir):
        raise UserError("give exactly one of --workdir=W (tokenizer) or --prior_workdir=P.")
    inception = os.path.expanduser(f.inception_weights or fid_lib.default_weights_path())
    lpips_w = os.path.expanduser(f.lpips_weights or lpips_lib.default_weights_path())
    if f.workdir:
        result = evaluate_tokenizer(
            f.workdir,
            split=f.split,
            num=f.num,
            batch_size=f.batch_size,
            inception_weights=inception if f.fid else None,
            lpips_weights=lpips_w if f.lpips else None,
            stats_dir=f.stats_dir,
            step=f.step,
        )
        out = f.out or os.path.join(f.workdir, "eval", f"evaluate_{f.split}.json")
    else:
        if not f.fid:
            raise UserError("--prior_workdir measures gFID; drop --nofid.")
        result = evaluate_prior(
            f.prior_workdir,
            split=f.split,
            num_samples=f.num_samples,
            batch_size=f.batch_size,
            seed=f.seed,
            inception_weights=inception,
            stats_dir=f.stats_dir,
            num_reference=f.num_reference,
            temperature=f.temperature,
            top_k=f.top_k,
            top_p=f.top_p,
            cfg_scale=f.cfg_scale,
            maskgit_steps=f.maskgit_steps,
        )
        out = f.out or os.path.join(f.prior_workdir, "eval", f"gfid_{f.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(_summary(result))
    print(f"wrote {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Tokenizer workdir: rFID, LPIPS, PSNR, SSIM, usage.")
    flags.DEFINE_string("prior_workdir", None, "Prior workdir: gFID of --num_samples samples.")
    flags.DEFINE_string("split", "test", "Dataset split (the tokenizer's dataset).")
    flags.DEFINE_integer("num", None, "Tokenizer: only the first NUM images (default: all).")
    flags.DEFINE_integer("num_samples", 10_000, "Prior: samples for gFID.")
    flags.DEFINE_integer("num_reference", None, "Prior: first N split images (default: all).")
    flags.DEFINE_integer("batch_size", 100, "Images per batch (reconstruction, Inception).")
    flags.DEFINE_integer("step", None, "Tokenizer checkpoint step (default: the newest).")
    flags.DEFINE_integer("seed", 0, "Prior sampling seed (batch i uses seed + i).")
    flags.DEFINE_float("temperature", None, "Override config.sampling.temperature.")
    flags.DEFINE_integer("top_k", None, "Override config.sampling.top_k.")
    flags.DEFINE_float("top_p", None, "Override config.sampling.top_p.")
    flags.DEFINE_float("cfg_scale", None, "Override config.sampling.cfg_scale.")
    flags.DEFINE_integer("maskgit_steps", None, "Override config.sampling.maskgit_steps.")
    flags.DEFINE_bool("fid", True, "Measure rFID / gFID (needs --inception_weights).")
    flags.DEFINE_bool("lpips", True, "Measure LPIPS (needs --lpips_weights).")
    flags.DEFINE_string("inception_weights", None, "FID Inception .npz (default: cache path).")
    flags.DEFINE_string("lpips_weights", None, "LPIPS .npz (default: cache path).")
    flags.DEFINE_string("stats_dir", default_stats_dir(), "Cache of split FID statistics.")
    flags.DEFINE_string("out", None, "JSON path (default: WORKDIR/eval/...).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
