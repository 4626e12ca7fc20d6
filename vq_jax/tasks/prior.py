"""The prior task (stage 2): a prior over a frozen tokenizer's cached token grids, its train step
and its evaluation (loss, accuracy, sample grids).

`make_task(config, workdir, mesh)` loads the tokenizer(s), fills the token cache and returns the
`loop.Task` that `loop.run` trains.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from vq_jax import api, data, metrics
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib
from vq_jax.errors import UserError
from vq_jax.loop import DATA_AXIS, Task, jit_step, save_json, to_global
from vq_jax.state import State
from vq_jax.token_cache import TokenBatches, TokenSource, cached_tokens


def make_task(config: mlc.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Task:
    """The stage-2 task: a prior over the frozen tokenizer's token grids."""
    if not config.tokenizer_workdir:
        raise UserError(
            "config.tokenizer_workdir is empty; point it at a trained tokenizer: "
            "--config.tokenizer_workdir=W (a workdir written by train.py with a tokenizer config)."
        )
    state_lib.validate_batch_sizes(config)
    repl = jax.NamedSharding(mesh, jax.P())
    batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    tok = api.load(config.tokenizer_workdir, sharding=repl)
    ctok = api.load_condition_tokenizer(config, tok, sharding=repl)  # condition 'image' only
    comps = state_lib.build_prior(
        config, tok.token_shape, tok.codebook_size, *api.condition_grid(ctok)
    )
    ic, tc, pc = config.input, config.train, config.prior
    cache = os.path.join(workdir, "tokens")
    train_tokens, train_labels = cached_tokens(tok, config, ic.train_split, cache, batch_sharding)
    eval_tokens, eval_labels = cached_tokens(tok, config, ic.eval_split, cache, batch_sharding)
    train_cond = eval_cond = None
    if ctok is not None:  # the same examples through the condition tokenizer, cached once too
        ccache = os.path.join(cache, "condition")
        train_cond, _ = cached_tokens(ctok, config, ic.train_split, ccache, batch_sharding)
        eval_cond, _ = cached_tokens(ctok, config, ic.eval_split, ccache, batch_sharding)
    unlabeled = int(np.sum(train_labels < 0)) if comps.model.num_classes else 0
    if unlabeled:  # label -1: the dataset (or some of its images) has no class
        raise UserError(
            f"config.prior.num_classes={pc.num_classes} asks for a class-conditional prior, but "
            f"{unlabeled} of the {len(train_labels)} {ic.train_split!r} images of "
            f"{tok.config.input.dataset!r} have no label; set --config.prior.num_classes=0 for an "
            "unconditional prior (the token cache is kept), or give every image a class (folder "
            "datasets: one subfolder per class)."
        )
    if comps.model.num_classes and train_labels.max() >= pc.num_classes:
        raise UserError(
            f"the dataset has labels up to {train_labels.max()} but config.prior.num_classes="
            f"{pc.num_classes}; set it to {train_labels.max() + 1} (or 0 for unconditional)."
        )
    settings = steps_lib.PriorSettings(pc.class_dropout, pc.label_smoothing)
    pcount, pindex = jax.process_count(), jax.process_index()
    is_main = pindex == 0

    def make_train_iter():
        it = data.make_train_iter(
            TokenSource(train_tokens, train_labels, train_cond),
            batch_size=ic.batch_size // pcount,
            seed=config.seed,
            preprocess_fn=lambda t: t,
            random_flip=False,
            process_index=pindex,
            process_count=pcount,
            prefetch=ic.prefetch,
        )
        return TokenBatches(it, comps.token_shape, comps.cond_shape)

    def make_step(abstract):
        skip = tc.skip_nonfinite_steps
        return jit_step(
            steps_lib.make_prior_step(comps, settings, skip_nonfinite=skip), mesh, abstract
        )

    eval_step = jax.jit(
        steps_lib.make_prior_eval_step(comps, settings),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=repl,
    )
    eval_key = state_lib.rng_stream(jax.random.key(config.seed), "prior_eval")

    def evaluate(state: State, step: int, writer: metrics.MetricWriter) -> dict[str, float]:
        t0 = time.time()
        gb = ic.eval_batch_size
        n_batches = len(eval_tokens) // gb
        if tc.eval_batches:
            n_batches = min(n_batches, tc.eval_batches)
        lb = gb // pcount
        sums = None
        progress = metrics.ProgressLine(f"eval step {step}:", n_batches, "batches")
        for b in range(n_batches):  # full global batches only: every example weighs the same
            progress.update(b)
            sl = slice(b * gb + pindex * lb, b * gb + (pindex + 1) * lb)
            local = {"tokens": eval_tokens[sl], "label": eval_labels[sl]}
            if eval_cond is not None:
                local["cond"] = eval_cond[sl]
            batch = to_global(local, batch_sharding)
            out = eval_step(state["params"], batch, jax.random.fold_in(eval_key, b))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        result = {k: float(v) / max(n_batches, 1) for k, v in jax.device_get(sums or {}).items()}
        if "loss" in result:
            result["perplexity"] = float(np.exp(result["loss"]))
        result["eval_seconds"] = time.time() - t0
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        # Every process samples (the parameters span all of them); process 0 writes.
        prior = api.Prior(config, comps, state["params"], tok, step, ctok)
        per_class = config.sampling.samples_per_class
        num_classes = comps.model.num_classes
        if ctok is not None:  # condition (nearest-upsampled) | sample | truth's reconstruction
            n = min(per_class, len(eval_cond))
            tokens = prior.sample_tokens(n, seed=config.seed, cond_tokens=eval_cond[:n])
            lows = data.upsample_images(ctok.decode(eval_cond[:n]), tok.image_shape[:2], "nearest")
            images = np.concatenate([lows, tok.decode(tokens), tok.decode(eval_tokens[:n])])
            ncols = n
        else:
            num = per_class * max(num_classes, 1)
            labels = np.repeat(np.arange(num_classes), per_class) if num_classes else None
            images, _, _ = prior.generate(num, labels=labels, seed=config.seed)
            ncols = per_class if num_classes else 8
        if is_main:
            if ctok is None:  # one row per class, at most GRID_MAX_IMAGES in all
                rows = max(num_classes, 1)
                cols = max(1, min(per_class, metrics.GRID_MAX_IMAGES // rows))
                shown = images.reshape(rows, per_class, *images.shape[1:])[:, :cols]
                images = shown.reshape(-1, *images.shape[1:])[: metrics.GRID_MAX_IMAGES]
                ncols = cols if num_classes else min(cols, 8)
            grid = metrics.readable_grid(images, ncols=ncols)
            save_json(os.path.join(workdir, "eval", f"step_{step}.json"), {"step": step, **result})
            metrics.save_png(os.path.join(workdir, "eval", f"samples_step_{step}.png"), grid)
            writer.write_images(step, "eval/samples", grid[None])
            print(
                f"eval step {step}: loss {result.get('loss', float('nan')):.4f} | accuracy "
                f"{result.get('accuracy', float('nan')):.4f}",
                flush=True,
            )
        return result

    return Task(
        functools.partial(state_lib.init_prior_state, comps), make_step, make_train_iter, evaluate
    )
