"""Evaluation of FCR models: response prediction and latent structure."""

from ._latent import mean_corr_coef
from ._response import response_scores, score_heldout_groups, top_degs

__all__ = ["mean_corr_coef", "response_scores", "score_heldout_groups", "top_degs"]
