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
# values copied at a time when a staged store is laid out at close
_COPY_VALUES = 2**24


def _csr_attrs(n_obs: int, n_vars: int) -> dict:
    return {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_vars)}


def _index_dtype(nnz: int, n_vars: int) -> np.dtype:
    """int32 for indices and indptr when both fit (scipy wants the two of the same dtype)."""
    return np.dtype(np.int32 if max(nnz, n_vars) < 2**31 else np.int64)


class StoreWriter:
    """Write an ``.h5ad`` store one chunk of cells at a time, in bounded memory.

    ``obs`` and ``var`` (small) are written first; :meth:`append` then adds the expression of
    the next cells, in the order of ``obs``, as CSR rows. Use as a context manager: on exit the
    number of rows written is checked against ``obs``.

    The matrix is stored contiguously (not in HDF5 chunks): reading one cell's row is then one
    small read, where a chunked layout reads whole chunks (6-20 times slower per random row in
    ``benchmarks/scale.py``'s measurements). When the number of stored values is not known in
    advance (``nnz=None``), the rows are staged in a temporary file next to ``path`` and copied
    into place, chunk by chunk, on close.

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
    nnz
        The number of stored (non-zero) values of the whole matrix, if known.

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
        nnz: int | None = None,
    ):
        self.path = Path(path)
        self.n_obs, self.n_vars = len(obs), len(var)
        self.dtype = np.dtype(dtype)
        self.nnz = nnz
        self.n_written = 0
        self._nnz = 0
        # everything but X through anndata itself (obs, var, the empty mappings, the format)
        ad.AnnData(obs=obs, var=var).write_h5ad(self.path)
        self._file = h5py.File(self.path, "r+")
        self._staging = None
        if nnz is None:  # resizable datasets in a side file, laid out in place on close
            self._staging = h5py.File(self._staging_path, "w")
            target = self._staging
            kinds = {"data": self.dtype, "indices": _index_dtype(0, self.n_vars)}
            for name, kind in kinds.items():
                target.create_dataset(name, (0,), maxshape=(None,), dtype=kind, chunks=(2**16,))
            target.create_dataset(
                "indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(2**16,)
            )
        else:
            target = self._create_x(nnz)
        self._target = target

    @property
    def _staging_path(self) -> Path:
        return self.path.with_name(self.path.name + ".staging")

    def _create_x(self, nnz: int):
        """The store's empty, contiguous ``X`` group for ``nnz`` stored values."""
        group = self._file.create_group("X")
        group.attrs.update(_csr_attrs(self.n_obs, self.n_vars))
        index = _index_dtype(nnz, self.n_vars)
        group.create_dataset("data", (nnz,), dtype=self.dtype, fill_time="never")
        group.create_dataset("indices", (nnz,), dtype=index, fill_time="never")
        group.create_dataset("indptr", data=np.zeros(self.n_obs + 1, dtype=index))
        return group

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
        block.sum_duplicates()  # sorted column indices, each at most once per row
        end, stop = self._nnz + block.nnz, self.n_written + block.shape[0]
        if self.nnz is not None and end > self.nnz:
            raise ValueError(f"More stored values than nnz={self.nnz}.")
        target = self._target
        if self._staging is not None:
            for name in ("data", "indices"):
                target[name].resize((end,))
            target["indptr"].resize((stop + 1,))
        target["data"][self._nnz : end] = block.data.astype(self.dtype, copy=False)
        target["indices"][self._nnz : end] = block.indices
        target["indptr"][self.n_written + 1 : stop + 1] = (
            block.indptr[1:].astype(np.int64) + self._nnz
        )
        self._nnz, self.n_written = end, stop

    def close(self) -> None:
        """Lay out and close the file; fail unless every cell of ``obs`` got its row."""
        if self._file is None:
            return
        try:
            if self.n_written != self.n_obs:
                raise ValueError(
                    f"The store {os.fspath(self.path)!r} got {self.n_written} rows for "
                    f"{self.n_obs} cells in obs: it is incomplete."
                )
            if self.nnz is not None and self._nnz != self.nnz:
                raise ValueError(f"{self._nnz} stored values were written, not nnz={self.nnz}.")
            if self._staging is not None:
                group = self._create_x(self._nnz)
                for name, staged in self._staging.items():
                    for start in range(0, staged.shape[0], _COPY_VALUES):
                        part = staged[start : start + _COPY_VALUES]
                        group[name][start : start + len(part)] = part
        finally:
            self._release()

    def _release(self) -> None:
        self._file.close()
        self._file = None
        if self._staging is not None:
            self._staging.close()
            self._staging_path.unlink()
            self._staging = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._file is not None:  # keep the original error
            self._release()
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
    (True, (420, 20))
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
        with StoreWriter(path, obs, var, dtype=dtype, nnz=_stored_values(matrix)) as writer:
            for start in range(0, source.n_obs, chunk_rows):
                writer.append(matrix[start : start + chunk_rows])
    finally:
        if opened is not None:
            opened.file.close()


def _stored_values(matrix) -> int | None:
    """The number of stored values of a sparse matrix in memory or on disk (else ``None``)."""
    if sparse.issparse(matrix):
        return int(matrix.nnz)
    group = getattr(matrix, "group", None)
    if _format(matrix) is not None and group is not None:
        return int(group["data"].shape[0])
    return None


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
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import simulate_screen, write_store
    >>> write_store(simulate_screen(n_cells_per_condition=5, n_genes=20), "screen.h5ad")
    >>> store = read_store("screen.h5ad")
    >>> type(store.X).__name__
    '_CSRDataset'
    >>> FCRModel.setup_anndata(
    ...     store, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    ... )
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
