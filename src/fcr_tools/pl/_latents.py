"""UMAPs of the three FCR latent blocks, as computed by :func:`fcr_tools.tl.block_umap`."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np

from .._constants import LATENT_BLOCKS
from .._validation import as_key_list
from ..tl._umap import umap_key
from ._utils import finish

BLOCK_TITLES = {"x": "z_x (covariates)", "t": "z_t (treatment)", "tx": "z_tx (interaction)"}


def _stored_umaps(adata: ad.AnnData, prefix: str, blocks: list[str]) -> dict[str, np.ndarray]:
    """The stored UMAP of each block; a KeyError saying how to compute the missing ones."""
    for block in blocks:
        if block in adata.obsm or block.startswith(f"{prefix}_"):
            raise KeyError(
                f"block {block!r} is an obsm key, not a block name: name the block, e.g. 'tx'. "
                "The plots draw UMAPs computed by fcr_tools.tl.block_umap (pl.block_umap no "
                "longer computes one and returns its coordinates)."
            )
    missing = [block for block in blocks if umap_key(prefix, block) not in adata.obsm]
    if missing:
        keys = ", ".join(repr(umap_key(prefix, block)) for block in missing)
        arguments = repr(missing[0]) if len(missing) == 1 else repr(missing)
        if prefix != "X_fcr":
            arguments += f", prefix={prefix!r}"
        raise KeyError(
            f"obsm[{keys}] not found: plotting does not compute embeddings; run "
            f"fcr_tools.tl.block_umap(adata, blocks={arguments}) first."
        )
    return {block: np.asarray(adata.obsm[umap_key(prefix, block)]) for block in blocks}


def _labels(adata: ad.AnnData, color: str | Sequence[str]) -> dict:
    keys = as_key_list(color)
    for key in keys:
        if key not in adata.obs:
            raise KeyError(f"color={key!r}: column not found in adata.obs.")
    return {key: adata.obs[key].astype("category") for key in keys}


def _scatter(ax, coords: np.ndarray, labels, title: str, legend: bool) -> None:
    """One panel: cells at ``coords`` coloured by the categories of ``labels``."""
    palette = plt.get_cmap("tab20" if len(labels.cat.categories) > 10 else "tab10")
    for code, name in enumerate(labels.cat.categories):
        mask = (labels.cat.codes == code).to_numpy()
        ax.scatter(coords[mask, 0], coords[mask, 1], s=4, color=palette(code % 20), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(
            loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=2, frameon=False
        )


def block_umap(
    adata: ad.AnnData,
    block: str = "tx",
    color: str | Sequence[str] = ("cell_line", "drug"),
    prefix: str = "X_fcr",
    save: str | None = None,
    show: bool | None = None,
):
    """UMAP of one latent block, one panel per obs column to colour by.

    Plots ``adata.obsm["X_umap_fcr_<block>"]``, computed by :func:`fcr_tools.tl.block_umap`;
    ``adata`` is not modified.

    Parameters
    ----------
    adata
        Cells with the block's UMAP in obsm.
    block
        The block: ``"x"``, ``"t"`` or ``"tx"``.
    color
        Categorical obs column(s) to colour by.
    prefix
        Prefix of the obsm keys of the latents the UMAP was computed from (as in
        :func:`fcr_tools.tl.block_umap`).
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
    >>> import anndata as ad
    >>> import fcr_tools
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(obsm={"X_fcr_tx": rng.normal(size=(60, 4))})
    >>> adata.obs["drug"] = np.repeat(["control", "drug_0"], 30)
    >>> fcr_tools.tl.block_umap(adata, blocks="tx")
    >>> fig = fcr_tools.pl.block_umap(adata, "tx", color="drug", show=False)
    >>> fig.axes[0].get_title()
    'z_tx (interaction)\\ncoloured by drug'
    """
    coords = _stored_umaps(adata, prefix, [block])[block]
    labels = _labels(adata, color)
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
    for ax, (key, values) in zip(axes[0], labels.items(), strict=True):
        title = f"{BLOCK_TITLES.get(block, block)}\ncoloured by {key}"
        _scatter(ax, coords, values, title, legend=True)
    fig.tight_layout()
    return finish(fig, save, show)


def latent_umaps(
    adata: ad.AnnData,
    color: str | Sequence[str] = ("cell_line", "drug"),
    prefix: str = "X_fcr",
    blocks: Sequence[str] = LATENT_BLOCKS,
    save: str | None = None,
    show: bool | None = None,
):
    """UMAP of each latent block (columns) coloured by each obs column (rows).

    Plots ``adata.obsm["X_umap_fcr_<block>"]`` for each block, computed by
    :func:`fcr_tools.tl.block_umap` from the latents that
    :meth:`~fcr_tools.FCRModel.write_latents` stores; ``adata`` is not modified.

    Parameters
    ----------
    adata
        Cells with the blocks' UMAPs in obsm.
    color
        Categorical obs column(s) to colour by.
    prefix
        Prefix of the obsm keys of the latents the UMAPs were computed from (as in
        :func:`fcr_tools.tl.block_umap`).
    blocks
        Blocks to show.
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
    >>> model.write_latents(adata)
    >>> fcr_tools.tl.block_umap(adata)
    >>> fig = fcr_tools.pl.latent_umaps(adata, color=["cell_line", "drug"], show=False)
    >>> len(fig.axes)
    6
    """
    blocks = as_key_list(blocks)
    coords = _stored_umaps(adata, prefix, blocks)
    labels = _labels(adata, color)
    fig, axes = plt.subplots(
        len(labels), len(blocks), figsize=(4.2 * len(blocks), 3.8 * len(labels)), squeeze=False
    )
    for j, block in enumerate(blocks):
        for i, (key, values) in enumerate(labels.items()):
            title = f"{BLOCK_TITLES.get(block, block)}\ncoloured by {key}"
            _scatter(axes[i, j], coords[block], values, title, legend=j == len(blocks) - 1)
    fig.tight_layout()
    return finish(fig, save, show)
