"""Build (or find in the cache) vq-jax's native CPU kernels and print the library's path.

`vq_jax.cpu.enable` (the trainer calls it at its start) otherwise builds them; prebuild them
where that should not wait, e.g. in a Docker image or CI. Needs the onednn extra and g++
(pip install -e '.[onednn]'):

    python scripts/build_native.py
"""

import logging
import sys

from vq_jax.cpu import native

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        native.require()
    except native.NativeUnavailable as e:
        sys.exit(f"error: {e}")
    print(native.build(verbose=False))
