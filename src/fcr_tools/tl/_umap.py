"""UMAP coordinates of each FCR latent block, computed into ``adata.obsm``."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scanpy as sc

from .._constants import LATENT_BLOCKS
from .._validation import as_key_list


def umap_key(prefix: str, block: str) -> str:
    """Key of the UMAP of ``obsm[f"{prefix}_{block}"]``: ``"X_fcr_tx"`` -> ``"X_umap_fcr_tx"``."""
    name = prefix.removeprefix("X_")
    return f"X_umap_{name}_{block}"


def block_umap(
    adata: ad.AnnData,
    blocks: str | Sequence[str] = LATENT_BLOCKS,
    prefix: str = "X_fcr",
    n_neighbors: int = 15,
    random_state: int = 0,
    copy: bool = False,
) -> ad.AnnData | None:
    """UMAP of each latent block, written to ``adata.obsm["X_umap_fcr_<block>"]``.

    For each block, a kNN graph of ``adata.obsm[f"{prefix}_{block}"]`` (written by
    :meth:`~fcr_tools.FCRModel.write_latents`) and its UMAP are computed on a scratch copy
    of the embedding, so the neighbours graph, ``obsm["X_umap"]`` and ``uns`` of ``adata``
    are left alone; only the coordinates are stored. Plot them with
    :func:`fcr_tools.pl.latent_umaps` or :func:`fcr_tools.pl.block_umap`, or with
    ``sc.pl.embedding(adata, basis="X_umap_fcr_tx")``.

    Parameters
    ----------
    adata
        Cells with the latents in ``obsm``.
    blocks
        Block(s) to embed: ``"x"``, ``"t"`` and/or ``"tx"``.
    prefix
        Prefix of the obsm keys of the latents (``write_latents``' ``prefix``). The UMAP of
        ``obsm["X_fcr_tx"]`` is stored under ``"X_umap_fcr_tx"``; with ``prefix="X_mine"``
        under ``"X_umap_mine_tx"``.
    n_neighbors
        Neighbourhood size of the kNN graph (at most the number of cells - 1).
    random_state
        Seed of the UMAP.
    copy
        Return a copy of ``adata`` with the coordinates instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` the copy. Sets ``obsm["X_umap_fcr_<block>"]``:
    ``(n_cells, 2)`` float32 coordinates for each block.

    Examples
    --------
    >>> import numpy as np
    >>> import anndata as ad
    >>> import fcr_tools
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(obsm={"X_fcr_tx": rng.normal(size=(60, 4))})
    >>> fcr_tools.tl.block_umap(adata, blocks="tx")
    >>> adata.obsm["X_umap_fcr_tx"].shape
    (60, 2)
    """
    blocks = as_key_list(blocks)
    if not blocks:
        raise ValueError("`blocks` is empty: name at least one latent block.")
    for block in blocks:
        key = f"{prefix}_{block}"
        if key not in adata.obsm:
            raise KeyError(f"obsm[{key!r}] not found; run model.write_latents(adata) first.")
    if adata.n_obs < 2:
        raise ValueError(f"A UMAP needs at least 2 cells, got {adata.n_obs}.")
    coords = {
        umap_key(prefix, block): _umap(adata.obsm[f"{prefix}_{block}"], n_neighbors, random_state)
        for block in blocks
    }
    if copy:
        adata = adata.copy()
    for key, value in coords.items():
        adata.obsm[key] = value
    return adata if copy else None


def _umap(rep, n_neighbors: int, random_state: int) -> np.ndarray:
    """UMAP coordinates of one embedding, computed in a scratch AnnData."""
    rep = np.asarray(rep, dtype=np.float32)
    tmp = ad.AnnData(X=np.zeros((rep.shape[0], 0), dtype=np.float32), obsm={"rep": rep})
    sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=min(n_neighbors, tmp.n_obs - 1))
    sc.tl.umap(tmp, random_state=random_state)
    return np.asarray(tmp.obsm["X_umap"], dtype=np.float32)
