"""Quantizer throughput: tokens/s of the nearest-neighbour quantizer for codebook sizes
512...65536 and code dims 8...256, forward (tokenize) and forward + backward (train step share).

  JAX_PLATFORMS=cpu python -m benchmarks.quantizer
  python -m benchmarks.quantizer --tokens=65536 --sizes=1024,16384 --dims=32,256 --json=q.json
  python -m benchmarks.quantizer --sizes=65536 --dims=8,256 --search=exhaustive,blocked

``--search`` lists the nearest-code searches to time (VectorQuantizer's ``search`` field;
default ``auto``, blocked above quantizers.BLOCKED_SEARCH_ABOVE codes); several run in the same
process, interleaved per (K, D), so that a shared machine's load hits them alike.

Each row also gives the compiled program's scratch memory (XLA memory analysis) next to the
size an [N, K, D] difference tensor would take: the search is one [N, D] x [D, K] matmul, so the
scratch stays at the order of [N, K], never [N, K, D].
"""

import json
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from vq_jax.nets import quantizers

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call (e.g. 64 images of 8x8).")
_SIZES = flags.DEFINE_list("sizes", ["512", "4096", "16384", "65536"], "Codebook sizes K.")
_DIMS = flags.DEFINE_list("dims", ["8", "32", "64", "256"], "Code dimensions D.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median) after one warm-up call.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
_SEARCH = flags.DEFINE_list("search", ["auto"], "Searches: auto, blocked, exhaustive.")


def _median_time(fn, *args, repeats: int) -> float:
    return statistics.median(common.time_calls(fn, *args, repeats=repeats))


def bench_one(
    num_tokens: int, codebook_size: int, dim: int, repeats: int, search: str = "auto"
) -> dict:
    """Times quantize (indices only) and quantize + grad for one (K, D)."""
    vq = quantizers.VectorQuantizer(codebook_size=codebook_size, embed_dim=dim, search=search)
    key = jax.random.key(0)
    z = jax.random.normal(key, (num_tokens, dim), jnp.float32)
    params = vq.init(key, z)

    @jax.jit
    def tokenize(params, z):
        return vq.apply(params, z)[1].indices

    @jax.jit
    def train(params, z):
        def loss(params, z):
            z_q, res = vq.apply(params, z)
            return jnp.mean(jnp.square(z_q)) + res.loss

        return jax.grad(loss, argnums=(0, 1))(params, z)

    compiled = train.lower(params, z).compile()
    mem = compiled.memory_analysis()
    scratch = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    t_fwd = _median_time(tokenize, params, z, repeats=repeats)
    t_train = _median_time(compiled, params, z, repeats=repeats)
    return {
        "search": search,
        "codebook_size": codebook_size,
        "dim": dim,
        "tokens": num_tokens,
        "tokenize_tokens_per_s": round(num_tokens / t_fwd),
        "train_tokens_per_s": round(num_tokens / t_train),
        "search_gflop_s": round(2 * num_tokens * codebook_size * dim / t_fwd / 1e9, 1),
        "scratch_mib": round(scratch / 2**20, 1),
        "nkd_tensor_mib": round(num_tokens * codebook_size * dim * 4 / 2**20, 1),
    }


def main(argv):
    del argv
    rows = []
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"device: {device}, tokens/call {_TOKENS.value}")
    print(
        "search          K    D  tokenize tok/s  train tok/s  search GFLOP/s  scratch MiB"
        "  [N,K,D] MiB"
    )
    for k in map(int, _SIZES.value):
        for d in map(int, _DIMS.value):
            for search in _SEARCH.value:
                r = bench_one(_TOKENS.value, k, d, _REPEATS.value, search)
                rows.append(r)
                print(
                    f"{search:10s} {k:6d} {d:4d} {r['tokenize_tokens_per_s']:14,d} "
                    f"{r['train_tokens_per_s']:12,d} {r['search_gflop_s']:15.1f} "
                    f"{r['scratch_mib']:12.1f} {r['nkd_tensor_mib']:12.1f}",
                    flush=True,
                )
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
