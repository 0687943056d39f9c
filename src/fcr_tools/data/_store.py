"""On-disk stores: ``.h5ad`` files read with AnnData's backed mode, for screens beyond memory.

A store is an ordinary ``.h5ad`` file whose expression matrix is CSR (cells are rows), opened
with ``anndata.read_h5ad(path, backed="r")``: ``obs`` and ``var`` are read into memory, ``X``
stays on disk and minibatches read their rows from it. :func:`write_store` converts any AnnData
or ``.h5ad`` file into one, :class:`StoreWriter` builds one chunk of cells at a time (e.g. from
a simulation or another format) and :func:`read_store` opens one for FCR.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from .._backed import plain_names

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
        # everything but X through anndata itself (obs, var, the empty mappings, the format);
        # Arrow names (a store's, see read_store) as Python strings: anndata writes them
        # only when told to
        obs = obs.set_axis(plain_names(obs.index))
        var = var.set_axis(plain_names(var.index))
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


def read_store(
    path: str | os.PathLike, obs_names: Literal["auto", "arrow", "object"] = "auto"
) -> ad.AnnData:
    """Open a store for FCR: ``obs`` and ``var`` in memory, the expression on disk.

    The same as ``anndata.read_h5ad(path, backed="r")``, with a check that the expression can
    be read by cells (CSR or dense on disk) and, when ``pyarrow`` is installed (``pip install
    'fcr-tools[store]'``), the cells' names held in one Arrow buffer instead of a Python string
    per cell: the same names, with pandas' ``str`` dtype (the default of pandas 3), in about a
    fifth of the memory (16-20 bytes per cell instead of about 70, or 100 once pandas hashes
    them). Register it with :meth:`fcr_tools.FCRModel.setup_anndata` as any AnnData.

    Parameters
    ----------
    path
        An ``.h5ad`` file, e.g. written by :func:`write_store`.
    obs_names
        How ``obs_names`` are held: ``"arrow"`` (Arrow strings; needs ``pyarrow``),
        ``"object"`` (as anndata reads them: a Python string per cell) or ``"auto"`` (Arrow
        when ``pyarrow`` is installed). With Arrow names, ``adata.to_memory().write_h5ad(...)``
        needs ``anndata.settings.allow_write_nullable_strings = True`` (as with pandas 3), or
        ``adata.obs_names = adata.obs_names.astype(object)`` first;
        :func:`write_store` handles them.

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
    >>> store.obs_names[:2].tolist()
    ['cell_0', 'cell_1']
    >>> FCRModel.setup_anndata(
    ...     store, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    ... )
    """
    if obs_names not in ("auto", "arrow", "object"):
        raise ValueError(f"obs_names must be 'auto', 'arrow' or 'object', not {obs_names!r}.")
    dtype = arrow_string_dtype() if obs_names != "object" else None
    if obs_names == "arrow" and dtype is None:
        raise ImportError(
            "read_store(obs_names='arrow') needs pyarrow (and pandas >= 2.1): "
            "pip install 'fcr-tools[store]'."
        )
    adata = _read_backed_arrow(path, dtype) if dtype is not None else None
    if adata is None:  # object names, or a layout read by anndata only
        adata = ad.read_h5ad(path, backed="r")
    if _format(adata.X) == "csc":
        adata.file.close()
        raise ValueError(
            f"The store {os.fspath(path)!r} holds its expression as CSC (by genes): every "
            "minibatch would read all of it. Rewrite it by cells with "
            "fcr_tools.data.write_store(path, new_path)."
        )
    return adata


def arrow_string_dtype() -> pd.StringDtype | None:
    """pandas' Arrow-backed string dtype with NaN for missing values (pandas 3's ``str``), or
    ``None`` without pyarrow (or with a pandas too old for it)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    for args in ({"storage": "pyarrow", "na_value": np.nan}, {"storage": "pyarrow_numpy"}):
        try:
            return pd.StringDtype(**args)
        except (TypeError, ValueError, ImportError):  # pandas < 2.3; < 2.1
            continue
    return None


def _read_backed_arrow(path, dtype) -> ad.AnnData | None:
    """``read_h5ad(path, backed="r")`` with the obs index read into Arrow strings, a chunk of
    names at a time (never a Python string per cell for all the cells at once); ``None`` for
    a layout this does not handle (anndata then reads the file)."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    with h5py.File(path, "r") as f:
        obs = f.get("obs")
        if (
            "encoding-type" not in f.attrs
            or not isinstance(obs, h5py.Group)
            or obs.attrs.get("encoding-type") != "dataframe"
            or any(key.startswith("raw.") for key in f)  # layouts before anndata 0.7
        ):
            return None
        index_key = obs.attrs["_index"]
        index_key = index_key.decode() if isinstance(index_key, bytes) else str(index_key)
        names = obs[index_key]
        if (
            not isinstance(names, h5py.Dataset)
            or names.attrs.get("encoding-type") != "string-array"
            or names.ndim != 1
        ):
            return None
        strings, hashes = _arrow_strings(names)
        hashes.sort()  # distinct hashes: distinct names (equal ones: the names are compared)
        maybe_repeated = bool((hashes[1:] == hashes[:-1]).any())
        del hashes
        index = pd.Index(pd.array(strings, dtype=dtype))
        columns = [str(c) for c in np.atleast_1d(obs.attrs["column-order"])]
        frame = pd.DataFrame(
            {key: read_elem(obs[key]) for key in columns},
            index=index,
            columns=columns if columns else None,
        )
        if index_key != "_index":
            frame.index.name = index_key
        parts = {k: read_elem(f[k]) for k in _BACKED_PARTS if k in f}
        raw = {k: read_elem(f[f"raw/{k}"]) for k in ("var", "varm") if f"raw/{k}" in f}
    # anndata would check the names' uniqueness with a Python string per cell (and their hash
    # table): the hashes above did, and the warning is anndata's
    unchecked = (
        ad.settings.override(check_uniqueness=False)
        if hasattr(ad.settings, "check_uniqueness")
        else nullcontext()
    )
    with unchecked, _system_memory_pool():  # anndata copies the names once (and drops it)
        adata = ad.AnnData(obs=frame, raw=raw or None, filename=path, filemode="r", **parts)
    if maybe_repeated and adata.obs_names.astype(object).has_duplicates:
        _warn_duplicates("obs")
    if adata.var_names[~adata.var_names.isna()].has_duplicates:
        _warn_duplicates("var")
    return adata


# what read_h5ad(backed=...) reads into memory besides obs (X, raw/X stay on disk)
_BACKED_PARTS = ("var", "obsm", "varm", "obsp", "varp", "uns", "layers")
# names turned into Python strings at a time while reading them into Arrow
_NAME_CHUNK = 2**14


def _arrow_strings(dataset: h5py.Dataset):
    """An HDF5 array of strings as an Arrow array, read a chunk of names at a time, and a 64-bit
    hash of each name (to find duplicates without hashing them all at once)."""
    import pyarrow as pa

    pool = pa.system_memory_pool()  # see _system_memory_pool
    strings = dataset.asstr()
    hashes = np.empty(dataset.shape[0], dtype=np.uint64)
    parts = []
    for start in range(0, dataset.shape[0], _NAME_CHUNK):
        chunk = strings[start : start + _NAME_CHUNK]
        hashes[start : start + len(chunk)] = pd.util.hash_array(chunk, categorize=False)
        parts.append(pa.array(chunk, type=pa.large_string(), memory_pool=pool))
    # one array: pyarrow's take (pandas' iloc, per minibatch) joins the chunks of a chunked
    # array first, a copy of all the names each time
    if not parts:
        return pa.array([], type=pa.large_string()), hashes
    return pa.concat_arrays(parts, memory_pool=pool), hashes


@contextmanager
def _system_memory_pool():
    """Arrow's allocations through malloc while the block runs.

    pyarrow's default allocator (mimalloc or jemalloc) keeps the memory of freed buffers: the
    temporary copies of the names made while the AnnData is built would stay resident, as
    much memory again as the names themselves.
    """
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _warn_duplicates(attr: str) -> None:
    """anndata's warning for duplicate names."""
    names = "Observation" if attr == "obs" else "Variable"
    warnings.warn(
        f"{names} names are not unique. To make them unique, call `.{attr}_names_make_unique`.",
        UserWarning,
        stacklevel=3,
    )
