"""Test setup: fake 4 CPU devices before jax is imported anywhere, and share compiled programs.

Many tests (and the train.py / sample.py subprocesses they start, which inherit this
environment) compile the same tiny programs; JAX's persistent compilation cache turns each
repeat into a load. The same program always yields the same executable, so results, bit-exact
comparisons included, do not depend on the cache.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vq-jax-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# numpy's OpenBLAS threads spin while they wait: on a busy 2-core machine (CI's is shared) a
# 2048 x 2048 eigendecomposition for FID took 5-40 s with them and ~1.3 s with one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # imported only after the environment above is set

NUM_FAKE_DEVICES = 4
assert jax.device_count() == NUM_FAKE_DEVICES, (
    "tests expect 4 fake CPU devices; jax was imported before tests/conftest.py set XLA_FLAGS"
)
