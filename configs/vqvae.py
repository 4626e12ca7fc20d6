"""VQ-VAE tokenizer recipes.

Usage: `python train.py --config=configs/vqvae.py[:VARIANT] --workdir=W`, VARIANT in
  (none)         accelerator recipe: taming's f16 design on ImageNet 256x256 (tfds:imagenet2012).
  fashion_mnist  the CPU-sized embedded default: 32x32 padded Fashion-MNIST, f4 -> 8x8 tokens.
  taming_cpu     the shapes of the CPU speed comparison with taming-transformers (BENCHMARKS.md):
                 32x32x1 Fashion-MNIST, ch 64, ch_mult (1,2,2), 2 res blocks, attention at 8x8,
                 z 64, 512 codes, plain VQ, Adam, batch 64, float32.
  fashion_mnist_lr8
                 the low-resolution (condition) tokenizer of configs/prior.py:fashion_mnist_sr:
                 the 32x32 padded Fashion-MNIST image area-averaged over 4x4 blocks
                 (input.downsample=4) -> 8x8, f2 -> 4x4 tokens.
  tiny           a few-second configuration for tests.
  tiny_lr        tiny's 16x16 synthetic images area-downsampled 4x -> 4x4, f2 -> 2x2 tokens.
Any field can be overridden on the command line, e.g. `--config.optimizer.generator.lr=1e-4`;
unknown keys are rejected.
"""

import ml_collections as mlc

from vq_jax.nets import quantizer_registry

VARIANTS = ("default", "fashion_mnist", "fashion_mnist_lr8", "taming_cpu", "tiny", "tiny_lr")


def _optimizer(lr: float, *, b1: float = 0.5, b2: float = 0.9) -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            lr=lr,
            b1=b1,
            b2=b2,
            eps=1e-8,  # Adam's epsilon
            weight_decay=0.0,
            warmup_steps=0,
            schedule="constant",  # constant | cosine (after warm-up)
            clip_norm=0.0,  # global-norm clipping; 0 disables
        )
    )


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Returns the VQ-VAE config for the named variant."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r} for configs/vqvae.py; use one of {VARIANTS}."
        )
    c = mlc.ConfigDict()
    c.seed = 0

    c.input = mlc.ConfigDict(
        dict(
            dataset="tfds:imagenet2012",
            data_dir=mlc.FieldReference(None, field_type=str),
            train_split="train",
            eval_split="validation",
            resolution=256,
            channels=3,
            resize="resize_crop",  # pad | resize_crop | none
            convert_channels=False,
            random_flip=True,
            batch_size=64,  # global, across all processes and devices
            eval_batch_size=64,
            prefetch=2,
            on_corrupt="skip",  # folder datasets: skip | error
            synthetic_size=256,
            # > 1: prepare the image at downsample * resolution, then average each
            # downsample x downsample block (area downsampling): low-resolution condition images
            downsample=1,
        )
    )

    c.model = mlc.ConfigDict(
        dict(
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            attn_levels=(),  # non-empty: attention after the res blocks of these ch_mult levels
            # at any input size (attn_resolutions unused); converted checkpoints set it
            z_channels=256,
            dropout=0.0,
            num_groups=32,
            dtype="bfloat16",  # compute dtype; parameters stay float32
        )
    )

    # kind, the shared sizes, and one subsection per kind with the module's defaults
    # (vq_jax/nets/quantizer_registry.py); only the subsection of `kind` is read, e.g.
    # --config.quantizer.kind=rvq --config.quantizer.rvq.depth=4. embed_dim is the code width of
    # the codebook kinds (vq, ema, rvq, simvq, ibq); fsq uses len(fsq.levels) and needs
    # codebook_size = prod(levels); lfq uses log2(codebook_size) bits (a power of two).
    c.quantizer = mlc.ConfigDict(
        dict(
            kind="vq",  # one of quantizer_registry.names(): vq ema fsq lfq rvq simvq ibq
            codebook_size=16384,
            embed_dim=256,
            **quantizer_registry.config_sections(),
        )
    )

    c.loss = mlc.ConfigDict(dict(l1_weight=1.0, l2_weight=0.0))

    c.optimizer = mlc.ConfigDict(dict(generator=_optimizer(4.5e-6 * 64)))

    c.train = mlc.ConfigDict(
        dict(
            steps=500_000,
            log_every=100,
            log_every_seconds=30.0,  # one process: also a progress line this often (0: off)
            eval_every=10_000,
            checkpoint_every=5_000,
            keep_checkpoints=3,
            eval_batches=0,  # 0: the whole held-out split
            ema_decay=0.0,  # > 0 keeps a polyak copy of generator params for eval / sampling
            num_sample_images=16,
            checkpoint_fallback=True,  # a damaged newest checkpoint -> resume from the previous
            allow_config_change=False,  # resume a workdir whose model config differs
            # resume with the data stream from its beginning (the saved position is for another
            # dataset, batch size or seed); the model and optimizer state are restored as usual
            reset_data_iterator=False,
            # a tokenizer workdir (a converted one too) whose generator weights start a new run;
            # its model / quantizer config replaces this one's; discriminator and optimizer start
            # fresh. Unlike resume, only the generator is taken. Ignored once W has a checkpoint.
            init_from="",
            skip_nonfinite_steps=False,  # skip (and count) NaN/Inf steps instead of stopping
            # how convs and GroupNorm compute (not what): "auto" (oneDNN convs + the native
            # GroupNorm kernel on a single CPU device when the onednn extra builds, else XLA's),
            # "onednn" or "xla"; same math, see vq_jax/cpu/__init__.py, BENCHMARKS.md
            cpu_kernels="auto",
        )
    )

    # What the periodic evaluation measures beyond PSNR / SSIM / codebook usage.
    c.eval = mlc.ConfigDict(
        dict(
            # a .npz from scripts/convert_inception.py: adds rFID (N = the evaluated images) to
            # every evaluation. On CPU Inception costs ~0.3 s per image (2-core AMD EPYC): bound
            # it with train.eval_batches, or measure afterwards with `python -m vq_jax.evaluate`.
            inception_weights="",
        )
    )

    if variant in ("fashion_mnist", "fashion_mnist_lr8", "taming_cpu"):  # 32x32 padded, batch 64
        c.input.update(
            dataset="fashion_mnist",
            train_split="train",
            eval_split="test",
            resolution=32,
            channels=1,
            resize="pad",
            random_flip=False,
            batch_size=64,
            eval_batch_size=500,
        )
    if variant == "fashion_mnist_lr8":  # 4x area-downsampled: 32x32 -> 8x8, f2 -> 4x4 tokens
        c.input.update(resolution=8, downsample=4)
    if variant in ("fashion_mnist", "fashion_mnist_lr8"):
        c.model.update(
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            z_channels=32,
            num_groups=8,
            dtype="float32",
        )
        c.quantizer.update(kind="ema", codebook_size=512, embed_dim=32)
        c.quantizer.ema.update(dead_code_threshold=1.0, decay=0.99)
        c.optimizer.generator = _optimizer(1e-3, b1=0.9, b2=0.99)
        c.optimizer.generator.update(warmup_steps=200, schedule="cosine")
        c.train.update(
            steps=2000, log_every=100, eval_every=1000, checkpoint_every=500, ema_decay=0.0
        )
    elif variant == "taming_cpu":
        c.model.update(
            ch=64,
            ch_mult=(1, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(8,),
            z_channels=64,
            num_groups=32,
            dtype="float32",
        )
        c.quantizer.update(kind="vq", codebook_size=512, embed_dim=64)
        c.optimizer.generator = _optimizer(1e-3, b1=0.9, b2=0.999)
        c.train.update(steps=2000, log_every=100, eval_every=1000, checkpoint_every=500)
    if variant == "fashion_mnist_lr8":
        c.model.update(ch_mult=(1, 2))
        c.train.update(steps=2000)
    if variant in ("tiny", "tiny_lr"):
        c.input.update(
            dataset="synthetic",
            train_split="train",
            eval_split="test",
            resolution=16,
            channels=1,
            resize="none",
            random_flip=False,
            batch_size=8,
            eval_batch_size=8,
            synthetic_size=64,
        )
        c.model.update(
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),
            z_channels=8,
            num_groups=4,
            dtype="float32",
        )
        c.quantizer.update(kind="ema", codebook_size=32, embed_dim=8)
        c.quantizer.ema.update(dead_code_threshold=0.5)
        c.optimizer.generator = _optimizer(1e-3, b1=0.9, b2=0.99)
        c.train.update(
            steps=4,
            log_every=2,
            eval_every=4,
            checkpoint_every=2,
            eval_batches=2,
            num_sample_images=4,
        )
    if variant == "tiny_lr":
        c.input.update(resolution=4, downsample=4)
        c.model.update(attn_resolutions=())
    c.lock()
    return c
