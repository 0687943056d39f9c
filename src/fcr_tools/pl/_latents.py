"""UMAPs of the three FCR latent blocks."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc

from .._constants import LATENT_BLOCKS
from .._validation import as_key_list

BLOCK_TITLES = {"x": "z_x (covariates)", "t": "z_t (treatment)", "tx": "z_tx (interaction)"}


def block_umap(
    adata: ad.AnnData, use_rep: str, n_neighbors: int = 15, random_state: int = 0
) -> np.ndarray:
    """UMAP coordinates of one embedding, computed without modifying ``adata``.

    Parameters
    ----------
    adata
        Cells with the embedding in ``obsm``.
    use_rep
        The obsm key of the embedding, e.g. ``"X_fcr_tx"``.
    n_neighbors
        Neighbourhood size of the kNN graph.
    random_state
        Seed of the UMAP.

    Returns
    -------
    Array ``(n_cells, 2)`` of UMAP coordinates.

    Examples
    --------
    >>> import numpy as np
    >>> import anndata as ad
    >>> import fcr_tools
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(obsm={"X_fcr_tx": rng.normal(size=(60, 4))})
    >>> fcr_tools.pl.block_umap(adata, "X_fcr_tx").shape
    (60, 2)
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"obsm[{use_rep!r}] not found; run model.write_latents(adata) first.")
    rep = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    tmp = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"rep": rep})
    tmp.X = np.zeros((tmp.n_obs, 0), dtype=np.float32)
    sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=min(n_neighbors, tmp.n_obs - 1))
    sc.tl.umap(tmp, random_state=random_state)
    return tmp.obsm["X_umap"]


def latent_umaps(
    adata: ad.AnnData,
    color: str | Sequence[str] = ("cell_line", "drug"),
    prefix: str = "X_fcr",
    blocks: Sequence[str] = LATENT_BLOCKS,
    save: str | None = None,
    show: bool | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
):
    """UMAP of each latent block (columns) coloured by each obs column (rows).

    The UMAPs are computed on the fly from ``adata.obsm[f"{prefix}_{block}"]`` (written by
    :meth:`~fcr_tools.FCRModel.write_latents`); ``adata`` itself is not modified.

    Parameters
    ----------
    adata
        Cells with the latents in obsm.
    color
        Categorical obs column(s) to colour by.
    prefix
        Prefix of the obsm keys.
    blocks
        Blocks to show.
    save
        File to save the figure to (any matplotlib format).
    show
        Show the figure (default: when not saving).
    n_neighbors, random_state
        Neighbourhood size and seed of the UMAP.

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> fig = fcr_tools.pl.latent_umaps(adata, color=["cell_line", "drug"])  # doctest: +SKIP
    """
    colors = as_key_list(color)
    for key in colors:
        if key not in adata.obs:
            raise KeyError(f"color={key!r}: column not found in adata.obs.")
    fig, axes = plt.subplots(
        len(colors), len(blocks), figsize=(4.2 * len(blocks), 3.8 * len(colors)), squeeze=False
    )
    for j, block in enumerate(blocks):
        coords = block_umap(adata, f"{prefix}_{block}", n_neighbors, random_state)
        for i, key in enumerate(colors):
            ax = axes[i, j]
            labels = adata.obs[key].astype("category")
            palette = plt.get_cmap("tab20" if len(labels.cat.categories) > 10 else "tab10")
            for code, name in enumerate(labels.cat.categories):
                mask = (labels.cat.codes == code).to_numpy()
                ax.scatter(
                    coords[mask, 0], coords[mask, 1], s=4, color=palette(code % 20), label=name
                )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{BLOCK_TITLES.get(block, block)}\ncoloured by {key}", fontsize=10)
            if j == len(blocks) - 1:
                ax.legend(
                    loc="center left",
                    bbox_to_anchor=(1, 0.5),
                    fontsize=7,
                    markerscale=2,
                    frameon=False,
                )
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show or (show is None and not save):
        plt.show()
    return fig
