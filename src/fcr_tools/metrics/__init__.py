"""Evaluation of FCR models: response prediction, latent structure and identifiability."""

from ._independence import conditional_hsic
from ._latent import block_r2, cluster_scores, mean_corr_coef
from ._response import energy_distance, response_scores, score_heldout_groups, top_degs

__all__ = [
    "block_r2",
    "cluster_scores",
    "conditional_hsic",
    "energy_distance",
    "mean_corr_coef",
    "response_scores",
    "score_heldout_groups",
    "top_degs",
]
