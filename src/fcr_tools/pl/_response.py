"""Predicted vs true responses of held-out groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..metrics import response_scores, top_degs
from ._utils import finish, matrix


def _gene_names(values, n_genes: int, gene_names) -> np.ndarray:
    if gene_names is not None:
        names = np.asarray(list(gene_names), dtype=object)
    elif hasattr(values, "var_names"):
        names = np.asarray(values.var_names, dtype=object)
    else:
        names = np.array([f"gene_{g}" for g in range(n_genes)], dtype=object)
    if names.size != n_genes:
        raise ValueError(f"gene_names has {names.size} names for {n_genes} genes.")
    return names


def _panel(ax, predicted, true, control, names, n_degs, label_degs, title, layer, delta):
    pred, obs, ctrl = matrix(predicted, layer), matrix(true, layer), matrix(control, layer)
    if not pred.shape[1] == obs.shape[1] == ctrl.shape[1]:
        raise ValueError(
            f"predicted, true and control have {pred.shape[1]}, {obs.shape[1]} and "
            f"{ctrl.shape[1]} genes; they must have the same genes."
        )
    pred_mean, true_mean = pred.mean(0), obs.mean(0)
    if delta:
        pred_mean, true_mean = pred_mean - ctrl.mean(0), true_mean - ctrl.mean(0)
    degs = top_degs(obs, ctrl, n_degs) if n_degs > 0 else np.array([], dtype=int)
    others = np.setdiff1d(np.arange(obs.shape[1]), degs)
    ax.scatter(true_mean[others], pred_mean[others], s=8, color="0.65", label="other genes")
    if degs.size:
        ax.scatter(
            true_mean[degs], pred_mean[degs], s=16, color="tab:red", label=f"top {degs.size} DEGs"
        )
        for g in degs[:label_degs]:
            ax.annotate(
                str(names[g]),
                (true_mean[g], pred_mean[g]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    low = float(min(true_mean.min(), pred_mean.min()))
    high = float(max(true_mean.max(), pred_mean.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, linestyle="--")
    k = [min(n_degs, obs.shape[1])] if n_degs > 0 else []
    scores = response_scores(pred, obs, ctrl, top_k=k)
    if delta:
        text = f"R2 of the change {scores['r2_delta']:.2f}"
    else:
        text = f"R2 all genes {scores['r2_all']:.2f}"
        if k:
            text += f"\nR2 top-{k[0]} DEGs {scores[f'r2_deg{k[0]}']:.2f}"
    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=8)
    what = "change from control" if delta else "mean expression"
    ax.set_xlabel(f"true {what}")
    ax.set_ylabel(f"predicted {what}")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7, frameon=False)


def predicted_vs_true(
    predicted,
    true,
    control,
    n_degs: int = 20,
    label_degs: int = 3,
    delta: bool = False,
    gene_names: Sequence[str] | None = None,
    layer: str | None = None,
    title: str | None = None,
    ncols: int = 3,
    save: str | None = None,
    show: bool | None = None,
):
    """Predicted vs true mean expression of held-out groups, with the top DEGs highlighted.

    One panel per group: each dot is a gene, at its true mean expression (x) and predicted
    mean expression (y), or at their changes from the controls (``delta=True``). The
    ``n_degs`` genes most differentially expressed between the true cells and the controls
    (Welch t-test, as in :func:`fcr_tools.metrics.response_scores`) are red, and the first
    ``label_degs`` of them named. Each panel reports the R2 over all genes and over the DEGs
    (with ``delta=True``, the R2 of the change).

    Parameters
    ----------
    predicted
        Predicted cells of one group (an AnnData such as the output of
        :meth:`~fcr_tools.FCRModel.predict_counterfactual`, or an array cells x genes), or a
        dict ``{group name: predicted cells}`` for one panel per group.
    true
        The true cells of the group(s), in the same form (a dict with the same keys).
    control
        The control cells of the group's context(s), in the same form.
    n_degs
        Number of DEGs to highlight (0: none).
    label_degs
        Number of DEGs whose names are written.
    delta
        Plot the change from the control mean (true and predicted) instead of the mean
        expression, and report the R2 of the change.
    gene_names
        Gene names (default: the ``var_names`` of ``true``, else ``gene_0``...).
    layer
        Layer of the AnnData inputs to use (default ``X``).
    title
        Title of a single panel (with dicts, the group names are the titles).
    ncols
        Panels per row.
    save
        File to save the figure to (any matplotlib format).
    show
        Show the figure (default: when not saving).

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import numpy as np
    >>> import fcr_tools
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(40, 30))
    >>> true = control + np.r_[np.full(5, 2.0), np.zeros(25)]
    >>> predicted = true + rng.normal(scale=0.1, size=true.shape)
    >>> fig = fcr_tools.pl.predicted_vs_true(predicted, true, control, n_degs=5, show=False)
    >>> len(fig.axes)
    1
    """
    if isinstance(predicted, Mapping):
        if not isinstance(true, Mapping) or not isinstance(control, Mapping):
            raise TypeError("With a dict of predictions, true and control must be dicts too.")
        missing = [k for k in predicted if k not in true or k not in control]
        if missing:
            raise KeyError(f"Groups {missing} have no true or control cells.")
        groups = [(str(k), predicted[k], true[k], control[k]) for k in predicted]
    else:
        groups = [(title, predicted, true, control)]
    if not groups:
        raise ValueError("No group to plot.")
    ncols = max(1, min(ncols, len(groups)))
    nrows = int(np.ceil(len(groups) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax, (name, pred, obs, ctrl) in zip(axes.flat, groups, strict=False):
        n_genes = matrix(obs, layer).shape[1]
        names = _gene_names(obs, n_genes, gene_names)
        _panel(ax, pred, obs, ctrl, names, n_degs, label_degs, name, layer, delta)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return finish(fig, save, show)
