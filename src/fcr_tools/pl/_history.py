"""Training history: every term of the objective and the discriminators' accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .._objective import LOSS_TERMS
from ._utils import finish

#: terms shown by default, in this order, when the history has them: the total loss, the cells'
#: own reconstruction and KL, the value of each weighted term of the objective, and the
#: discriminators' own loss and accuracy
DEFAULT_TERMS = (
    "loss",
    "nll_cell",
    "kl_cell",
    *(term.metrics[0] for term in LOSS_TERMS if term.metrics),
    "discriminator_loss",
    "discriminator_accuracy",
)
_SPLITS = ("train", "validation")


def _series(history: Mapping, term: str) -> dict[str, pd.Series]:
    """The train / validation curves of one term (``"loss"``: the total loss)."""
    if term in history:  # a full history key, e.g. "train_loss" or "kl_cell_train"
        return {term: history[term].iloc[:, 0]}
    curves = {}
    for split in _SPLITS:
        key = f"{split}_loss" if term == "loss" else f"{term}_{split}"
        if key in history and history[key].notna().any().any():
            curves[split] = history[key].iloc[:, 0]
    return curves


def history(
    model,
    keys: str | Sequence[str] | None = None,
    ncols: int = 4,
    save: str | None = None,
    show: bool | None = None,
):
    """Training curves of each term of the FCR objective, train and validation.

    One panel per term: the total loss, the reconstruction and KL terms, the classifiers,
    the similarity and adversarial terms, the discriminators' own loss and their accuracy
    (with a line at 0.5, the accuracy of a discriminator the encoder fools completely).

    Parameters
    ----------
    model
        A trained :class:`~fcr_tools.FCRModel`, or its ``history`` (a dict of DataFrames).
    keys
        Terms to show: names such as ``"loss"``, ``"kl_cell"``, ``"discriminator_accuracy"``
        (train and validation curves), or full history keys such as ``"elbo_train"``.
        ``None``: those that the history has of ``loss``, ``nll_cell``, ``kl_cell``, the value
        of each weighted term of the objective (``aggregate_kl``, ``covariate_ce``, ...,
        ``adversarial``), ``discriminator_loss`` and ``discriminator_accuracy``.
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
    >>> import fcr_tools
    >>> model.train(max_epochs=20)  # doctest: +SKIP
    >>> fig = fcr_tools.pl.history(model, show=False)
    >>> fig = fcr_tools.pl.history(
    ...     model, keys=["loss", "discriminator_accuracy"], save="history.png"
    ... )
    >>> [ax.get_title() for ax in fig.axes if ax.get_visible()]
    ['loss', 'discriminator accuracy']
    """
    hist = model if isinstance(model, Mapping) else getattr(model, "history", None)
    if not hist:
        raise ValueError("The model has no training history: train it first.")
    if keys is None:
        terms = [t for t in DEFAULT_TERMS if _series(hist, t)]
    else:
        terms = [keys] if isinstance(keys, str) else list(keys)
        unknown = [t for t in terms if not _series(hist, t)]
        if unknown:
            raise KeyError(
                f"{unknown} not found in the history (keys: {sorted(hist)}); give a term such "
                "as 'loss' or 'kl_cell', or a full key."
            )
    if not terms:
        raise ValueError("The history has none of the FCR loss terms.")
    ncols = max(1, min(ncols, len(terms)))
    nrows = int(np.ceil(len(terms) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for label, curve in _series(hist, term).items():
            ax.plot(
                curve.index, curve.to_numpy(), label=label, marker="." if len(curve) < 5 else None
            )
        if term == "discriminator_accuracy":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(term.replace("_", " "), fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(terms) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return finish(fig, save, show)
