"""Heatmap of the interaction strength per (context, treatment)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._utils import finish

_LABELS = {
    "strength": "interaction strength (RMS over genes)",
    "specificity": "context-specific part (RMS over genes)",
    "effect": "response (RMS over genes)",
    "fraction": "context-specific fraction of the response",
    "latent_strength": "interaction strength in z_tx",
}


def interaction_heatmap(
    effects,
    value: str = "strength",
    contexts: Sequence[str] | None = None,
    treatments: Sequence[str] | None = None,
    sort: bool = True,
    annotate: bool | None = None,
    cmap: str = "viridis",
    ax=None,
    save: str | None = None,
    show: bool | None = None,
    **kwargs,
):
    """Heatmap of how context-specific each treatment's response is (contexts x treatments).

    Each cell is one (context, treatment) pair of :func:`fcr_tools.tl.interaction_effects`:
    by default its ``strength``, the change of the predicted expression caused by the
    interaction block z_tx. Bright columns are treatments that act differently in different
    contexts; a bright cell is a context in which a treatment does something specific.

    Parameters
    ----------
    effects
        The DataFrame of :func:`~fcr_tools.tl.interaction_effects`, or a trained
        :class:`~fcr_tools.FCRModel` (then ``interaction_effects(model, **kwargs)`` is run).
    value
        Column to show: ``"strength"``, ``"latent_strength"``, ``"effect"`` or
        ``"fraction"``.
    contexts, treatments
        Rows and columns to show, in this order (default all).
    sort
        Order treatments (columns) and contexts (rows) by decreasing mean value (ignored for
        those given explicitly).
    annotate
        Write the values in the cells (default: when the grid has at most 15 x 15 cells).
    cmap
        Matplotlib colormap.
    ax
        Axes to draw into (default: a new figure).
    save
        File to save the figure to (any matplotlib format).
    show
        Show the figure (default: when not saving).
    **kwargs
        Passed to :func:`~fcr_tools.tl.interaction_effects` when ``effects`` is a model.

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import pandas as pd
    >>> import fcr_tools
    >>> effects = pd.DataFrame(
    ...     {
    ...         "context": ["A549", "A549", "K562", "K562"],
    ...         "treatment": ["drugA", "drugB", "drugA", "drugB"],
    ...         "strength": [0.1, 0.8, 0.2, 0.1],
    ...     }
    ... )
    >>> fig = fcr_tools.pl.interaction_heatmap(effects, show=False)
    >>> fig.axes[0].get_xlabel()
    'treatment'
    """
    if not isinstance(effects, pd.DataFrame):
        from ..tl import interaction_effects

        effects = interaction_effects(effects, **kwargs)
    elif kwargs:
        raise TypeError(f"Unexpected arguments {sorted(kwargs)} with a DataFrame of effects.")
    for column in ("context", "treatment", value):
        if column not in effects.columns:
            raise KeyError(
                f"Column {column!r} not found in effects ({list(effects.columns)}); pass the "
                "output of fcr_tools.tl.interaction_effects."
            )
    grid = effects.pivot_table(index="context", columns="treatment", values=value, aggfunc="mean")
    if sort:
        if treatments is None:
            grid = grid[grid.mean(0).sort_values(ascending=False).index]
        if contexts is None:
            grid = grid.loc[grid.mean(1).sort_values(ascending=False).index]
    for name, wanted, axis in (("contexts", contexts, 0), ("treatments", treatments, 1)):
        if wanted is None:
            continue
        labels = grid.index if axis == 0 else grid.columns
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise KeyError(f"{name} {missing} not found in the effects.")
        grid = grid.loc[list(wanted)] if axis == 0 else grid[list(wanted)]
    if grid.empty:
        raise ValueError("Nothing to plot.")
    n_rows, n_cols = grid.shape
    if ax is None:
        fig, ax = plt.subplots(
            figsize=(min(2.0 + 0.55 * n_cols, 24), min(1.5 + 0.45 * n_rows, 24))
        )
    else:
        fig = ax.figure
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in grid.columns], rotation=90)
    ax.set_yticks(range(n_rows), [str(r) for r in grid.index])
    ax.set_xlabel("treatment")
    ax.set_ylabel("context")
    if annotate if annotate is not None else (n_rows <= 15 and n_cols <= 15):
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(values[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{values[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if values[i, j] > middle else "white",
                    )
    fig.colorbar(image, ax=ax, label=_LABELS.get(value, value), shrink=0.8)
    fig.tight_layout()
    return finish(fig, save, show)
