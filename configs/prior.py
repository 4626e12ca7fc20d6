"""Transformer priors over a trained tokenizer's token grids (stage 2).

Usage: `python train.py --config=configs/prior.py[:VARIANT] --workdir=P
        --config.tokenizer_workdir=W`, VARIANT in
  (none)         accelerator recipe: a class-conditional GPT over 16x16 ImageNet tokens.
  fashion_mnist  class-conditional prior over the 8x8 tokens of configs/vqvae.py:fashion_mnist.
  fashion_mnist_sr
                 4x super-resolution, 8x8 -> 32x32 Fashion-MNIST: a prior over the 8x8 tokens of
                 configs/vqvae.py:fashion_mnist (tokenizer_workdir) conditioned on the 4x4 tokens
                 of configs/vqvae.py:fashion_mnist_lr8 (condition_tokenizer_workdir), whose
                 pipeline area-downsamples the same 32x32 image by 4.
  tiny           a few-second configuration for tests.
  tiny_sr        tiny, conditioned on configs/vqvae.py:tiny_lr tokens (tests).
`--config.prior.kind=maskgit` switches from the autoregressive GPT to MaskGIT. The dataset is the
tokenizer's own; it is tokenized once into P/tokens/ and reused.
"""

import ml_collections as mlc

VARIANTS = ("default", "fashion_mnist", "fashion_mnist_sr", "tiny", "tiny_sr")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Returns the prior config for the named variant."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r} for configs/prior.py; use one of {VARIANTS}."
        )
    c = mlc.ConfigDict()
    c.seed = 0
    c.tokenizer_workdir = ""  # the trained tokenizer (its EMA params when present)
    # prior.condition='image': the trained tokenizer of the condition images (e.g. the
    # low-resolution ones); its dataset must be the tokenizer's, example by example
    c.condition_tokenizer_workdir = ""
    c.condition_scale = 0  # > 0: the condition images must be this many times smaller (SR)

    c.input = mlc.ConfigDict(
        dict(
            data_dir=mlc.FieldReference(None, field_type=str),  # override the tokenizer's
            train_split="train",
            eval_split="validation",
            batch_size=256,  # global
            eval_batch_size=256,
            encode_batch_size=256,  # batches for tokenizing the dataset once
            prefetch=2,
        )
    )
    c.prior = mlc.ConfigDict(
        dict(
            kind="autoregressive",  # autoregressive | maskgit (vq_jax.priors)
            condition="class",  # none | class (num_classes > 0) | image (condition tokenizer)
            num_classes=1000,  # 0: unconditional
            num_layers=24,
            num_heads=16,
            embed_dim=1024,
            mlp_ratio=4,
            dropout=0.0,
            dtype="bfloat16",
            class_dropout=0.1,  # drop labels to the null class: classifier-free guidance
            label_smoothing=0.1,  # maskgit
        )
    )
    c.optimizer = mlc.ConfigDict(
        dict(
            lr=4.5e-4,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.01,
            warmup_steps=5000,
            schedule="cosine",
            clip_norm=1.0,
        )
    )
    c.sampling = mlc.ConfigDict(
        dict(
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            cfg_scale=0.0,
            maskgit_steps=12,
            choice_temperature=4.5,
            samples_per_class=8,
        )
    )
    c.train = mlc.ConfigDict(
        dict(
            steps=300_000,
            log_every=100,
            log_every_seconds=30.0,  # one process: also a progress line this often (0: off)
            eval_every=10_000,
            checkpoint_every=5_000,
            keep_checkpoints=3,
            eval_batches=0,
            checkpoint_fallback=True,
            allow_config_change=False,
            reset_data_iterator=False,  # resume with the data stream from its beginning
            skip_nonfinite_steps=False,
            cpu_kernels="auto",  # the tokenizer's convs when caching tokens (configs/vqvae.py)
        )
    )

    if variant in ("fashion_mnist", "fashion_mnist_sr"):
        c.input.update(
            eval_split="test", batch_size=128, eval_batch_size=500, encode_batch_size=500
        )
        c.prior.update(
            num_classes=10, num_layers=4, num_heads=4, embed_dim=128, dtype="float32", dropout=0.1
        )
        c.optimizer.update(lr=1e-3, warmup_steps=200, weight_decay=0.01)
        c.sampling.update(temperature=1.0, top_k=0, maskgit_steps=8)
        c.train.update(steps=3000, log_every=100, eval_every=1500, checkpoint_every=500)
    if variant == "fashion_mnist_sr":
        c.prior.update(condition="image", num_classes=0, class_dropout=0.0)
        c.condition_scale = 4
        c.sampling.update(samples_per_class=16)  # eval grids: this many test images upsampled
    if variant in ("tiny", "tiny_sr"):
        c.input.update(eval_split="test", batch_size=8, eval_batch_size=8, encode_batch_size=16)
        c.prior.update(num_classes=10, num_layers=1, num_heads=2, embed_dim=16, dtype="float32")
        c.optimizer.update(lr=1e-3, warmup_steps=0, clip_norm=0.0)
        c.sampling.update(maskgit_steps=4, samples_per_class=1)
        c.train.update(steps=4, log_every=2, eval_every=4, checkpoint_every=2, eval_batches=2)
    if variant == "tiny_sr":
        c.prior.update(condition="image", num_classes=0, class_dropout=0.0)
        c.condition_scale = 4
        c.sampling.update(samples_per_class=4)
    c.lock()
    return c
