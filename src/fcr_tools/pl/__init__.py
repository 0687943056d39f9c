"""Plots of FCR results (matplotlib; functions return the figure)."""

from ._latents import block_umap, latent_umaps

__all__ = ["block_umap", "latent_umaps"]
