"""Quantizer kinds from the config: the registry, per-kind subsections, old (flat) workdir configs,
and one-line errors for bad quantizer settings before anything compiles."""

import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest

import vq_jax
from configs import vqvae
from vq_jax import resume, trainer, validate
from vq_jax import state as state_lib
from vq_jax.errors import UserError
from vq_jax.nets import quantizer_registry
from vq_jax.nets.quantizers import Quantizer
from vq_jax.tasks import tokenizer as tokenizer_task

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture(kind: str) -> dict:
    """A tiny config as the code before the registry saved it (flat quantizer section)."""
    with open(os.path.join(FIXTURES, f"pre_registry_tiny_{kind}_config.json")) as f:
        return json.load(f)


def test_registry_lists_every_kind_with_module_defaults():
    assert set(quantizer_registry.names()) >= {"vq", "ema", "fsq", "lfq", "rvq", "simvq", "ibq"}
    sections = quantizer_registry.config_sections()
    assert sections["rvq"]["depth"] == 2 and sections["vq"]["lookup_dim"] == 0
    config = vqvae.get_config("tiny")
    for name in quantizer_registry.names():
        assert dict(config.quantizer[name]) == dict(sections[name]) or name == "ema"


@pytest.mark.parametrize("kind", ["vq", "ema", "fsq", "lfq", "rvq", "simvq", "ibq"])
def test_every_kind_builds_from_the_tiny_config(kind):
    config = vqvae.get_config("tiny")
    config.quantizer.kind = kind
    if kind == "fsq":
        config.quantizer.fsq.levels = (4, 4, 2)  # 32 codes, as tiny's codebook_size
    validate.check(config)
    q = state_lib.build_quantizer(config.quantizer, np.float32)
    assert isinstance(q, Quantizer) and q.codebook_size == 32
    assert type(q) is quantizer_registry.get(kind).cls
    assert q.embed_dim == {"fsq": 3, "lfq": 5}.get(kind, 8)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("ema", {"beta": 0.25, "decay": 0.99, "epsilon": 1e-5, "dead_code_threshold": 0.5}),
        ("vq", {"beta": 0.25, "lookup_dim": None, "codebook_init": "uniform"}),
        ("fsq", {"levels": (4, 3, 2)}),
    ],
)
def test_flat_pre_registry_configs_build_the_same_quantizer(kind, expected):
    saved = mlc.ConfigDict(_fixture(kind))  # as api.restore_state reads a checkpoint's config
    q = state_lib.build(saved).model.quantizer
    for field, value in expected.items():
        assert getattr(q, field) == value, field
    if kind == "fsq":  # FSQ ignored the flat codebook_size / embed_dim
        assert (q.codebook_size, q.embed_dim) == (24, 3)
    else:
        assert (q.codebook_size, q.embed_dim) == (32, 8)


def test_flat_config_equals_todays_layout_for_resuming():
    """A workdir saved with the flat section resumes under today's tiny config (same kind and
    values); a real change inside the kind's own fields is still reported, by its new name;
    fields of other kinds never block a resume."""
    saved = _fixture("ema")
    current = json.loads(vqvae.get_config("tiny").to_json_best_effort())
    assert resume.config_differences(saved, current) == []
    current["quantizer"]["lfq"]["entropy_weight"] = 0.5  # another kind's field
    assert resume.config_differences(saved, current) == []
    current["quantizer"]["ema"]["decay"] = 0.9
    assert resume.config_differences(saved, current) == ["quantizer.ema.decay: 0.99 -> 0.9"]


@pytest.mark.slow
def test_workdir_with_flat_config_loads_resumes_and_samples(tmp_path):
    """Train 2 steps under the flat (pre-registry) config, as an old workdir holds it; then load
    it, encode / decode, and resume it with today's config."""
    workdir = str(tmp_path / "w")
    old = mlc.ConfigDict(_fixture("ema"))
    old.train.steps = 2
    trainer.train(old, workdir)
    tok = vq_jax.load(workdir)
    images = (np.random.default_rng(0).random((2, 16, 16, 1)) * 255).astype(np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 8, 8) and tok.decode(tokens).shape == images.shape
    config = vqvae.get_config("tiny")
    config.train.steps = 4
    trainer.train(config, workdir)  # no "different model config" refusal
    assert vq_jax.load(workdir).step == 4


# --- bad input: one line naming the field and a valid value, before compiling -----------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: setattr(c.quantizer, "kind", "gumbel"),
            r"config.quantizer.kind='gumbel' is unknown; valid: one of 'vq', .*'ibq'",
        ),
        (
            lambda c: (setattr(c.quantizer, "kind", "fsq"), c.quantizer.fsq.update(levels=(8, 5))),
            r"config.quantizer.codebook_size=32 .*prod\(config.quantizer.fsq.levels=\(8, 5\)\) "
            r"= 40.*--config.quantizer.codebook_size=40",
        ),
        (
            lambda c: c.quantizer.update(kind="lfq", codebook_size=1000),
            r"config.quantizer.codebook_size=1000 .*power of two.*--config.quantizer.codebook_size"
            r"=1024",
        ),
        (
            lambda c: (setattr(c.quantizer, "kind", "rvq"), c.quantizer.rvq.update(depth=0)),
            r"config.quantizer.rvq.depth=0 .*an int >= 1.*--config.quantizer.rvq.depth=4",
        ),
        (
            lambda c: c.quantizer.update(kind="vq", codebook_size=2**31),
            r"config.quantizer.codebook_size=2147483648 .*int32.*codebook_size=262144",
        ),
        (
            lambda c: c.quantizer.update(kind="lfq", codebook_size=2**31),
            r"config.quantizer.codebook_size=2147483648 .*int32",
        ),
        (
            lambda c: (
                setattr(c.quantizer, "kind", "ibq"),
                c.quantizer.ibq.update(entropy_weight=0.1, entropy_temperature=0.0),
            ),
            r"config.quantizer.ibq.entropy_temperature=0.0 .*> 0.*"
            r"--config.quantizer.ibq.entropy_temperature=0.01",
        ),
    ],
    ids=["unknown_kind", "fsq_levels", "lfq_bits", "rvq_depth", "int32", "lfq_int32", "ibq_ent"],
)
def test_bad_quantizer_settings_are_one_line_errors(edit, match):
    config = vqvae.get_config("tiny")
    edit(config)
    with pytest.raises(UserError, match=match) as info:
        validate.check(config)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=match):
        state_lib.build_quantizer(config.quantizer, np.float32)


def test_bad_quantizer_settings_stop_train_before_compiling(tmp_path, monkeypatch):
    config = vqvae.get_config("tiny")
    config.quantizer.kind = "lfq"
    config.quantizer.codebook_size = 48
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(UserError, match="codebook_size=48"):
        trainer.train(config, str(tmp_path / "w"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lfq", "rvq", "simvq", "ibq"])
def test_new_kinds_train_with_the_tiny_config(kind, tmp_path):
    """`--config.quantizer.kind=KIND` with configs/vqvae.py:tiny trains, evaluates, saves; the
    step reports the kind's measurements; the workdir loads and round-trips tokens."""
    config = vqvae.get_config("tiny")
    config.quantizer.kind = kind
    config.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    workdir = str(tmp_path / kind)
    result = trainer.train(config, workdir)
    assert np.isfinite(result["psnr"]) and 0 < result["codebook_usage"] <= 1
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = set().union(*(json.loads(line).keys() for line in f))
    assert {"train/quant_loss", "train/perplexity", "train/usage"} <= logged
    tok = vq_jax.load(workdir)
    images = (np.random.default_rng(0).random((2, 16, 16, 1)) * 255).astype(np.uint8)
    tokens = tok.encode(images)
    depth = (config.quantizer.rvq.depth,) if kind == "rvq" else ()
    assert tokens.shape == (2, 8, 8, *depth)
    np.testing.assert_array_equal(tok.encode(tok.decode(tokens)).shape, tokens.shape)


def test_step_reports_every_quantizer_measurement():
    """The train step logs the quantizer's whole aux dict: EMA's dead-code restarts (counted by
    an independent recount of dead codes) and the per-kind losses."""
    from vq_jax import steps as steps_lib

    config = vqvae.get_config("tiny")
    config.quantizer.ema.dead_code_threshold = 1e6  # every code restarts at the first step
    comps = state_lib.build(config)
    state = state_lib.init_state(comps, jax.random.key(0), ema=False)
    step = jax.jit(steps_lib.make_tokenizer_step(comps, tokenizer_task.loss_settings(config)))
    x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 1), minval=-1.0, maxval=1.0)
    new_state, m = step(state, {"image": x, "label": np.zeros(8, np.int32)}, jax.random.key(2))
    assert {"quant_loss", "commitment_loss", "perplexity", "usage", "num_restarted"} <= set(m)
    cluster = new_state["model_state"]["vq_stats"]["quantizer"]["cluster_size"]
    assert float(m["num_restarted"]) == 32 == int(np.sum(np.asarray(cluster) == 1e6))
