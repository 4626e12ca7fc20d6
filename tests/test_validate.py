"""Config range checks: every shipped recipe passes; out-of-range fields are named with the fix."""

import os

import pytest

from configs import prior, vqgan, vqvae
from vq_jax import errors, trainer, validate

VARIANTS = ("default", "fashion_mnist", "tiny")


@pytest.mark.parametrize("module", [vqvae, vqgan, prior], ids=lambda m: m.__name__)
def test_shipped_recipes_pass(module):
    for variant in (*VARIANTS, *getattr(module, "VARIANTS", ())):
        assert validate.problems(module.get_config(variant)) == [], variant


def test_out_of_range_field_names_value_range_and_fix():
    config = vqvae.get_config("tiny")
    config.train.log_every = 0
    with pytest.raises(validate.ConfigError) as exc:
        validate.check(config)
    assert str(exc.value) == (
        "config.train.log_every=0 is out of range; valid: an int >= 1 (steps between log lines); "
        "set e.g. --config.train.log_every=100."
    )
    assert isinstance(exc.value, errors.UserError)


def test_every_problem_is_reported_at_once_on_one_line():
    config = prior.get_config("tiny")
    config.sampling.top_p = 0.0
    config.optimizer.b2 = 1.0
    config.prior.num_heads = 3  # embed_dim 16
    with pytest.raises(validate.ConfigError) as exc:
        validate.check(config)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("3 config problems: ")
    assert "config.sampling.top_p=0.0 is out of range; valid: 0 < top_p <= 1" in message
    assert "config.optimizer.b2=1.0 is out of range; valid: 0 <= b2 < 1" in message
    assert "--config.prior.num_heads=2" in message


def test_num_groups_must_divide_every_channel_count():
    config = vqvae.get_config("tiny")  # ch 8, ch_mult (1, 2): 8 and 16 channels
    config.model.num_groups = 3
    (problem,) = validate.problems(config)
    assert problem.startswith(
        "config.model.num_groups=3 does not divide the channel counts [8, 16]"
    )
    assert problem.endswith("set --config.model.num_groups=2")
    config.model.num_groups = 2
    assert validate.problems(config) == []


def test_train_checks_before_touching_the_workdir(tmp_path):
    config = vqvae.get_config("tiny")
    config.train.checkpoint_every = 0  # would be a ZeroDivisionError after compiling
    with pytest.raises(validate.ConfigError, match=r"config.train.checkpoint_every=0"):
        trainer.train(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_learning_rate_zero_is_allowed_and_negative_refused():
    """lr = 0 freezes the network (tests fine-tune with it); a negative lr is a mistake."""
    config = vqvae.get_config("tiny")
    config.optimizer.generator.lr = 0.0
    validate.check(config)
    config.optimizer.generator.lr = -1e-4
    with pytest.raises(validate.ConfigError, match=r"config.optimizer.generator.lr=-0.0001"):
        validate.check(config)
