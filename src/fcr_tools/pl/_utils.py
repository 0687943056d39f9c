"""Helpers shared by the plotting functions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from scipy import sparse


def finish(fig, save: str | None, show: bool | None):
    """Save and/or show a figure the scanpy way, and return it.

    ``show=None`` shows the figure unless it is saved; ``show=False`` never shows it.
    """
    if save:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show or (show is None and not save):
        plt.show()
    return fig


def matrix(values, layer: str | None = None) -> np.ndarray:
    """Dense float array of an AnnData (``X`` or ``layer``) or array-like of cells x genes."""
    if hasattr(values, "obs") and hasattr(values, "X"):
        values = values.layers[layer] if layer else values.X
    if sparse.issparse(values):
        values = values.toarray()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2:
        raise ValueError(f"Expected cells x genes, got an array of shape {values.shape}.")
    return values
