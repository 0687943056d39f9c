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


def block_r2(
    learned: np.ndarray,
    true: np.ndarray,
    test_size: float = 0.3,
    n_neighbors: int = 15,
    seed: int = 0,
) -> float:
    """How well a learned block predicts a true block: nonlinear regression R2 on held-out cells.

    A k-nearest-neighbour regressor (on the standardised learned block) is fitted on a random
    part of the cells and scored on the others (R2 averaged over the true components,
    weighted by their variance). Block-wise identifiability means the learned block predicts
    its true block well (R2 near 1); *leakage* is the same score from a learned block to
    another true block (e.g. true z_t from learned z_x), which should be near 0.

    Parameters
    ----------
    learned
        Learned latents ``(n_cells, d)``.
    true
        True latents ``(n_cells, d_true)``.
    test_size
        Fraction of cells held out for scoring.
    n_neighbors
        Neighbours of the regressor.
    seed
        Seed of the train / test split.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(1000, 2))
    >>> block_r2(np.tanh(z) * 3, z) > 0.9, block_r2(rng.normal(size=(1000, 2)), z) < 0.1
    (True, True)
    """
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    learned, true = np.asarray(learned, dtype=float), np.asarray(true, dtype=float)
    if learned.shape[0] != true.shape[0]:
        raise ValueError("learned and true must have the same number of cells.")
    x_train, x_test, y_train, y_test = train_test_split(
        learned, true, test_size=test_size, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)
    reg = KNeighborsRegressor(n_neighbors=n_neighbors).fit(scaler.transform(x_train), y_train)
    pred = reg.predict(scaler.transform(x_test))
    from sklearn.metrics import r2_score

    return float(r2_score(y_test, pred, multioutput="variance_weighted"))


def cluster_scores(
    latent: np.ndarray,
    labels: np.ndarray,
    method: str = "kmeans",
    resolution: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Agreement of clusters of a latent block with known labels: NMI, ARI and silhouette.

    Parameters
    ----------
    latent
        Latent block ``(n_cells, d)``.
    labels
        One label per cell (covariate, treatment, dose, or their combination).
    method
        ``"kmeans"`` (as many clusters as labels) or ``"leiden"`` (scanpy's Leiden on a
        15-neighbour graph; needs ``igraph``).
    resolution
        Leiden resolution.
    seed
        Random seed of the clustering.

    Returns
    -------
    ``nmi`` and ``ari`` of the clusters vs the labels, and ``silhouette`` of the labels in the
    latent space (Euclidean distance, in [-1, 1]; on at most 5,000 cells).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat(["a", "b", "c"], 100)
    >>> latent = rng.normal(size=(300, 2)) + 8 * (labels[:, None] == ["a", "b"])
    >>> round(cluster_scores(latent, labels)["nmi"], 2)
    1.0
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    latent = np.asarray(latent, dtype=float)
    labels = np.asarray(labels).astype(str)
    n_labels = len(np.unique(labels))
    if method == "kmeans":
        clusters = KMeans(n_clusters=n_labels, n_init=10, random_state=seed).fit_predict(latent)
    elif method == "leiden":
        import anndata as ad
        import scanpy as sc

        tmp = ad.AnnData(np.zeros((latent.shape[0], 0), dtype=np.float32))
        tmp.obsm["rep"] = latent.astype(np.float32)
        sc.pp.neighbors(tmp, use_rep="rep", random_state=seed)
        sc.tl.leiden(
            tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2
        )
        clusters = tmp.obs["leiden"].to_numpy()
    else:
        raise ValueError(f"method must be 'kmeans' or 'leiden', not {method!r}.")
    rng = np.random.default_rng(seed)
    sub = rng.choice(len(labels), size=min(len(labels), 5000), replace=False)
    silhouette = (
        float(silhouette_score(latent[sub], labels[sub])) if n_labels > 1 else float("nan")
    )
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "silhouette": silhouette,
    }
