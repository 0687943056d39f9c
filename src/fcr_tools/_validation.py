"""Checks of user input, each failing with a message that names the culprit."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ._constants import CHUNK_CELLS as _CHUNK_CELLS  # a module attribute: tests shrink it
from ._treatments import TreatmentEncoder

_CHUNK_ROWS = 10_000


def layer_names(adata) -> list[str]:
    """The names of ``adata.layers`` (anndata >= 0.13 also lists ``X`` there, as ``None``)."""
    return [name for name in adata.layers if name is not None]


def as_key_list(keys: str | Sequence[str] | None) -> list[str]:
    """Normalise a column argument given as ``None``, one name or a list of names."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    keys = list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"Column names must be strings, got {keys!r}.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"Column names are repeated: {keys!r}.")
    return keys


def require_column(columns: Sequence[str], key: str, argument: str, where: str = "obs"):
    """Fail with close matches when ``key`` is not among ``columns``."""
    if key in columns:
        return
    close = difflib.get_close_matches(key, [str(c) for c in columns], n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise KeyError(f"{argument}={key!r}: column {key!r} not found in {where}.{hint}")


_CHUNK_VALUES = 10_000_000
# values read from a file at a time (each chunk is a copy, unlike the views of a matrix in memory)
_CHUNK_VALUES_ON_DISK = 2**21


def _iter_chunks(matrix):
    """``(values, row_of)`` of successive chunks; ``row_of(i)`` is the row of ``values.flat[i]``.

    CSR / CSC matrices are scanned through their stored values, dense and other matrices row block
    by row block: a large matrix is never copied whole.
    """
    group = getattr(matrix, "group", None)  # a sparse matrix on disk (AnnData's backed mode)
    on_disk = getattr(matrix, "format", None) in ("csr", "csc") and group is not None
    if on_disk or (sparse.issparse(matrix) and matrix.format in ("csr", "csc")):
        # the stored values, chunk by chunk (read from the file for a matrix on disk; its
        # row pointers or indices only to name the row of an offending value)
        source = group if on_disk else matrix
        data = source["data"] if on_disk else matrix.data
        step = _CHUNK_VALUES_ON_DISK if on_disk else _CHUNK_VALUES
        for start in range(0, data.shape[0], step):
            if matrix.format == "csr":

                def row_of(i, start=start, source=source):
                    indptr = source["indptr"][...] if on_disk else source.indptr
                    return int(np.searchsorted(indptr, start + i, side="right")) - 1

            else:

                def row_of(i, start=start, source=source):
                    indices = source["indices"] if on_disk else source.indices
                    return int(indices[start + i])

            yield data[start : start + step], row_of
        return
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        chunk = matrix[start : start + _CHUNK_ROWS]
        if sparse.issparse(chunk):
            chunk = sparse.csr_matrix(chunk)

            def row_of(i, start=start, indptr=chunk.indptr):
                return start + int(np.searchsorted(indptr, i, side="right")) - 1

            yield chunk.data, row_of
        else:
            values = np.asarray(chunk)

            def row_of(i, start=start, width=values.shape[1]):
                return start + i // width

            yield values, row_of


def check_expression(matrix, name: str, counts: bool) -> None:
    """Check an expression matrix: finite values; with ``counts``, non-negative integers.

    Works chunk by chunk, so a large dense or sparse matrix is never copied whole. Errors name
    the row (cell) of the first offending value.
    """
    if matrix is None:
        raise ValueError(f"{name} is empty (None).")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(matrix.shape)}: no cells or no genes.")
    hint = (
        "Register the counts layer (layer='counts') or use likelihood='gaussian' for "
        "log-normalised data."
    )
    for values, row_of in _iter_chunks(matrix):
        if values.dtype.kind not in "biuf":
            raise TypeError(f"{name} has non-numeric dtype {values.dtype}.")
        flat = values.reshape(-1)
        if values.dtype.kind == "f":
            bad = ~np.isfinite(flat)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"{name} contains NaN or infinite values (the first, {flat[i]}, in row "
                    f"{row_of(i)}). Remove or impute them before setup."
                )
        if counts:
            bad = flat < 0
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"{name} has negative values (the first, {flat[i]}, in row {row_of(i)}), "
                    f"but likelihood='nb' needs raw counts. {hint}"
                )
            if values.dtype.kind == "f":
                bad = np.round(flat) != flat
                if bad.any():
                    i = int(np.argmax(bad))
                    raise ValueError(
                        f"{name} has non-integer values (the first, {flat[i]}, in row "
                        f"{row_of(i)}), but likelihood='nb' needs raw counts. {hint}"
                    )


def check_setup_columns(
    get_column: Callable[[str], pd.Series | np.ndarray],
    columns: Sequence[str],
    treatment_key: str,
    control_treatment: str,
    covariate_keys: list[str],
    dose_key: str | None,
    require_control: bool = True,
) -> None:
    """Validate the obs columns named in ``setup_anndata``.

    Parameters
    ----------
    get_column
        Returns the values of a column by name (any shape with one value per cell).
    columns
        The names of the available columns.
    require_control
        Whether the control category must be present (not needed when replaying a saved setup
        on new data for prediction).
    """
    require_column(columns, treatment_key, "treatment_key")
    for key in covariate_keys:
        require_column(columns, key, "covariate_keys")
    if dose_key is not None:
        require_column(columns, dose_key, "dose_key")
    if treatment_key in covariate_keys:
        raise ValueError(f"Column {treatment_key!r} is both the treatment and a covariate.")
    if dose_key is not None and (dose_key == treatment_key or dose_key in covariate_keys):
        raise ValueError(f"Column {dose_key!r} cannot be the dose and a category at once.")

    def column(key: str) -> pd.Series:
        values = get_column(key)
        if isinstance(values, pd.Series):
            return values.reset_index(drop=True)
        return pd.Series(np.asarray(values).ravel())

    # chunk by chunk: no array of Python objects (or of codes) for all the cells at once
    treatments = column(treatment_key)
    missing = int(treatments.isna().sum())
    if missing:
        raise ValueError(
            f"obs[{treatment_key!r}] has {missing} missing values; label "
            f"every cell (controls as {control_treatment!r})."
        )
    labels = pd.unique(
        np.concatenate([pd.unique(_as_labels(chunk)) for _, chunk in _chunks(treatments)])
    )
    if require_control and control_treatment not in labels:
        shown = sorted(labels)[:10]
        raise ValueError(
            f"Control category {control_treatment!r} not found in obs[{treatment_key!r}] "
            f"(categories include {shown}). Pass control_treatment=... with the label of your "
            "control cells."
        )
    if require_control and len(labels) == 1:
        raise ValueError(
            f"obs[{treatment_key!r}] contains only the control {control_treatment!r}: FCR needs "
            "treated cells."
        )
    for key in covariate_keys:
        values = column(key)
        if values.isna().any():
            raise ValueError(
                f"Covariate obs[{key!r}] has {int(values.isna().sum())} missing values."
            )
    encoder = TreatmentEncoder.from_labels(list(labels), control_treatment)
    doses = None
    if dose_key is not None:
        doses = column(dose_key)
        if pd.api.types.is_bool_dtype(doses):
            raise ValueError(f"Dose column obs[{dose_key!r}] is boolean; it must hold numbers.")
        doses = doses.to_numpy()  # numbers stay numbers: no Python object per cell
    # parses every (treatment, dose) pair: non-numeric, NaN, negative doses fail here (a
    # chunk's pairs in order of first cell, those of earlier chunks already checked: the
    # first offending pair of the data is the one reported)
    for start, chunk in _chunks(treatments):
        part = None if doses is None else doses[start : start + _CHUNK_CELLS]
        encoder.encode(_as_labels(chunk), part, dose_column=dose_key)


def _chunks(values: pd.Series):
    """``(start, chunk)`` of successive chunks of ``_CHUNK_CELLS`` values."""
    for start in range(0, len(values), _CHUNK_CELLS):
        yield start, values.iloc[start : start + _CHUNK_CELLS]


def _as_labels(values: pd.Series) -> np.ndarray:
    """Treatment labels as strings (as ``values.astype(object).astype(str)``)."""
    return values.astype(object).astype(str).to_numpy()
