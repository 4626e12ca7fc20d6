"""Range checks of a training config, before anything reads data, compiles or writes.

A value out of range otherwise surfaces late and far from its cause: `log_every=0` as a
ZeroDivisionError after compilation, `top_p=0` as NaN samples at the first evaluation,
`num_groups` not dividing a channel count as a Flax error from inside the encoder. `check`
reports every problem at once, each naming the field, its value, what is valid and the flag
that fixes it. Fields a config does not have are skipped (tokenizer and prior configs differ;
configs saved by older versions lack newer fields). Checks that need the devices (batch sizes)
or the model (resolution vs. downsampling, quantizer kinds) live in `state.validate_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections as mlc

from vq_jax.errors import UserError


class ConfigError(UserError):
    """One or more config values are out of range."""

    plain = True  # the message names the config field: the class name adds nothing


@dataclasses.dataclass(frozen=True)
class Rule:
    """`field` (dotted, under config) must satisfy `ok`; `valid` says what is valid in words and
    `example` is a valid value for the fix."""

    field: str
    ok: Callable[[Any], bool]
    valid: str
    example: Any


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v >= lo


def above(lo: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v > lo


def within(lo: float, hi: float, *, hi_open: bool = False) -> Callable[[Any], bool]:
    """lo <= v <= hi (v < hi with `hi_open`)."""
    return lambda v: _number(v) and lo <= v and (v < hi if hi_open else v <= hi)


def one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


def ints(lo: int, *, min_len: int = 0) -> Callable[[Any], bool]:
    """A tuple (or a list, as saved in JSON) of at least `min_len` ints >= lo."""
    return lambda v: (
        isinstance(v, tuple | list)
        and len(v) >= min_len
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v)
    )


def _choices(*values: str) -> str:
    return "one of " + ", ".join(repr(v) for v in values)


def _optimizer_rules(prefix: str) -> tuple[Rule, ...]:
    return (
        Rule(f"{prefix}.lr", at_least(0), "a learning rate >= 0 (0 freezes the network)", 1e-4),
        Rule(f"{prefix}.b1", within(0, 1, hi_open=True), "0 <= b1 < 1", 0.9),
        Rule(f"{prefix}.b2", within(0, 1, hi_open=True), "0 <= b2 < 1", 0.99),
        Rule(f"{prefix}.eps", above(0), "Adam's epsilon > 0", 1e-8),
        Rule(f"{prefix}.weight_decay", at_least(0), ">= 0 (0 disables it)", 0.0),
        Rule(f"{prefix}.warmup_steps", at_least(0), "an int >= 0 (0: no warm-up)", 0),
        Rule(f"{prefix}.clip_norm", at_least(0), ">= 0 (0 disables clipping)", 1.0),
        Rule(
            f"{prefix}.schedule",
            one_of("constant", "cosine"),
            _choices("constant", "cosine"),
            "'cosine'",
        ),
    )


RULES: tuple[Rule, ...] = (
    Rule("train.steps", at_least(1), "an int >= 1", 1000),
    Rule("train.log_every", at_least(1), "an int >= 1 (steps between log lines)", 100),
    Rule("train.log_every_seconds", at_least(0), ">= 0 (0: only every log_every)", 30.0),
    Rule("train.eval_every", at_least(1), "an int >= 1 (steps between evaluations)", 1000),
    Rule("train.checkpoint_every", at_least(1), "an int >= 1 (steps between saves)", 500),
    Rule("train.keep_checkpoints", at_least(1), "an int >= 1 (checkpoints kept)", 3),
    Rule("train.eval_batches", at_least(0), "an int >= 0 (0: the whole split)", 0),
    Rule("train.ema_decay", within(0, 1, hi_open=True), "0 <= ema_decay < 1 (0: off)", 0.999),
    Rule("train.num_sample_images", at_least(1), "an int >= 1", 16),
    Rule(
        "train.cpu_kernels",
        one_of("auto", "onednn", "xla"),
        _choices("auto", "onednn", "xla"),
        "'xla'",
    ),
    Rule("input.resolution", at_least(1), "an int >= 1 (pixels)", 32),
    Rule("input.channels", one_of(1, 3), "1 (grayscale) or 3 (RGB)", 3),
    Rule("input.batch_size", at_least(1), "an int >= 1 (global)", 64),
    Rule("input.eval_batch_size", at_least(1), "an int >= 1 (global)", 64),
    Rule("input.encode_batch_size", at_least(1), "an int >= 1", 256),
    Rule("input.prefetch", at_least(0), "an int >= 0 (batches prepared ahead)", 2),
    Rule("input.synthetic_size", at_least(1), "an int >= 1 (examples)", 256),
    Rule(
        "input.resize",
        one_of("pad", "resize_crop", "none"),
        _choices("pad", "resize_crop", "none"),
        "'resize_crop'",
    ),
    Rule("input.on_corrupt", one_of("skip", "error"), _choices("skip", "error"), "'skip'"),
    Rule("model.ch", at_least(1), "an int >= 1", 128),
    Rule(
        "model.ch_mult",
        ints(1, min_len=1),
        "a tuple of ints >= 1, one per resolution level (downsampling 2**(len - 1))",
        "'(1,2,2)'",
    ),
    Rule("model.attn_resolutions", ints(1), "a tuple of ints >= 1 (pixels; may be empty)", "'()'"),
    Rule("model.attn_levels", ints(0), "a tuple of ch_mult level indices (may be empty)", "'()'"),
    Rule("model.num_res_blocks", at_least(0), "an int >= 0", 2),
    Rule("model.z_channels", at_least(1), "an int >= 1", 256),
    Rule("model.dropout", within(0, 1, hi_open=True), "0 <= dropout < 1", 0.0),
    Rule("quantizer.embed_dim", at_least(1), "an int >= 1", 256),
    Rule("quantizer.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.levels", ints(2, min_len=1), "a tuple of ints >= 2 (fsq)", "'(8,5,5,5)'"),
    Rule("quantizer.decay", within(0, 1, hi_open=True), "0 <= decay < 1", 0.99),
    Rule("quantizer.epsilon", above(0), "> 0", 1e-5),
    Rule("quantizer.vq.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.ema.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.ema.decay", within(0, 1, hi_open=True), "0 <= decay < 1", 0.99),
    Rule("quantizer.ema.epsilon", above(0), "> 0", 1e-5),
    Rule("quantizer.ema.dead_code_threshold", at_least(0), ">= 0 (0: no restarts)", 1.0),
    Rule("quantizer.lfq.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.lfq.entropy_weight", at_least(0), ">= 0 (0: no entropy penalty)", 0.1),
    Rule("quantizer.rvq.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.simvq.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("quantizer.ibq.beta", at_least(0), ">= 0 (commitment weight)", 0.25),
    Rule("discriminator.ndf", at_least(1), "an int >= 1", 64),
    Rule("discriminator.n_layers", at_least(1), "an int >= 1", 3),
    Rule("loss.l1_weight", at_least(0), ">= 0", 1.0),
    Rule("loss.l2_weight", at_least(0), ">= 0", 0.0),
    Rule("loss.perceptual_weight", at_least(0), ">= 0 (0: no LPIPS)", 1.0),
    Rule("loss.disc_weight", at_least(0), ">= 0", 0.8),
    Rule("loss.disc_start", at_least(0), "an int >= 0 (step)", 0),
    Rule("prior.num_classes", at_least(0), "an int >= 0 (0: unconditional)", 10),
    Rule("prior.num_layers", at_least(1), "an int >= 1", 12),
    Rule("prior.num_heads", at_least(1), "an int >= 1", 8),
    Rule("prior.embed_dim", at_least(1), "an int >= 1", 512),
    Rule("prior.mlp_ratio", at_least(1), "an int >= 1", 4),
    Rule("prior.dropout", within(0, 1, hi_open=True), "0 <= dropout < 1", 0.1),
    Rule("prior.class_dropout", within(0, 1), "0 <= class_dropout <= 1", 0.1),
    Rule("prior.label_smoothing", within(0, 1, hi_open=True), "0 <= label_smoothing < 1", 0.1),
    Rule("sampling.temperature", above(0), "> 0", 1.0),
    Rule("sampling.top_k", at_least(0), "an int >= 0 (0: off)", 0),
    Rule("sampling.top_p", lambda v: above(0)(v) and v <= 1, "0 < top_p <= 1 (1: off)", 1.0),
    Rule("sampling.cfg_scale", at_least(0), ">= 0 (0: no guidance)", 0.0),
    Rule("sampling.maskgit_steps", at_least(1), "an int >= 1", 8),
    Rule("sampling.samples_per_class", at_least(1), "an int >= 1", 8),
    *_optimizer_rules("optimizer.generator"),
    *_optimizer_rules("optimizer.discriminator"),
    *_optimizer_rules("optimizer"),  # the prior's single optimizer
)

_MISSING = object()


def _get(config: Any, field: str) -> Any:
    """config[a][b]... for 'a.b...', or _MISSING where a level is absent or not a section."""
    node = config
    for key in field.split("."):
        if not isinstance(node, mlc.ConfigDict | dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _group_problems(config: mlc.ConfigDict) -> list[str]:
    """GroupNorm needs num_groups to divide every channel count it normalises."""
    problems = []
    ch, mult, groups = (_get(config, f"model.{k}") for k in ("ch", "ch_mult", "num_groups"))
    if _MISSING not in (ch, mult, groups) and isinstance(groups, int):
        counts = sorted({ch * m for m in (1, *mult)})
        bad = [c for c in counts if groups <= 0 or c % groups]
        if bad:
            fits = [g for g in range(min(groups, ch), 0, -1) if all(c % g == 0 for c in counts)]
            problems.append(
                f"config.model.num_groups={groups} does not divide the channel counts {bad} "
                f"(config.model.ch={ch} times ch_mult={tuple(mult)}); valid: a divisor of every "
                f"channel count {counts}; set --config.model.num_groups={fits[0] if fits else 1}"
            )
    return problems


def _head_problems(config: mlc.ConfigDict) -> list[str]:
    dim, heads = _get(config, "prior.embed_dim"), _get(config, "prior.num_heads")
    if isinstance(dim, int) and isinstance(heads, int) and heads >= 1 and dim % heads:
        fits = [h for h in range(heads, 0, -1) if dim % h == 0]
        return [
            f"config.prior.num_heads={heads} does not divide config.prior.embed_dim={dim}; "
            f"valid: a divisor of embed_dim; set --config.prior.num_heads={fits[0]}"
        ]
    return []


def _quantizer_problems(config: mlc.ConfigDict) -> list[str]:
    """The quantizer kind, its sizes and its own fields (checks registered with each kind)."""
    qc = _get(config, "quantizer")
    if not isinstance(qc, mlc.ConfigDict | dict) or "kind" not in qc:
        return []
    from vq_jax.state import quantizer_problems  # deferred: state builds networks

    return quantizer_problems(qc)


def problems(config: mlc.ConfigDict) -> list[str]:
    """One line per out-of-range field: field, value, what is valid, the flag that fixes it."""
    found = []
    for rule in RULES:
        value = _get(config, rule.field)
        if value is _MISSING or isinstance(value, mlc.ConfigDict | dict):
            continue
        if not rule.ok(value):
            found.append(
                f"config.{rule.field}={value!r} is out of range; valid: {rule.valid}; set e.g. "
                f"--config.{rule.field}={rule.example}"
            )
    return (
        found
        + _group_problems(config)
        + _head_problems(config)
        + _quantizer_problems(config)
        + _level_problems(config)
    )


def _level_problems(config: mlc.ConfigDict) -> list[str]:
    mult, levels = _get(config, "model.ch_mult"), _get(config, "model.attn_levels")
    if ints(1, min_len=1)(mult) and ints(0)(levels):
        bad = [v for v in levels if v >= len(mult)]
        if bad:
            return [
                f"config.model.attn_levels={tuple(levels)} names levels {bad} but "
                f"config.model.ch_mult={tuple(mult)} has levels 0..{len(mult) - 1}; set e.g. "
                f"--config.model.attn_levels='({len(mult) - 1},)'"
            ]
    return []


def check_overrides(config: mlc.ConfigDict, args: list[str]) -> None:
    """Refuses `--config.F=V` with a single value V for a tuple field F: ml_collections would
    silently make it the 1-tuple (V,) (`ch_mult=2` trained another model than meant)."""
    found = []
    for arg in args:
        if not arg.startswith("--config."):
            continue
        field, eq, text = arg[len("--config.") :].partition("=")
        value = _get(config, field)
        if eq and isinstance(value, tuple) and not text.strip().startswith(("(", "[")):
            found.append(
                f"--config.{field}={text} gives one value for the tuple field config.{field}; "
                f"write a tuple in quotes, e.g. --config.{field}='({text},)' for one entry "
                f"(or several: --config.{field}='({text},{text})')"
            )
    if found:
        raise ConfigError(" | ".join(found) + ".")


def check_sampling(sampling: Any) -> None:
    """The sampling parameters (config.sampling with any overrides) the API is about to use:
    raises ConfigError naming each bad one by its keyword (sample.py: the flag of that name)."""
    found = []
    for rule in RULES:
        if not rule.field.startswith("sampling."):
            continue
        name = rule.field.split(".", 1)[1]
        value = _get(sampling, name)
        if value is not _MISSING and not rule.ok(value):
            found.append(
                f"{name}={value!r} is out of range; valid: {rule.valid}; e.g. "
                f"{name}={rule.example} (sample.py --{name}, or config.sampling.{name})"
            )
    if found:
        raise ConfigError("sampling: " + " | ".join(found) + ".")


def check(config: mlc.ConfigDict) -> None:
    """Raises ConfigError listing every problem `problems` finds (on one line)."""
    found = problems(config)
    if len(found) == 1:
        raise ConfigError(found[0] + ".")
    if found:
        raise ConfigError(f"{len(found)} config problems: " + " | ".join(found) + ".")
