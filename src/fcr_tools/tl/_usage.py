"""Which latent dimensions a trained FCR model uses: KL of each posterior from its prior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._constants import LATENT_BLOCKS
from .._module import gaussian_kl_per_dim

if TYPE_CHECKING:
    import anndata as ad

    from .._model import FCRModel


@torch.inference_mode()
def latent_usage(
    model: FCRModel,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    active_threshold: float = 0.1,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """KL divergence of each latent dimension's posterior from its conditional prior.

    A dimension whose posterior equals its prior for every cell (KL near 0) carries no
    information about the cell beyond its condition: it has *collapsed*. The block
    ``"tx"`` with all dimensions collapsed means the model explains the cells of each
    (covariate, treatment) condition without cell-to-cell interaction variation, and
    ``z_tx`` then only encodes the condition's prior mean.

    Parameters
    ----------
    model
        A trained :class:`~fcr_tools.FCRModel`.
    adata
        Cells to use (default: the training data), set up like the training data.
    indices
        Cells to use (default all).
    active_threshold
        KL (nats, mean over cells) above which a dimension counts as active.
    batch_size
        Cells per minibatch (default 1,024).

    Returns
    -------
    DataFrame with one row per dimension: ``block`` (``"x"``, ``"t"``, ``"tx"``), ``dim``
    (index within the block), ``kl`` (mean over cells, nats) and ``active``.

    Examples
    --------
    >>> import fcr_tools
    >>> usage = fcr_tools.tl.latent_usage(model)
    >>> active = usage.groupby("block", sort=False)["active"].sum()  # active dims per block
    >>> active.index.tolist(), len(usage) == sum(model.module.n_latent.values())
    (['x', 't', 'tx'], True)
    """
    if not np.isfinite(active_threshold) or active_threshold < 0:
        raise ValueError(f"active_threshold must be a finite number >= 0, not {active_threshold}.")
    sums = {b: 0.0 for b in LATENT_BLOCKS}
    n_cells = 0
    for out in model.inference_batches(adata, indices, batch_size):
        for b in LATENT_BLOCKS:
            q, p = out[f"qz_{b}"], out[f"pz_{b}"]
            kl = gaussian_kl_per_dim(q.loc, q.scale**2, p.loc, p.scale**2)
            sums[b] = sums[b] + kl.sum(0).double().cpu()
        n_cells += len(out["indices"])
    rows = []
    for b in LATENT_BLOCKS:
        kl = (sums[b] / n_cells).numpy()
        rows += [{"block": b, "dim": i, "kl": float(v)} for i, v in enumerate(kl)]
    table = pd.DataFrame(rows)
    table["active"] = table["kl"] > active_threshold
    return table
