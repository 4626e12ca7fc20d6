"""Quantizer throughput: tokens/s of the nearest-neighbour quantizer for codebook sizes
512...65536 and code dims 8...256, forward (tokenize) and forward + backward (train step share).
``--kinds`` times other registered kinds at the same sizes, each with its module defaults:
``fsq`` (levels for K from FSQ_LEVELS) and ``lfq`` (log2 K bits) set their own D, and ``rvqN``
is residual VQ of depth N (N stages per token).

  JAX_PLATFORMS=cpu python -m benchmarks.quantizer
  python -m benchmarks.quantizer --tokens=65536 --sizes=1024,16384 --dims=32,256 --json=q.json
  python -m benchmarks.quantizer --sizes=65536 --dims=8,256 --search=exhaustive,blocked,native
  python -m benchmarks.quantizer --kinds=vq,ema,fsq,lfq,simvq,ibq,rvq2 --sizes=512,16384 --dims=32

``--search`` lists the nearest-code searches to time (VectorQuantizer's ``search`` field;
default ``auto``: quantizers.nearest_code's choice, on CPU blocked above
quantizers.CPU_SEARCH_ABOVE codes; ``native``: ``auto`` with the native CPU kernels installed,
i.e. vq_jax.cpu.search's screened search above that size, its
screen in the row's ``screen_bits``); several run in the same process, interleaved per (K, D),
so that a shared machine's load hits them alike.

Each row also gives the compiled program's scratch memory (XLA memory analysis) next to the
size an [N, K, D] difference tensor would take: the search is one [N, D] x [D, K] matmul, so the
scratch stays at the order of [N, K], never [N, K, D].
"""

import json
import re
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from vq_jax import cpu, errors, state
from vq_jax.cpu import search as native_search
from vq_jax.errors import UserError
from vq_jax.nets import kernels, quantizer_registry, quantizers
from vq_jax.nets.lfq import LFQ, lfq_bits
from vq_jax.nets.quantizers import FSQ

FSQ_LEVELS = {512: (8, 8, 8), 4096: (8, 8, 8, 8), 16384: (8, 8, 8, 8, 4), 65536: (8, 8, 8, 8, 4, 4)}
"""FSQ levels for each codebook size (the README's comparison of the kinds uses the same)."""

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call (e.g. 64 images of 8x8).")
_SIZES = flags.DEFINE_list("sizes", ["512", "4096", "16384", "65536"], "Codebook sizes K.")
_DIMS = flags.DEFINE_list("dims", ["8", "32", "64", "256"], "Code dimensions D.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median) after one warm-up call.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
_SEARCH = flags.DEFINE_list("search", ["auto"], "Searches: auto, blocked, exhaustive, native.")
_KINDS = flags.DEFINE_list("kinds", ["vq"], "Quantizer kinds (registry names; rvqN = depth N).")


def _median_time(fn, *args, repeats: int) -> float:
    return statistics.median(common.time_calls(fn, *args, repeats=repeats))


def build(kind: str, codebook_size: int, dim: int, search: str = "auto"):
    """The quantizer module of `kind` (a registry name, or rvqN) with its module defaults."""
    if kind == "vq":  # the search variants are VectorQuantizer's
        return quantizers.VectorQuantizer(codebook_size=codebook_size, embed_dim=dim, search=search)
    name, fields = kind, {}
    if m := re.fullmatch(r"rvq(\d+)", kind):
        name, fields = "rvq", {"depth": int(m.group(1))}
    if name == "fsq":
        if codebook_size not in FSQ_LEVELS:
            raise UserError(
                f"--kinds=fsq: no levels for K={codebook_size}; use one of {sorted(FSQ_LEVELS)}"
            )
        fields["levels"] = FSQ_LEVELS[codebook_size]
    if quantizer_registry.get(name) is None:
        raise UserError(
            f"--kinds={kind}: unknown; use registry names {quantizer_registry.names()} or rvqN"
        )
    qc = {"kind": name, "codebook_size": codebook_size, "embed_dim": dim, name: fields}
    return state.build_quantizer(qc, jnp.float32)


def bench_one(
    num_tokens: int,
    codebook_size: int,
    dim: int,
    repeats: int,
    search: str = "auto",
    kind: str = "vq",
) -> dict:
    """Times quantize (indices only) and quantize + grad (train mode, statistics updated) for
    one (kind, K, D)."""
    if search != "native":
        return _bench(num_tokens, codebook_size, dim, repeats, search, kind)
    cpu.native.require()
    with kernels.installed(cpu.onednn_kernels()):
        row = _bench(num_tokens, codebook_size, dim, repeats, "auto", kind)
    bits = native_search.screen_bits(row["dim"])
    return row | {"search": search, "screen_bits": bits}


def _bench(num_tokens: int, codebook_size: int, dim: int, repeats: int, search: str, kind: str):
    vq = build(kind, codebook_size, dim, search)
    if isinstance(vq, FSQ):  # fsq / lfq: D follows from the levels / bits
        dim = len(vq.levels)
    elif isinstance(vq, LFQ):
        dim = lfq_bits(codebook_size)
    key = jax.random.key(0)
    z = jax.random.normal(key, (num_tokens, dim), jnp.float32)
    variables = vq.init({"params": key, "dropout": key}, z)
    params, rest = (
        variables.get("params", {}),
        {k: v for k, v in variables.items() if k != "params"},
    )
    rngs = {"dropout": key, "dead_codes": key}

    @jax.jit
    def tokenize(params, z):
        return vq.apply({"params": params, **rest}, z)[1].indices

    @jax.jit
    def train(params, z):
        def loss(params, z):
            (z_q, res), _ = vq.apply(
                {"params": params, **rest}, z, train=True, rngs=rngs, mutable=list(rest)
            )
            return jnp.mean(jnp.square(z_q)) + res.loss

        return jax.grad(loss, argnums=(0, 1))(params, z)

    compiled = train.lower(params, z).compile()
    mem = compiled.memory_analysis()
    scratch = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    t_fwd = _median_time(tokenize, params, z, repeats=repeats)
    t_train = _median_time(compiled, params, z, repeats=repeats)
    return {
        "kind": kind,
        "search": search,
        "codebook_size": codebook_size,
        "dim": dim,
        "tokens": num_tokens,
        "tokenize_tokens_per_s": round(num_tokens / t_fwd),
        "train_tokens_per_s": round(num_tokens / t_train),
        # the [N, D] x [D, K] distance matmul's rate; fsq / lfq tokenize without one
        "search_gflop_s": None
        if isinstance(vq, FSQ | LFQ)
        else round(2 * num_tokens * codebook_size * dim / t_fwd / 1e9, 1),
        "scratch_mib": round(scratch / 2**20, 1),
        "nkd_tensor_mib": round(num_tokens * codebook_size * dim * 4 / 2**20, 1),
    }


def main(argv):
    del argv
    rows = []
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"device: {device}, tokens/call {_TOKENS.value}")
    print(
        "kind   search          K    D  tokenize tok/s  train tok/s  search GFLOP/s  scratch MiB"
        "  [N,K,D] MiB"
    )
    for k in map(int, _SIZES.value):
        for d in map(int, _DIMS.value):
            for kind in _KINDS.value:
                for search in _SEARCH.value if kind == "vq" else ["auto"]:
                    try:
                        r = bench_one(_TOKENS.value, k, d, _REPEATS.value, search, kind)
                    except UserError as e:
                        errors.exit_with("benchmarks.quantizer", e)
                    rows.append(r)
                    print(
                        f"{kind:6s} {search:10s} {k:6d} {r['dim']:4d} "
                        f"{r['tokenize_tokens_per_s']:14,d} "
                        f"{r['train_tokens_per_s']:12,d} "
                        f"{r['search_gflop_s'] or float('nan'):15.1f} "
                        f"{r['scratch_mib']:12.1f} {r['nkd_tensor_mib']:12.1f}",
                        flush=True,
                    )
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
