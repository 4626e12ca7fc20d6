"""Flax (Linen) networks: autoencoder, quantizers, discriminator, VQModel."""
