"""The quantizer kinds a config can name, each with its builder and its config fields.

A kind is one :class:`QuantizerKind`: the module class, the names of its fields that the config
sets (its subsection ``config.quantizer.<name>``, whose defaults are the module's own field
defaults), how ``codebook_size`` / ``embed_dim`` (the fields every kind shares, at the top of
``config.quantizer``) feed it, and the checks of those shared fields that need the kind.
Adding a kind is one module class, one ``register(QuantizerKind(...))`` below, and its tests.

Nothing here reads a config tree: ``state.py`` resolves a config (today's layout or the flat one
that workdirs written before the registry hold) to the plain ``fields`` dict passed here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from vq_jax.nets import quantizers as q
from vq_jax.nets.ibq import IBQ
from vq_jax.nets.lfq import LFQ, lfq_bits
from vq_jax.nets.residual import ResidualVQ
from vq_jax.nets.simvq import SimVQ

MAX_CODEBOOK_SIZE = 2**31 - 1
"""Indices are int32: at most this many codes."""

Problem = tuple[str, Any, str, Any]
"""(field under config.quantizer, its value, what is valid, a valid value)."""


@dataclasses.dataclass(frozen=True)
class QuantizerKind:
    """One registered quantizer kind.

    ``build(codebook_size, embed_dim, fields, dtype)`` makes the module from plain values;
    ``check(codebook_size, embed_dim, fields)`` lists the problems of a configuration (shared
    fields included) before anything is built; ``legacy`` maps the names the flat pre-registry
    config used for this kind's fields to the field names here; ``extra_defaults`` gives config
    defaults for module fields without one (e.g. FSQ's levels).
    """

    name: str
    cls: type
    fields: tuple[str, ...]
    build: Callable[[int, int, dict[str, Any], Any], Any]
    check: Callable[[int, int, dict[str, Any]], list[Problem]] = lambda k, d, f: []
    legacy: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uses_embed_dim: bool = True  # False: embed_dim follows from the kind's own fields

    def defaults(self) -> dict[str, Any]:
        """The config subsection's defaults: the module's field defaults (None -> 0 = off)."""
        by_name = {f.name: f for f in dataclasses.fields(self.cls)}
        out = {}
        for name in self.fields:
            if name in self.extra_defaults:
                out[name] = self.extra_defaults[name]
                continue
            default = by_name[name].default
            if default is dataclasses.MISSING:
                raise TypeError(f"{self.name}: field {name!r} needs an entry in extra_defaults")
            out[name] = 0 if default is None else default
        return out


_KINDS: dict[str, QuantizerKind] = {}


def register(kind: QuantizerKind) -> QuantizerKind:
    if kind.name in _KINDS:
        raise ValueError(f"quantizer kind {kind.name!r} is registered twice")
    unknown = set(kind.fields) - {f.name for f in dataclasses.fields(kind.cls)}
    if unknown:
        raise TypeError(f"{kind.name}: {sorted(unknown)} are not fields of {kind.cls.__name__}")
    _KINDS[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def get(name: str) -> QuantizerKind | None:
    return _KINDS.get(name)


def config_sections() -> dict[str, dict[str, Any]]:
    """{kind: its subsection's defaults}, for the configs' ``quantizer`` section."""
    return {name: kind.defaults() for name, kind in _KINDS.items()}


# --- the shared checks ------------------------------------------------------------------------


def _size_problems(codebook_size: Any) -> list[Problem]:
    if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 2:
        return [("codebook_size", codebook_size, "an int >= 2 (typical: 512 to 16384)", 512)]
    if codebook_size > MAX_CODEBOOK_SIZE:
        return [
            (
                "codebook_size",
                codebook_size,
                f"at most 2**31 - 1 = {MAX_CODEBOOK_SIZE} (indices are int32)",
                2**18,
            )
        ]
    return []


def _codebook_check(*extra: Callable[[dict], list[Problem]]):
    def check(codebook_size: int, embed_dim: int, fields: dict) -> list[Problem]:
        found = _size_problems(codebook_size)
        if not isinstance(embed_dim, int) or embed_dim < 1:
            found.append(("embed_dim", embed_dim, "an int >= 1", 256))
        for fn in extra:
            found += fn(fields)
        return found

    return check


def _init_problems(kind: str) -> Callable[[dict], list[Problem]]:
    def fn(fields: dict) -> list[Problem]:
        if fields.get("codebook_init") not in q.CODEBOOK_INITS:
            valid = "one of " + ", ".join(map(repr, q.CODEBOOK_INITS))
            return [(f"{kind}.codebook_init", fields.get("codebook_init"), valid, "'uniform'")]
        return []

    return fn


def _fsq_check(codebook_size: int, embed_dim: int, fields: dict) -> list[Problem]:
    del embed_dim  # len(levels)
    levels = fields["levels"]
    try:
        levels = tuple(int(v) for v in levels)
    except (TypeError, ValueError):
        levels = ()
    if not levels or min(levels) < 2:
        return [("fsq.levels", fields["levels"], "a tuple of ints >= 2", (8, 5, 5, 5))]
    size = math.prod(levels)
    if size > MAX_CODEBOOK_SIZE:
        return [("fsq.levels", levels, "levels whose product fits int32 indices", (8, 5, 5, 5))]
    if codebook_size != size:
        return [
            (
                "codebook_size",
                codebook_size,
                f"prod(config.quantizer.fsq.levels={levels}) = {size} (or levels whose "
                f"product is {codebook_size})",
                size,
            )
        ]
    return []


def _lfq_check(codebook_size: int, embed_dim: int, fields: dict) -> list[Problem]:
    del embed_dim  # log2(codebook_size)
    found = _size_problems(codebook_size)
    if found:
        return found
    bits = lfq_bits(codebook_size)
    if bits is None or bits > 30:
        pow2 = 2 ** min(30, max(1, round(math.log2(codebook_size))))
        return [
            (
                "codebook_size",
                codebook_size,
                "a power of two <= 2**30: LFQ has one bit per channel, 2**bits codes",
                pow2,
            )
        ]
    if fields.get("entropy_weight") and fields.get("entropy_temperature", 0) <= 0:
        return [("lfq.entropy_temperature", fields["entropy_temperature"], "> 0", 0.01)]
    return []


def _depth_problems(fields: dict) -> list[Problem]:
    found = []
    depth = fields.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        found.append(("rvq.depth", depth, "an int >= 1 (the number of residual stages)", 4))
    if not 0 <= fields.get("dropout", 0) <= 1:
        found.append(("rvq.dropout", fields.get("dropout"), "0 <= dropout <= 1", 0.0))
    return found


def _ibq_problems(fields: dict) -> list[Problem]:
    if not fields.get("temperature", 0) > 0:
        return [("ibq.temperature", fields.get("temperature"), "> 0", 1.0)]
    if fields.get("entropy_weight") and not fields.get("entropy_temperature", 0) > 0:
        return [("ibq.entropy_temperature", fields.get("entropy_temperature"), "> 0", 0.01)]
    return []


# --- the kinds ----------------------------------------------------------------------------------

register(
    QuantizerKind(
        name="vq",
        cls=q.VectorQuantizer,
        fields=(
            "beta",
            "l2_normalize",
            "lookup_dim",
            "entropy_weight",
            "entropy_temperature",
            "codebook_init",
        ),
        build=lambda k, d, f, dtype: q.VectorQuantizer(
            codebook_size=k,
            embed_dim=d,
            **{**f, "lookup_dim": f["lookup_dim"] or None},
            dtype=dtype,
        ),
        check=_codebook_check(_init_problems("vq")),
        legacy={
            "beta": "beta",
            "l2_normalize": "l2_normalize",
            "lookup_dim": "lookup_dim",
            "entropy_weight": "entropy_weight",
            "entropy_temperature": "entropy_temperature",
            "init": "codebook_init",
        },
    )
)
register(
    QuantizerKind(
        name="ema",
        cls=q.EMAVectorQuantizer,
        fields=("beta", "decay", "epsilon", "dead_code_threshold", "codebook_init"),
        build=lambda k, d, f, dtype: q.EMAVectorQuantizer(
            codebook_size=k, embed_dim=d, **f, dtype=dtype
        ),
        check=_codebook_check(_init_problems("ema")),
        legacy={n: n for n in ("beta", "decay", "epsilon", "dead_code_threshold")},
    )
)
register(
    QuantizerKind(
        name="fsq",
        cls=q.FSQ,
        fields=("levels",),
        build=lambda k, d, f, dtype: q.FSQ(levels=tuple(f["levels"]), dtype=dtype),
        check=_fsq_check,
        legacy={"levels": "levels"},
        extra_defaults={"levels": (8, 5, 5, 5)},
        uses_embed_dim=False,
    )
)
register(
    QuantizerKind(
        name="lfq",
        cls=LFQ,
        fields=("beta", "entropy_weight", "diversity_gamma", "entropy_temperature"),
        build=lambda k, d, f, dtype: LFQ(bits=lfq_bits(k), **f, dtype=dtype),
        check=_lfq_check,
        uses_embed_dim=False,
    )
)
register(
    QuantizerKind(
        name="rvq",
        cls=ResidualVQ,
        fields=("depth", "shared_codebook", "beta", "dropout", "codebook_init"),
        build=lambda k, d, f, dtype: ResidualVQ(codebook_size=k, embed_dim=d, **f, dtype=dtype),
        check=_codebook_check(_depth_problems, _init_problems("rvq")),
    )
)
register(
    QuantizerKind(
        name="simvq",
        cls=SimVQ,
        fields=("beta",),
        build=lambda k, d, f, dtype: SimVQ(codebook_size=k, embed_dim=d, **f, dtype=dtype),
        check=_codebook_check(),
    )
)
register(
    QuantizerKind(
        name="ibq",
        cls=IBQ,
        fields=("beta", "temperature", "codebook_init", "entropy_weight", "entropy_temperature"),
        build=lambda k, d, f, dtype: IBQ(codebook_size=k, embed_dim=d, **f, dtype=dtype),
        check=_codebook_check(_ibq_problems, _init_problems("ibq")),
    )
)
