"""The prior's token cache: a split tokenized once by a frozen tokenizer, saved as .npz, and the
source / batch adapters that feed those token grids through the input pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from vq_jax import api, data, distributed, metrics
from vq_jax.cpu import xla_options
from vq_jax.loop import to_global


class TokenSource:
    """Random access over cached token grids: {'image': int32 [h, w], 'label'} (the pipeline's
    keys; `TokenBatches` renames 'image' to 'tokens'). With condition grids `cond`, 'image' is
    the flattened [tokens; cond] (the pipeline carries only 'image' and 'label')."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, cond: np.ndarray | None = None):
        self._tokens, self._labels = tokens, labels.astype(np.int32)
        self._cond = cond

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image = self._tokens[i]
        if self._cond is not None:
            image = np.concatenate([image.reshape(-1), self._cond[i].reshape(-1)])
        return {"image": image, "label": self._labels[i]}


class TokenBatches:
    """The input pipeline's iterator with its batches' 'image' key renamed to 'tokens' (and split
    into 'tokens' [b, *token_shape] and 'cond' [b, *cond_shape] when both shapes are given)."""

    def __init__(
        self,
        it: Any,
        token_shape: tuple[int, ...] | None = None,
        cond_shape: tuple[int, ...] | None = None,
    ):
        self._it = it
        self._shapes = (token_shape, cond_shape)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        token_shape, cond_shape = self._shapes
        if cond_shape is None:
            return {"tokens": batch["image"], "label": batch["label"]}
        n, length = len(batch["image"]), math.prod(token_shape)
        return {
            "tokens": batch["image"][:, :length].reshape(n, *token_shape),
            "cond": batch["image"][:, length:].reshape(n, *cond_shape),
            "label": batch["label"],
        }

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


def tokenizer_fingerprint(tok: api.Tokenizer, data_dir: str | None = None) -> str:
    """A hash of what decides the cached tokens: the tokenizer's variables (names, dtypes,
    shapes, bytes), its token shape and the data it reads (its `config.input`, less batch sizes
    and flips, and `data_dir`). The step alone is not enough: every converted tokenizer is step 0.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tok.variables):
        # a replicated global array: this process's copy (every process hashes the same bytes)
        a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    inputs = {
        k: v
        for k, v in tok.config.input.to_dict().items()
        if "batch_size" not in k and k not in ("random_flip", "data_dir")
    }
    meta = {"token_shape": list(tok.token_shape), "input": inputs, "data_dir": data_dir}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cached_tokens(
    tok: api.Tokenizer,
    config: mlc.ConfigDict,
    split: str,
    cache_dir: str,
    sharding: jax.NamedSharding,
) -> tuple[np.ndarray, np.ndarray]:
    """The split's token grids and labels, tokenized once and cached as .npz.

    Every process reads and preprocesses its own share of the split (as in evaluation); the
    encoder runs on the global batch over all devices, and every process gets all the tokens;
    process 0 writes the cache.
    """
    path = os.path.join(cache_dir, f"{split}.npz")
    expected = tok.token_shape
    fingerprint = tokenizer_fingerprint(tok, config.input.data_dir)
    if os.path.exists(path):
        with np.load(path) as f:
            tokens, labels = f["tokens"], f["labels"]
            # caches written before the fingerprint (keyed by step only) are re-made once
            made_by = str(f["tokenizer_fingerprint"]) if "tokenizer_fingerprint" in f else ""
        if tokens.shape[1:] == expected and made_by == fingerprint:
            return tokens, labels
        print(
            f"token cache {path} was made by another tokenizer or data (or before caches were "
            "fingerprinted); re-tokenizing",
            flush=True,
        )
    pcount, pindex = jax.process_count(), jax.process_index()
    is_main = pindex == 0
    source, preprocess_fn = api.split_source(tok, split, data_dir=config.input.data_dir)
    ndev = jax.device_count()
    global_bs = -(-config.input.encode_batch_size // ndev) * ndev  # a multiple of the devices
    local_bs = global_bs // pcount
    batches = data.make_eval_batches(
        source,
        batch_size=local_bs,
        preprocess_fn=preprocess_fn,
        process_index=pindex,
        process_count=pcount,
    )
    repl = jax.NamedSharding(sharding.mesh, jax.P())

    def encode(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        indices = tok.model.apply(variables, batch["image"], method="encode")[1].indices
        return {"tokens": indices, "label": batch["label"], "mask": batch["mask"]}

    encode = jax.jit(
        encode,
        in_shardings=(repl, sharding),
        out_shardings=repl,
        compiler_options=xla_options.mesh_compiler_options(sharding.mesh),
    )
    tokens = np.zeros((len(source), *expected), np.int32)
    labels = np.zeros((len(source),), np.int32)
    rows = np.arange(global_bs)
    owner, row = np.divmod(rows, local_bs)  # row r of a global batch: process `owner`'s row
    if is_main:  # one line now, then a progress line every 10 s
        print(f"tokenizing {split}: {len(source)} images", flush=True)
    progress = metrics.ProgressLine(f"tokenizing {split}:", len(source), "images")
    for j, batch in enumerate(batches):
        progress.update(min(j * global_bs, len(source)))
        out = jax.device_get(encode(tok.variables, to_global(batch, sharding)))
        index = owner + (j * local_bs + row) * pcount  # make_eval_batches' example order
        keep = out["mask"] > 0
        tokens[index[keep]] = out["tokens"][keep]
        labels[index[keep]] = out["label"][keep]
    if is_main:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(
            tmp,
            tokens=tokens,
            labels=labels,
            tokenizer_step=tok.step,
            tokenizer_fingerprint=fingerprint,
        )
        os.replace(tmp, path)  # atomic: a crash never leaves a partial cache
        print(f"cached {len(tokens)} {split} token grids {tokens.shape[1:]} in {path}", flush=True)
    distributed.barrier(f"tokens_{split}")  # the others read the cache process 0 wrote
    return tokens, labels
