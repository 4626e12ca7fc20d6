"""Prior sampling throughput (images/s, decoding included) of trained priors at one batch size,
plus their class-conditional sample grids (one row per class).

  python -m benchmarks.sampling --prior_workdirs=/tmp/prior_ar,/tmp/prior_maskgit \\
      --names=GPT,MaskGIT --batch_size=100 --out=docs/fashion_mnist_prior
"""

import json
import statistics
import time

import numpy as np
from absl import app, flags

from vq_jax import api, metrics

_WORKDIRS = flags.DEFINE_list("prior_workdirs", None, "Trained prior workdirs.")
_NAMES = flags.DEFINE_list("names", None, "Display names, one per workdir.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per sampling call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after one warm-up call.")
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "Samples per class in the grid.")
_OUT = flags.DEFINE_string("out", None, "Output prefix: OUT_NAME_samples.png, OUT_sampling.json")
flags.mark_flags_as_required(["prior_workdirs", "out"])


def main(argv):
    del argv
    names = _NAMES.value or _WORKDIRS.value
    results = {}
    for name, workdir in zip(names, _WORKDIRS.value, strict=True):
        prior = api.load_prior(workdir)
        n = _BATCH.value
        prior.generate(n, seed=0)  # compile
        times = []
        for i in range(_REPEATS.value):
            t0 = time.perf_counter()
            prior.generate(n, seed=i + 1)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        c = max(prior.num_classes, 1)
        labels = np.repeat(np.arange(c), _PER_CLASS.value) if prior.num_classes else None
        images, _, _ = prior.generate(c * _PER_CLASS.value, labels=labels, seed=0)
        path = f"{_OUT.value}_{name.lower()}_samples.png"
        metrics.save_png(path, metrics.image_grid(images, ncols=_PER_CLASS.value))
        results[name] = {
            "kind": prior.comps.kind,
            "batch_size": n,
            "median_s": round(med, 3),
            "images_per_s": round(n / med, 1),
            "steps": prior.step,
            "grid": path,
        }
        print(name, results[name], flush=True)
    with open(f"{_OUT.value}_sampling.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
