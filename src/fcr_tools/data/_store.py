"""On-disk stores: ``.h5ad`` files read with AnnData's backed mode, for screens beyond memory.

A store is an ordinary ``.h5ad`` file whose expression matrix is CSR (cells are rows), opened
with ``anndata.read_h5ad(path, backed="r")``: ``obs`` and ``var`` are read into memory, ``X``
stays on disk and minibatches read their rows from it. :func:`write_store` converts any AnnData
or ``.h5ad`` file into one, :class:`StoreWriter` builds one chunk of cells at a time (e.g. from
a simulation or another format) and :func:`read_store` opens one for FCR.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

# rows copied at a time by write_store (bounded memory whatever the number of cells)
CHUNK_ROWS = 10_000
# elements per HDF5 chunk of X's data / indices: 2 MiB of float32, more than HDF5's default
# chunk cache (1 MiB, which anndata's backed mode uses). A chunk larger than the cache is read
# directly, only the bytes of the cells asked for; a smaller one is read whole into the cache
# for every cell, which made random minibatches 4-5 times slower in benchmarks/scale.py.
_H5_CHUNK = 2**19


def _csr_attrs(n_obs: int, n_vars: int) -> dict:
    return {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_vars)}


class StoreWriter:
    """Write an ``.h5ad`` store one chunk of cells at a time, in bounded memory.

    ``obs`` and ``var`` (small) are written first; :meth:`append` then adds the expression of
    the next cells, in the order of ``obs``, as CSR rows. Use as a context manager: on exit the
    number of rows written is checked against ``obs``.

    Parameters
    ----------
    path
        The ``.h5ad`` file to create (overwritten if it exists).
    obs
        One row per cell, in the order the chunks will come in.
    var
        One row per gene (its index: the gene names).
    dtype
        Stored dtype of the expression values.

    Examples
    --------
    >>> from fcr_tools.data import StoreWriter, simulate_screen
    >>> screen = simulate_screen(n_cells_per_condition=5, n_genes=20)
    >>> with StoreWriter("screen_store.h5ad", screen.obs, screen.var) as writer:
    ...     for start in range(0, screen.n_obs, 100):
    ...         writer.append(screen.X[start : start + 100])
    >>> writer.n_written == screen.n_obs
    True
    """

    def __init__(
        self,
        path: str | os.PathLike,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        dtype: np.dtype | str = np.float32,
    ):
        self.path = Path(path)
        self.n_obs, self.n_vars = len(obs), len(var)
        self.dtype = np.dtype(dtype)
        self.n_written = 0
        # everything but X through anndata itself (obs, var, the empty mappings, the format)
        skeleton = ad.AnnData(obs=obs, var=var)
        skeleton.write_h5ad(self.path)
        del skeleton
        self._file = h5py.File(self.path, "r+")
        group = self._file.create_group("X")
        group.attrs.update(_csr_attrs(self.n_obs, self.n_vars))
        index_dtype = np.int32 if self.n_vars < 2**31 else np.int64
        for name, kind in (("data", self.dtype), ("indices", index_dtype)):
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=kind, chunks=_H5_CHUNK)
        group.create_dataset(
            "indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=_H5_CHUNK
        )
        self._group = group
        self._nnz = 0

    def append(self, rows) -> None:
        """Add the expression of the next cells (a sparse or dense ``(n, n_vars)`` block)."""
        if self._file is None:
            raise ValueError("The store is closed.")
        block = sparse.csr_matrix(rows)
        if block.shape[1] != self.n_vars:
            raise ValueError(
                f"A block of {block.shape[1]} genes was given to a store of {self.n_vars} genes."
            )
        if self.n_written + block.shape[0] > self.n_obs:
            raise ValueError(
                f"More rows than obs has cells ({self.n_written} + {block.shape[0]} > "
                f"{self.n_obs})."
            )
        block.sort_indices()
        nnz = block.nnz
        values_of = {"data": block.data.astype(self.dtype, copy=False), "indices": block.indices}
        for name, values in values_of.items():
            dataset = self._group[name]
            dataset.resize((self._nnz + nnz,))
            dataset[self._nnz :] = values
        indptr = self._group["indptr"]
        indptr.resize((self.n_written + block.shape[0] + 1,))
        indptr[self.n_written + 1 :] = block.indptr[1:].astype(np.int64) + self._nnz
        self._nnz += nnz
        self.n_written += block.shape[0]

    def close(self) -> None:
        """Close the file; fail unless every cell of ``obs`` got its row."""
        if self._file is None:
            return
        if self._nnz < 2**31 and self._group["indices"].dtype == np.int32:
            self._narrow_indptr()
        self._file.close()
        self._file = None
        if self.n_written != self.n_obs:
            raise ValueError(
                f"The store {os.fspath(self.path)!r} got {self.n_written} rows for "
                f"{self.n_obs} cells in obs: it is incomplete."
            )

    def _narrow_indptr(self) -> None:
        """Store indptr as int32 like the indices (scipy recasts mixed index dtypes, on every
        row selection, when the store is read into memory)."""
        old = self._group["indptr"]
        new = self._group.create_dataset(
            "indptr_int32", shape=old.shape, dtype=np.int32, chunks=(min(old.shape[0], _H5_CHUNK),)
        )
        for start in range(0, old.shape[0], _H5_CHUNK):
            new[start : start + _H5_CHUNK] = old[start : start + _H5_CHUNK]
        del self._group["indptr"]
        self._group.move("indptr_int32", "indptr")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._file is not None:  # keep the original error
            self._file.close()
            self._file = None
            return
        self.close()


def write_store(
    source: ad.AnnData | str | os.PathLike,
    path: str | os.PathLike,
    layer: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    dtype: np.dtype | str = np.float32,
) -> None:
    """Convert an AnnData or an ``.h5ad`` file into a store for out-of-core training.

    The expression (``X`` or ``layer``) is copied ``chunk_rows`` cells at a time into a CSR
    ``X`` laid out for reading single cells; ``obs`` and ``var`` are copied whole (other layers,
    ``obsm`` and ``uns`` are not). A file is read in backed mode, so neither the source nor the
    store needs to fit in memory. Open the result with :func:`read_store`.

    Parameters
    ----------
    source
        An AnnData (in memory or backed) or the path of an ``.h5ad`` file.
    path
        The store to write (an ``.h5ad`` file).
    layer
        The layer that becomes the store's ``X`` (``None``: ``X``).
    chunk_rows
        Cells copied at a time.
    dtype
        Stored dtype of the expression values.

    Examples
    --------
    >>> from fcr_tools.data import read_store, simulate_screen, write_store
    >>> write_store(simulate_screen(n_cells_per_condition=5, n_genes=20), "screen.h5ad")
    >>> store = read_store("screen.h5ad")
    >>> store.isbacked, store.shape
    (True, (120, 20))
    """
    opened = None
    if not isinstance(source, ad.AnnData):
        source = opened = ad.read_h5ad(source, backed="r")
    try:
        if layer is None:
            matrix = source.X
        elif layer in source.layers:
            matrix = source.layers[layer]
        else:
            raise KeyError(f"layer={layer!r} not found in the source's layers.")
        if matrix is None:
            raise ValueError("The source has no expression matrix (X is None).")
        if _format(matrix) == "csc" and source.isbacked:
            raise ValueError(
                "The source's matrix is CSC on disk: reading it by cells would read it whole "
                "for every chunk. Convert it to CSR first (in memory: adata.X = adata.X.tocsr())."
            )
        obs = source.obs.copy()
        var = source.var.copy()
        with StoreWriter(path, obs, var, dtype=dtype) as writer:
            for start in range(0, source.n_obs, chunk_rows):
                writer.append(matrix[start : start + chunk_rows])
    finally:
        if opened is not None:
            opened.file.close()


def _format(matrix) -> str | None:
    """``"csr"`` / ``"csc"`` for sparse matrices in memory or on disk, else ``None``."""
    fmt = getattr(matrix, "format", None)
    if fmt in ("csr", "csc"):
        return fmt
    return None


def read_store(path: str | os.PathLike) -> ad.AnnData:
    """Open a store for FCR: ``obs`` and ``var`` in memory, the expression on disk.

    The same as ``anndata.read_h5ad(path, backed="r")``, with a check that the expression can
    be read by cells (CSR or dense on disk). Register it with
    :meth:`fcr_tools.FCRModel.setup_anndata` as any AnnData.

    Parameters
    ----------
    path
        An ``.h5ad`` file, e.g. written by :func:`write_store`.

    Returns
    -------
    A backed AnnData (``adata.isbacked``; ``adata.X`` reads from the file).

    Examples
    --------
    >>> store = read_store("screen.h5ad")
    >>> type(store.X).__name__
    '_CSRDataset'
    """
    adata = ad.read_h5ad(path, backed="r")
    if _format(adata.X) == "csc":
        adata.file.close()
        raise ValueError(
            f"The store {os.fspath(path)!r} holds its expression as CSC (by genes): every "
            "minibatch would read all of it. Rewrite it by cells with "
            "fcr_tools.data.write_store(path, new_path)."
        )
    return adata
