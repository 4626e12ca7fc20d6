"""Test setup: fake 4 CPU devices before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # imported only after XLA_FLAGS is set above

NUM_FAKE_DEVICES = 4
assert jax.device_count() == NUM_FAKE_DEVICES, (
    "tests expect 4 fake CPU devices; jax was imported before tests/conftest.py set XLA_FLAGS"
)
