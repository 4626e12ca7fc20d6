"""Where a train step's time goes: a jax.profiler trace of the compiled step, summed per XLA op
and per kind (conv forward / input gradient / kernel gradient, other library calls, fusions).

  JAX_PLATFORMS=cpu python -m benchmarks.profile --config=configs/vqvae.py:taming_cpu
  JAX_PLATFORMS=cpu python -m benchmarks.profile --config=configs/vqgan.py:fashion_mnist \\
      --config.train.cpu_kernels=xla

Times are thread time per step on the XLA:CPU worker threads (ops on different threads overlap,
so the total can exceed the step's wall time). Kinds come from the ops' JAX source names.
"""

import collections
import glob
import re
import tempfile

import jax
from absl import app, flags
from jax._src.lib import _profile_data
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_STEPS = flags.DEFINE_integer("steps", 3, "Profiled steps (after 2 warm-up steps).")
_TOP = flags.DEFINE_integer("top", 20, "Individual ops to list.")
flags.mark_flags_as_required(["config"])

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(.*?\)(.*)$", re.M)


def op_kind(shape: str, opcode: str, op_name: str, rest: str) -> str:
    """Classify one HLO instruction by what it computes."""
    library = "__ynn_fusion" in rest or "__onednn" in rest or opcode in ("convolution", "dot")
    if "conv_general_dilated" in op_name and (library or opcode in ("fusion", "convolution")):
        if "transpose(jvp" not in op_name:
            return "conv forward"
        dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1].split("]")[0])]
        small = lambda a, b: dims[a] == dims[b] <= 7  # a kernel's spatial dims
        if len(dims) == 4 and (small(1, 2) or small(0, 1)):  # [O, kh, kw, I] or [kh, kw, I, O]
            return "conv kernel gradient"
        return "conv input gradient"
    if "closed_call" in op_name and library:
        return "patch GEMMs (kernel gradient)"
    if library:
        return "other library calls (dots, reductions)"
    return "XLA fusions (elementwise, slices, copies)"


def main(argv):
    del argv
    _, _, step, state, batch, key = common.setup_step(common.adversarial_on(_CONFIG.value))
    compiled = step.lower(state, batch, key).compile()
    instrs = {m[0]: m[1:] for m in _INSTR.findall(compiled.as_text())}
    for _ in range(2):
        state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(_STEPS.value):
                state, m = compiled(state, batch, key)
            jax.block_until_ready((state, m))
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        profile = _profile_data.ProfileData.from_file(path)
    per_kind, per_op = collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the XLA:CPU worker threads
                continue
            for ev in line.events:
                if ev.name not in instrs:
                    continue
                shape, opcode, rest = instrs[ev.name]
                name = re.search(r'op_name="([^"]*)"', rest)
                name = name.group(1) if name else ""
                kind = op_kind(shape, opcode, name, rest)
                per_kind[kind] += ev.duration_ns
                short = "/".join(name.split("/")[-3:])
                per_op[(kind, shape.split("{")[0], short)] += ev.duration_ns
    n, total = _STEPS.value, sum(per_kind.values())
    print(f"thread time per step: {total / n / 1e9:.3f} s")
    for kind, t in per_kind.most_common():
        print(f"  {100 * t / total:5.1f}%  {t / n / 1e6:8.1f} ms  {kind}")
    print(f"top {_TOP.value} ops (summed over instances):")
    for (kind, shape, name), t in per_op.most_common(_TOP.value):
        print(f"  {t / n / 1e6:8.1f} ms  {kind:40s} {shape:24s} {name}")


if __name__ == "__main__":
    app.run(main)
