"""Scores of learned latent blocks against ground truth (simulations)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def mean_corr_coef(learned: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute Pearson correlation after matching components one to one (MCC).

    The standard score of component-wise identifiability: each true component is matched to
    a distinct learned component by the Hungarian algorithm on absolute correlations. With
    more learned than true components, the best-matching subset is used.

    Parameters
    ----------
    learned
        Learned latents ``(n_cells, d_learned)`` with ``d_learned >= d_true``.
    true
        True latents ``(n_cells, d_true)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 3))
    >>> round(mean_corr_coef(-2 * z[:, ::-1] + 1, z), 6)
    1.0
    """
    learned, true = np.asarray(learned, dtype=float), np.asarray(true, dtype=float)
    if learned.shape[0] != true.shape[0]:
        raise ValueError("learned and true must have the same number of cells.")
    if learned.shape[1] < true.shape[1]:
        raise ValueError(
            f"learned has {learned.shape[1]} components, fewer than the {true.shape[1]} true."
        )
    d = true.shape[1]
    corr = np.corrcoef(true.T, learned.T)[:d, d:]
    corr = np.abs(np.nan_to_num(corr))
    rows, cols = linear_sum_assignment(-corr)
    return float(corr[rows, cols].mean())
