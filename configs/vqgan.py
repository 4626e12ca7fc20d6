"""VQGAN tokenizer recipes (Esser et al. 2021): the VQ-VAE recipe plus a PatchGAN discriminator.

Usage: `python train.py --config=configs/vqgan.py[:VARIANT] --workdir=W`, VARIANT as in
configs/vqvae.py (default | fashion_mnist | tiny), or `fashion_mnist_fm`. The default is
taming-transformers' f16 ImageNet-256 design with LPIPS. `fashion_mnist` also trains with LPIPS
(it beats its VQ-VAE ablation on rFID and LPIPS; README "rFID and LPIPS"); `fashion_mnist_fm`
replaces LPIPS by discriminator feature matching, which needs no pretrained weights but loses to
the VQ-VAE there. LPIPS reads `loss.lpips_weights`, by default ~/.cache/vq_jax/lpips_vgg16.npz
(or $VQ_JAX_LPIPS_WEIGHTS), made by scripts/convert_lpips.py.
"""

import ml_collections as mlc

from configs import vqvae

VARIANTS = (*vqvae.VARIANTS, "fashion_mnist_fm")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Returns the VQGAN config for the named variant."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r} for configs/vqgan.py; use one of {VARIANTS}."
        )
    c = vqvae.get_config("fashion_mnist" if variant == "fashion_mnist_fm" else arg)
    c.unlock()

    c.discriminator = mlc.ConfigDict(dict(ndf=64, n_layers=3, norm="group", num_groups=32))
    c.loss.update(
        dict(
            perceptual_weight=1.0,  # LPIPS (VGG16); needs loss.lpips_weights
            # a .npz made by scripts/convert_lpips.py; "" means $VQ_JAX_LPIPS_WEIGHTS or
            # ~/.cache/vq_jax/lpips_vgg16.npz
            lpips_weights="",
            adversarial="hinge",  # hinge | non_saturating | vanilla
            disc_weight=0.8,  # multiplies the adaptive weight
            adaptive_weight=True,
            feature_matching_weight=0.0,
            r1_weight=0.0,
            lecam_weight=0.0,
            lecam_decay=0.999,
        )
    )
    # Step at which the generator's adversarial term switches on; the discriminator may start
    # training earlier (taming#44). disc_train_start=-1 means "the same as disc_start". (Not an
    # ml_collections FieldReference: overriding one linked field would silently move the other.)
    c.loss.disc_start = 250_001
    c.loss.disc_train_start = -1
    c.optimizer.discriminator = c.optimizer.generator.copy_and_resolve_references()

    if variant in ("fashion_mnist", "fashion_mnist_fm"):
        c.discriminator.update(ndf=32, n_layers=2, num_groups=8)
        c.loss.update(perceptual_weight=1.0, feature_matching_weight=0.0, disc_weight=0.5)
        c.loss.disc_start = 500
        if variant == "fashion_mnist_fm":  # the weight-free ablation: feature matching, no LPIPS
            c.loss.update(perceptual_weight=0.0, feature_matching_weight=1.0)
    elif variant == "tiny":
        c.discriminator.update(ndf=8, n_layers=2, num_groups=4)
        c.loss.update(
            perceptual_weight=0.0, feature_matching_weight=1.0, r1_weight=0.1, lecam_weight=0.1
        )
        c.loss.disc_start = 1
    c.lock()
    return c
