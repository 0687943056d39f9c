"""Scores of predicted responses to treatments, as used in the perturbation-modelling field."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse, stats
from scipy.spatial.distance import cdist
from sklearn.metrics import r2_score

from .._validation import as_key_list


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float64)


def top_degs(treated: np.ndarray, control: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` genes most differentially expressed between two groups of cells.

    Genes are ranked by the absolute Welch t statistic (treated vs control); genes constant
    in both groups rank last.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(50, 5))
    >>> treated = control + np.array([0, 0, 3, 0, 0])
    >>> int(top_degs(treated, control, 1)[0])
    2
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        t, _ = stats.ttest_ind(treated, control, axis=0, equal_var=False)
    score = np.nan_to_num(np.abs(t), nan=-1.0)
    return np.argsort(-score, kind="stable")[:k]


def energy_distance(
    predicted: np.ndarray, true: np.ndarray, max_cells: int = 500, seed: int = 0
) -> float:
    """Energy distance between two sets of cells (0 when their distributions are equal).

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with Euclidean distances in gene space, on at most
    ``max_cells`` random cells of each set. Unlike R2 of means, it also sees whether the
    predicted cells spread like the true ones.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 5))
    >>> energy_distance(x, rng.normal(size=(300, 5))) < energy_distance(x, x + 1)
    True
    """
    rng = np.random.default_rng(seed)
    predicted, true = _dense(predicted), _dense(true)
    if len(predicted) > max_cells:
        predicted = predicted[rng.choice(len(predicted), max_cells, replace=False)]
    if len(true) > max_cells:
        true = true[rng.choice(len(true), max_cells, replace=False)]
    cross = cdist(predicted, true).mean()
    return float(2 * cross - cdist(predicted, predicted).mean() - cdist(true, true).mean())


def response_scores(
    predicted: np.ndarray,
    true: np.ndarray,
    control: np.ndarray,
    top_k: Sequence[int] = (20, 50),
) -> dict[str, float]:
    """Scores of one predicted group of cells against the true group.

    Parameters
    ----------
    predicted
        Predicted cells ``(n_pred, n_genes)`` (only their mean is used).
    true
        True cells of the group ``(n_true, n_genes)``.
    control
        Control cells of the same context ``(n_control, n_genes)``.
    top_k
        Sizes of the DEG sets (DEGs of the true group vs the controls, Welch t-test).

    Returns
    -------
    ``r2_all`` (R2 of mean expression over all genes), ``r2_deg{k}`` (over the top-k DEGs),
    ``r2_delta`` (R2 of the change from the control mean, all genes), ``pearson_delta_deg20``
    (Pearson correlation of the change on the top-20 DEGs) and ``energy_distance`` (between
    the predicted and true cells, all genes).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(40, 30))
    >>> true = control + rng.normal(size=30)
    >>> scores = response_scores(true, true, control)
    >>> round(scores["r2_all"], 6), round(scores["r2_deg20"], 6)
    (1.0, 1.0)
    """
    predicted, true, control = _dense(predicted), _dense(true), _dense(control)
    pred_mean, true_mean, ctrl_mean = predicted.mean(0), true.mean(0), control.mean(0)
    scores = {
        "r2_all": r2_score(true_mean, pred_mean),
        "r2_delta": r2_score(true_mean - ctrl_mean, pred_mean - ctrl_mean),
    }
    degs = top_degs(true, control, max(max(top_k, default=0), 20))
    for k in top_k:
        scores[f"r2_deg{k}"] = r2_score(true_mean[degs[:k]], pred_mean[degs[:k]])
    d20 = degs[:20]
    delta_true, delta_pred = true_mean[d20] - ctrl_mean[d20], pred_mean[d20] - ctrl_mean[d20]
    if np.std(delta_true) > 0 and np.std(delta_pred) > 0:
        scores["pearson_delta_deg20"] = float(np.corrcoef(delta_true, delta_pred)[0, 1])
    else:
        scores["pearson_delta_deg20"] = float("nan")
    scores["energy_distance"] = energy_distance(predicted, true)
    return {k: float(v) for k, v in scores.items()}


Truth = Callable[[ad.AnnData, str, object], np.ndarray]


def score_heldout_groups(
    predictors: Mapping[str, object],
    adata: ad.AnnData,
    treatment_key: str,
    covariate_keys: str | Sequence[str],
    dose_key: str | None = None,
    control_treatment: str = "control",
    split_key: str = "split",
    heldout_value: str = "holdout",
    min_cells: int = 30,
    top_k: Sequence[int] = (20, 50),
    layer: str | None = None,
    truth: Truth | None = None,
) -> pd.DataFrame:
    """Score predictions of held-out (covariate, treatment, dose) groups, one row per group.

    For each held-out group with at least ``min_cells`` cells, every predictor transforms the
    control cells of the group's covariates (those outside the held-out split) into the
    group's treatment and dose, and is scored with :func:`response_scores` against the true
    cells.

    Parameters
    ----------
    predictors
        Name -> object with ``predict_counterfactual(adata, treatment=..., dose=...)``
        returning an AnnData (an :class:`~fcr_tools.FCRModel` or a baseline from
        :mod:`fcr_tools.baselines`).
    adata
        All cells (training and held-out), with expression on the predictors' scale.
    treatment_key, covariate_keys, dose_key, control_treatment
        The obs columns and control label, as given to ``setup_anndata``.
    split_key, heldout_value
        Cells with ``obs[split_key] == heldout_value`` form the held-out groups.
    min_cells
        Smallest group scored.
    top_k
        DEG set sizes.
    layer
        Layer with the true expression (``None``: ``X``).
    truth
        Optional ``truth(controls, treatment, dose) -> cells x genes`` giving the true
        cells instead of the observed held-out cells (e.g. the exact counterfactual of a
        simulation).

    Returns
    -------
    Tidy DataFrame: the group's covariates, treatment, dose, ``n_cells``, ``method`` and the
    scores.

    Examples
    --------
    >>> from fcr_tools.metrics import score_heldout_groups
    >>> table = score_heldout_groups(
    ...     {"FCR": model}, adata, "drug", "cell_line", dose_key="dose", min_cells=10
    ... )
    >>> table[["cell_line", "drug", "method"]].drop_duplicates().to_numpy().tolist()
    [['cell_line_0', 'drug_0', 'FCR']]
    >>> table["dose"].tolist()  # one row per held-out dose
    [0.3, 1.0]
    """
    covariates = as_key_list(covariate_keys)
    obs = adata.obs
    if split_key not in obs:
        raise KeyError(f"split_key={split_key!r} not found in adata.obs.")
    heldout = (obs[split_key].astype(str) == str(heldout_value)).to_numpy()
    if not heldout.any():
        raise ValueError(f"No cells with obs[{split_key!r}] == {heldout_value!r}.")
    group_keys = [*covariates, treatment_key] + ([dose_key] if dose_key else [])
    is_control = (obs[treatment_key].astype(str) == control_treatment).to_numpy()
    rows = []
    for key, index in obs[heldout].groupby(group_keys, observed=True).groups.items():
        key = key if isinstance(key, tuple) else (key,)
        values = dict(zip(group_keys, key, strict=True))
        if values[treatment_key] == control_treatment or len(index) < min_cells:
            continue
        same_context = np.ones(adata.n_obs, dtype=bool)
        for c in covariates:
            same_context &= (obs[c] == values[c]).to_numpy()
        controls = adata[same_context & is_control & ~heldout].copy()
        if controls.n_obs == 0:
            continue
        control_x = controls.layers[layer] if layer else controls.X
        dose = values.get(dose_key) if dose_key else None
        if truth is None:
            group = adata[index]
            true_x = group.layers[layer] if layer else group.X
        else:
            true_x = truth(controls, values[treatment_key], dose)
        for name, predictor in predictors.items():
            pred = predictor.predict_counterfactual(
                controls, treatment=values[treatment_key], dose=dose
            )
            scores = response_scores(pred.X, true_x, control_x, top_k)
            rows.append({**values, "n_cells": len(index), "method": name, **scores})
    if not rows:
        raise ValueError(f"No held-out treated group has at least min_cells={min_cells} cells.")
    return pd.DataFrame(rows)
