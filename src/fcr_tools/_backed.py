"""Registered data on disk: stores (AnnData in backed mode) that are set up, trained on and
written to without being read whole.

A store is an AnnData opened with ``anndata.read_h5ad(path, backed=...)`` (see
:mod:`fcr_tools.data`): obs, var and the registry live in memory, ``X`` is read from the file by
minibatches. This module reads those minibatches (:class:`CSRRows`, :class:`StoreRows`),
remembers what each registered store looked like at setup, so that a file rewritten behind the
model's back is caught before it is read, and writes blocks of ``obsm`` into the file chunk by
chunk.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from ._constants import X_KEY
from ._scvi_compat import data_uuid

# obsm rows per HDF5 chunk of the arrays written into a store
_OBSM_CHUNK_ROWS = 16_384


def is_store(adata) -> bool:
    """Whether ``adata`` is an AnnData in backed mode (its expression read from a file)."""
    return bool(getattr(adata, "isbacked", False))


def arrow_names(index) -> bool:
    """Whether an index holds its strings in Arrow buffers (e.g. a store's ``obs_names``, see
    :func:`fcr_tools.data.read_store`) rather than as a Python object per cell."""
    import pandas as pd

    return isinstance(getattr(index, "array", None), pd.arrays.ArrowExtensionArray)


def plain_names(index):
    """``index`` with a Python string per label when it holds Arrow strings and pandas does not
    make ``str`` its default string dtype (pandas < 3), else ``index`` itself: what results
    derived from a store (a few of its cells) carry, so that ``write_h5ad`` writes them as
    before (anndata writes Arrow strings only when told to)."""
    if arrow_names(index) and not _str_is_default():
        return index.astype(object)
    return index


def _str_is_default() -> bool:
    """Whether pandas infers its ``str`` dtype for strings (pandas >= 3, or opted in)."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) >= 3:
        return True
    return bool(pd.get_option("future.infer_string"))


@contextmanager
def plain_obs_index(adata) -> Iterator[None]:
    """Give ``adata`` a ``RangeIndex`` as ``obs_names`` while the block runs (registration).

    pandas looks an attribute missing on a Series up among its index labels (hashing them, and
    an Arrow index turned into a Python string per cell first): ``np.unique(series)``, which
    scvi-tools calls on obs columns, does that. With Arrow names, this would hold a Python
    string per cell and their hash table for as long as the AnnData lives; with a store's
    Python strings, the hash table (about 35 bytes per cell). AnnData in memory with Python
    strings are left as they are.
    """
    names = adata.obs_names
    if adata.is_view or not (arrow_names(names) or is_store(adata)):
        yield
        return
    import pandas as pd

    adata.obs_names = pd.RangeIndex(adata.n_obs)
    try:
        yield
    finally:
        adata.obs_names = names


def _open_file(adata):
    """The open ``h5py.File`` of a backed AnnData."""
    return adata.file["obs"].file


@dataclass(frozen=True)
class StoreState:
    """What identifies a store's file and its expression matrix at setup."""

    path: str
    inode: int
    size: int
    mtime_ns: int
    shape: tuple[int, int]
    nnz: int | None

    @classmethod
    def of(cls, adata) -> StoreState:
        """The state of the file behind ``adata`` now (its size and shape on disk)."""
        path = os.fspath(adata.filename)
        stat = os.stat(path)
        matrix = adata.file["X"]
        if "shape" in matrix.attrs:  # sparse: a group with data / indices / indptr
            shape = tuple(int(n) for n in matrix.attrs["shape"])
            nnz = int(matrix["data"].shape[0])
        else:
            shape, nnz = tuple(int(n) for n in matrix.shape), None
        return cls(path, stat.st_ino, stat.st_size, stat.st_mtime_ns, shape, nnz)


# data UUID -> the state of its store when it was set up (or last written by fcr_tools)
_STATES: dict[str, StoreState] = {}
# files fcr_tools is writing to right now (their state changes under its own writes)
_WRITING: set[str] = set()


def remember_store(adata) -> None:
    """Record the state of a registered store (after ``setup_anndata``)."""
    uuid = data_uuid(adata)
    if uuid is not None and is_store(adata):
        _STATES[uuid] = StoreState.of(adata)


def check_store(adata) -> None:
    """Fail with a clear message when a registered store's file changed since its setup.

    The expression is read from the file at every minibatch while obs (with the registered
    treatments and covariates) was read at setup: a file rewritten since (other cells, genes
    or values) would silently pair the in-memory obs with other rows.
    """
    if not is_store(adata):
        return
    path = os.fspath(adata.filename)
    if path in _WRITING:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"The store {path!r} the model reads from no longer exists.")
    if not adata.file.is_open:
        raise ValueError(
            f"The file of the store {path!r} is closed; open it again with adata.file.open() "
            "(or open the store again with fcr_tools.data.read_store and set it up)."
        )
    try:
        now = StoreState.of(adata)
    except (KeyError, OSError, RuntimeError) as err:
        raise ValueError(
            f"The store {path!r} cannot be read any more ({err}); it was probably rewritten "
            "after setup. Open it again with fcr_tools.data.read_store and run "
            "FCRModel.setup_anndata on it."
        ) from err
    expected = (adata.n_obs, adata.n_vars)
    problem = None
    if now.shape != expected:
        problem = f"its expression has shape {now.shape}, its obs / var {expected}"
    else:
        before = _STATES.get(data_uuid(adata))
        if before is not None and before != now:
            changes = [
                name
                for name in ("inode", "size", "mtime_ns", "nnz")
                if getattr(before, name) != getattr(now, name)
            ]
            problem = "the file was modified after setup (" + ", ".join(changes) + " changed)"
    if problem is not None:
        raise ValueError(
            f"The store {path!r} changed after setup_anndata: {problem}. Its obs and registry in "
            "memory no longer describe the rows on disk. Open it again with "
            "fcr_tools.data.read_store, run FCRModel.setup_anndata on it and create or load the "
            "model on the new object."
        )


@contextmanager
def writable(adata) -> Iterator[object]:
    """Reopen a backed AnnData's file for writing while the block runs; yields the h5py file.

    The file is reopened in its original mode afterwards and the new state remembered, so that
    fcr_tools' own writes are not taken for a change of the store.
    """
    check_store(adata)
    mode = _open_file(adata).mode
    path = adata.filename
    if mode != "r+":
        adata.file.close()
        try:
            adata.file.open(path, "r+")
        except OSError as err:
            adata.file.open(path, mode)
            raise OSError(
                f"Cannot write into the store {os.fspath(path)!r}: {err}. Close the other "
                "AnnData objects (or h5py files) open on it first (adata.file.close())."
            ) from err
    _WRITING.add(os.fspath(path))
    try:
        yield _open_file(adata)
    finally:
        _WRITING.discard(os.fspath(path))
        if mode != "r+":
            adata.file.close()
            adata.file.open(path, mode)
        if data_uuid(adata) in _STATES:
            remember_store(adata)


def create_obsm_arrays(h5file, n_obs: int, widths: Mapping[str, int], dtype=np.float32) -> dict:
    """Empty ``(n_obs, width)`` arrays ``obsm/<key>`` in an ``.h5ad`` file, as anndata writes
    dense arrays (replacing existing keys); returns the h5py datasets to fill by rows."""
    obsm = h5file.require_group("obsm")
    if "encoding-type" not in obsm.attrs:
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    arrays = {}
    for key, width in widths.items():
        if key in obsm:
            del obsm[key]
        chunks = (max(1, min(n_obs, _OBSM_CHUNK_ROWS)), max(1, width))
        dataset = obsm.create_dataset(key, shape=(n_obs, width), dtype=dtype, chunks=chunks)
        dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        arrays[key] = dataset
    return arrays


_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class CSRRows:
    """Read rows of a CSR matrix stored in an HDF5 group (an ``.h5ad`` store) as dense arrays.

    The row pointers are held in memory (4 or 8 bytes per cell); the values and column indices
    are read from the file, one read per run of consecutive rows. Unlike indexing anndata's
    backed matrix, nothing is computed over all the cells per read (anndata builds a mask of
    the whole first axis for every minibatch).

    Parameters
    ----------
    group
        The ``h5py.Group`` of the matrix (``data``, ``indices``, ``indptr``, attribute
        ``shape``).
    """

    def __init__(self, group):
        self.shape = tuple(int(n) for n in group.attrs["shape"])
        self.indptr = group["indptr"][...]
        self.data = group["data"]
        self.indices = group["indices"]

    @classmethod
    def of(cls, matrix) -> CSRRows | None:
        """A reader of ``matrix`` when it is a CSR matrix in an HDF5 file (AnnData's backed
        ``X`` or layer), else ``None``."""
        import h5py

        group = getattr(matrix, "group", None)
        if getattr(matrix, "format", None) != "csr" or not isinstance(group, h5py.Group):
            return None
        # one reader per matrix while any loader holds it: the training and validation loaders
        # share the row pointers instead of holding a copy each
        stat = os.stat(group.file.filename)
        key = (os.path.realpath(group.file.filename), group.name, stat.st_ino, stat.st_mtime_ns)
        reader = _READERS.get(key)
        if reader is None or not reader.data.id.valid:  # none, or of a file closed since
            reader = _READERS[key] = cls(group)
        return reader

    def __call__(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The dense ``(len(rows), n_vars)`` rows ``rows`` (sorted, without repeats)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.shape[1]), dtype=dtype)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = (stops - starts).astype(np.int64)
        # runs of consecutive rows are contiguous in the file: one read each (plain slicing:
        # h5py's read_direct costs several times more per call)
        breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
        begins = starts[np.concatenate([[0], breaks])].tolist()
        ends = stops[np.concatenate([breaks, [len(rows)]]) - 1].tolist()
        runs = [(b, e) for b, e in zip(begins, ends, strict=True) if e > b] or [(0, 0)]
        values = _joined([self.data[b:e] for b, e in runs])
        columns = _joined([self.indices[b:e] for b, e in runs])
        # row pointers of the block, of the columns' dtype (scipy would copy them otherwise)
        kind = columns.dtype if len(columns) < np.iinfo(columns.dtype).max else np.int64
        pointers = np.zeros(len(rows) + 1, dtype=kind)
        np.cumsum(lengths, out=pointers[1:])
        # scipy fills the dense rows in one pass (no per-value index arrays)
        block = sparse.csr_matrix(
            (values.astype(dtype, copy=False), columns, pointers),
            shape=(len(rows), self.shape[1]),
        )
        return block.toarray()


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The parts end to end (the one part itself, without a copy, when there is one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class StoreRows:
    """Minibatches of a registered store: ``X`` read by :class:`CSRRows`, the other registered
    fields by scvi-tools' torch dataset; ``dataset[rows]`` (sorted, distinct rows) returns the
    dict of arrays scvi-tools' dataset returns."""

    def __init__(self, adata_manager, matrix_key: str, reader: CSRRows):
        keys = [key for key in adata_manager.data_registry if key != matrix_key]
        self.base = adata_manager.create_torch_dataset(data_and_attributes=keys)
        self.matrix_key = matrix_key
        self.reader = reader

    @classmethod
    def of(cls, adata_manager, matrix_key: str = X_KEY) -> StoreRows | None:
        """The reader of a manager whose expression is a CSR matrix on disk, else ``None``."""
        reader = CSRRows.of(adata_manager.get_from_registry(matrix_key))
        return None if reader is None else cls(adata_manager, matrix_key, reader)

    def __len__(self) -> int:
        return self.reader.shape[0]

    def __getitem__(self, rows) -> dict[str, np.ndarray]:
        data = self.base[rows]
        data[self.matrix_key] = self.reader(rows)
        return data
