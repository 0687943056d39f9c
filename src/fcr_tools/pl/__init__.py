"""Plots of FCR results (matplotlib, scanpy style: ``save=`` / ``show=``, return the figure)."""

from ._history import history
from ._interaction import interaction_heatmap
from ._latents import block_umap, latent_umaps
from ._response import predicted_vs_true

__all__ = ["block_umap", "history", "interaction_heatmap", "latent_umaps", "predicted_vs_true"]
