"""The resume guard: which config entries a workdir's checkpoints depend on, and how they differ.

A run resumes a workdir only if the state-defining entries of its config equal the saved ones
(`config_differences`); `train.allow_config_change` overrides that. Entries that only choose how
the same state is computed (`COMPUTE_ONLY`) and entries added after old workdirs were written
(`ADDED_DEFAULTS`, with the value that means "as before") never count as differences.
"""

from __future__ import annotations

from typing import Any

from vq_jax import state as state_lib

# Config sections that fix the shapes of the train state; a workdir written with other values
# cannot be resumed without `train.allow_config_change`.
STATE_DEFINING = ("model", "quantizer", "discriminator", "input.resolution", "input.channels")
# Entries inside those sections that choose how the same state is computed, not its shapes:
# model.conv_weight_grad was one until the CPU kernels became the runtime setting
# train.cpu_kernels (vq_jax/cpu/); workdirs written before still carry it.
COMPUTE_ONLY = ("model.conv_weight_grad",)
# Entries added after workdirs were first written, with the value that means "as before": a
# saved config without the key equals a current one holding this value.
ADDED_DEFAULTS: dict[str, Any] = {"model.attn_levels": []}


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: list(d) if isinstance(d, tuple | list) else d}
    return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}


def _lookup(d: dict, path: str) -> Any:
    for key in path.split("."):
        d = d.get(key, {}) if isinstance(d, dict) else {}
    return d


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys of STATE_DEFINING config entries that differ between two config dicts."""
    diffs = []
    # The quantizer section compares in its canonical form: the kind, its sizes and its own
    # fields only, whichever layout (flat, pre-registry, or per-kind subsections) each has.
    saved, current = (
        {**d, "quantizer": state_lib.canonical_quantizer_config(d["quantizer"])}
        if isinstance(d.get("quantizer"), dict) and "kind" in d["quantizer"]
        else d
        for d in (saved, current)
    )
    for path in STATE_DEFINING:
        a, b = _flatten(_lookup(saved, path), path), _flatten(_lookup(current, path), path)
        added = {k: v for k, v in ADDED_DEFAULTS.items() if k.startswith(path + ".")}
        a, b = {**added, **a}, {**added, **b}
        diffs += [
            f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in COMPUTE_ONLY
        ]
    return diffs
