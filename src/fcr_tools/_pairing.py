"""How registered cells reach a minibatch: treatment vectors and control partners.

Data flow: the registered AnnData -> :func:`cell_treatments` (the treatment encoding of
every cell) and :class:`ControlPool` (control cells per covariate group) -> :class:`FCRDataset`
(rows of the AnnData plus their treatment and, in training, a random control partner of the
same covariate group drawn anew at every access, so anew every epoch) -> :class:`FCRDataLoader`
-> :class:`FCRDataSplitter` for Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from ._backed import StoreRows
from ._constants import CHUNK_CELLS as _ENCODE_CHUNK  # a module attribute: tests shrink it
from ._constants import (
    CONTROL_X_KEY,
    COVARIATES_KEY,
    TREATMENT_DOSE_KEY,
    TREATMENT_IDX_KEY,
    TREATMENT_KEY,
    X_KEY,
)
from ._registration import RegisteredSetup
from ._scvi_compat import BatchDistributedSampler, state_registry
from ._treatments import TreatmentEncoder


def treatment_encoder(registry: dict) -> TreatmentEncoder:
    """The treatment encoder implied by a registry (treatment labels seen at setup)."""
    state = state_registry(registry, TREATMENT_KEY)
    control = RegisteredSetup.from_registry(registry).control_treatment
    return TreatmentEncoder.from_labels(list(state["categorical_mapping"]), control)


@dataclass(frozen=True)
class CellTreatments:
    """The treatment encoding of every registered cell, compactly: the code of each cell's
    (treatment, dose) pair (one or two bytes per cell) and the encoding of each pair."""

    codes: np.ndarray  # (n_obs,) the pair of each cell
    idx: np.ndarray  # (n_pairs, max_parts) component indices (int64)
    dose: np.ndarray  # (n_pairs, max_parts) doses (float32)

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Component indices and doses of ``rows``."""
        pairs = self.codes[rows]
        return self.idx[pairs], self.dose[pairs]


def registered_treatments(adata_manager: AnnDataManager) -> tuple[np.ndarray, np.ndarray]:
    """Treatment encoding (component indices, doses) of every registered cell."""
    return cell_treatments(adata_manager).of(slice(None))


def cell_treatments(adata_manager: AnnDataManager) -> CellTreatments:
    """The treatment encoding of every registered cell (see :class:`CellTreatments`).

    Each distinct (treatment, dose) pair is encoded once, so that no per-cell array of labels
    or dose strings is built; the cells are taken a chunk at a time, so that the temporary
    arrays do not grow with the number of cells (millions in a store).
    """
    setup = RegisteredSetup.from_registry(adata_manager.registry)
    state = adata_manager.get_state_registry(TREATMENT_KEY)
    codes = np.asarray(adata_manager.get_from_registry(TREATMENT_KEY)).ravel()
    mapping = np.asarray(state.categorical_mapping, dtype=object)
    encoder = treatment_encoder(adata_manager.registry)
    doses = None
    if setup.dose_key is not None:
        doses = np.asarray(setup.column(adata_manager.adata, "dose_key")).ravel()
    # (treatment code, dose as a string) -> its pair code, in order of first cell
    pairs: dict[tuple, int] = {}
    chunks, parts = [], []
    for start in range(0, len(codes), _ENCODE_CHUNK):
        stop = min(start + _ENCODE_CHUNK, len(codes))
        chunk_codes = codes[start:stop].astype(np.int64)
        chunk_doses = None if doses is None else doses[start:stop]
        dose_codes, dose_keys = _dose_groups(chunk_doses, stop - start)
        local, _ = pd.factorize(chunk_codes * len(dose_keys) + dose_codes)
        first = np.unique(local, return_index=True)[1]  # a cell of each pair, in pair order
        rows, new = np.empty(len(first), dtype=np.int64), []
        for j, cell in enumerate(first):
            key = (int(chunk_codes[cell]), dose_keys[dose_codes[cell]])
            if key not in pairs:
                pairs[key] = len(pairs)
                new.append(cell)
            rows[j] = pairs[key]
        if new:  # pairs first seen in this chunk: encoded (and checked) in order of first cell
            parts.append(
                encoder.encode(
                    mapping[chunk_codes[new]],
                    None if chunk_doses is None else chunk_doses[new],
                    dose_column=setup.dose_key,
                )
            )
        chunks.append(_small(rows[local], len(pairs)))
    kind = np.min_scalar_type(max(len(pairs) - 1, 0))
    cell_codes = np.empty(len(codes), dtype=kind)
    for start, chunk in zip(range(0, len(codes), _ENCODE_CHUNK), chunks, strict=True):
        cell_codes[start : start + len(chunk)] = chunk
    width = encoder.max_parts
    idx = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, width), np.int64)
    dose = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, width), np.float32)
    return CellTreatments(cell_codes, idx, dose)


def _small(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """``codes`` (below ``n_codes``) in the smallest unsigned integer type that holds them."""
    return codes.astype(np.min_scalar_type(max(n_codes - 1, 0)))


# the group key of missing doses (NaN, None: pandas >= 3 keeps them missing in astype(str))
_MISSING = ("missing",)


def _dose_groups(values: np.ndarray | None, n: int) -> tuple[np.ndarray, list]:
    """Codes of the doses of ``n`` cells as ``astype(str)`` groups them (see
    :func:`~fcr_tools._treatments.string_codes`), and each group's key (its string)."""
    if values is None:  # no dose column: one group
        return np.zeros(n, dtype=np.int64), [None]
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
    except TypeError:  # unhashable values (e.g. lists): their strings, per cell
        codes, uniques = pd.factorize(
            pd.Series(values).astype(str).to_numpy(), use_na_sentinel=False
        )
    as_str = pd.Series(np.asarray(uniques, dtype=object)).astype(str).to_numpy()
    remap, keys = pd.factorize(as_str, use_na_sentinel=False)
    return remap[codes], [key if isinstance(key, str) else _MISSING for key in keys]


def covariate_codes(adata_manager: AnnDataManager) -> np.ndarray:
    """Integer codes ``(n_obs, n_covariates)`` of the registered covariates (as registered:
    usually one byte each)."""
    if COVARIATES_KEY not in adata_manager.data_registry:
        return np.zeros((adata_manager.adata.n_obs, 0), dtype=np.int64)
    codes = np.asarray(adata_manager.get_from_registry(COVARIATES_KEY))
    return codes if codes.dtype.kind in "iu" else codes.astype(np.int64)


def control_mask(adata_manager: AnnDataManager) -> np.ndarray:
    """Boolean mask of the registered control cells."""
    state = adata_manager.get_state_registry(TREATMENT_KEY)
    control = RegisteredSetup.from_registry(adata_manager.registry).control_treatment
    code = list(state.categorical_mapping).index(control)
    return np.asarray(adata_manager.get_from_registry(TREATMENT_KEY)).ravel() == code


def describe_covariate_group(adata_manager: AnnDataManager, codes: np.ndarray) -> str:
    """Readable name of a covariate group, e.g. ``cell_line='A549', replicate='r1'``."""
    if COVARIATES_KEY not in adata_manager.data_registry:
        return "all cells"
    state = adata_manager.get_state_registry(COVARIATES_KEY)
    return ", ".join(
        f"{key}={state.mappings[key][code]!r}"
        for key, code in zip(state.field_keys, codes, strict=True)
    )


def covariate_groups(covariates: np.ndarray) -> np.ndarray:
    """The group of each cell ``(n_obs,)``: distinct rows of ``covariates`` numbered in order
    of first appearance (in the smallest unsigned integer type that holds them), a chunk of
    cells at a time."""
    covariates = np.asarray(covariates)
    n_obs = covariates.shape[0]
    if covariates.ndim != 2 or covariates.shape[1] == 0:
        return np.zeros(n_obs, dtype=np.uint8)
    known: dict[tuple, int] = {}
    chunks = []
    for start in range(0, n_obs, _ENCODE_CHUNK):
        block = covariates[start : start + _ENCODE_CHUNK]
        uniques, first, local = np.unique(block, axis=0, return_index=True, return_inverse=True)
        ids = np.empty(len(uniques), dtype=np.int64)
        for u in np.argsort(first, kind="stable"):  # in order of first appearance
            ids[u] = known.setdefault(tuple(uniques[u].tolist()), len(known))
        chunks.append(_small(ids[local.ravel()], len(known)))
    group = np.empty(n_obs, dtype=np.min_scalar_type(max(len(known) - 1, 0)))
    for start, chunk in zip(range(0, n_obs, _ENCODE_CHUNK), chunks, strict=True):
        group[start : start + len(chunk)] = chunk
    return group


class ControlPool:
    """Control cells of each covariate group, for drawing control partners.

    Parameters
    ----------
    covariates
        Covariate codes of every registered cell ``(n_obs, n_covariates)``.
    is_control
        Control mask of every registered cell.
    candidates
        Rows whose controls are preferred as partners (e.g. the training split). A group with
        no control among them falls back to its controls anywhere in the data.
    """

    def __init__(self, covariates: np.ndarray, is_control: np.ndarray, candidates: np.ndarray):
        n_obs = covariates.shape[0]
        self.group = group = covariate_groups(covariates)
        n_groups = int(group.max()) + 1 if n_obs else 0
        preferred = np.zeros(n_obs, dtype=bool)
        preferred[candidates] = True
        preferred &= is_control
        has_preferred = np.bincount(group[preferred], minlength=n_groups) > 0
        use = preferred | (is_control & ~has_preferred[group])
        rows = np.flatnonzero(use)
        order = np.argsort(group[rows], kind="stable")
        self.rows = rows[order]
        self.counts = np.bincount(group[self.rows], minlength=n_groups)
        self.starts = np.cumsum(self.counts) - self.counts

    def groups_without_controls(self, rows: np.ndarray) -> np.ndarray:
        """Group ids, among those of ``rows``, that have no control cell at all."""
        groups = np.unique(self.group[rows])
        return groups[self.counts[groups] == 0]

    def sample(self, rows: np.ndarray) -> np.ndarray:
        """One random control partner (a row index) for each of ``rows``."""
        group = self.group[rows]
        counts = self.counts[group]
        if (counts == 0).any():
            raise RuntimeError("A covariate group without control cells reached the sampler.")
        # torch's generator: seeded by scvi.settings.seed, and per worker in DataLoader workers
        u = torch.rand(len(rows), dtype=torch.float64).numpy()
        offset = np.minimum((u * counts).astype(np.int64), counts - 1)
        return self.rows[self.starts[group] + offset]


class FCRDataset(torch.utils.data.Dataset):
    """Rows of the registered data with their treatment encoding and control partners.

    ``dataset[positions]`` returns one minibatch (a dict of arrays) for the rows
    ``indices[positions]``.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray,
        treatments: CellTreatments,
        pool: ControlPool | None = None,
    ):
        # the rows of an AnnData through scvi-tools, of a store (X on disk) through StoreRows
        self.base = StoreRows.of(adata_manager)
        if self.base is None:
            self.base = adata_manager.create_torch_dataset()
        self.indices = indices if isinstance(indices, AllRows) else np.asarray(indices)
        self.treatments = treatments
        self.pool = pool

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions) -> dict[str, np.ndarray]:
        rows = self.indices[np.atleast_1d(np.asarray(positions))]
        n = len(rows)
        if self.pool is None and (n < 2 or bool((rows[1:] > rows[:-1]).all())):
            batch = dict(self.base[rows])  # already sorted and distinct (e.g. inference)
            batch[TREATMENT_IDX_KEY], batch[TREATMENT_DOSE_KEY] = self.treatments.of(rows)
            return batch
        partners = self.pool.sample(rows) if self.pool is not None else rows[:0]
        # one read for cells and partners: each distinct row once, in sorted order (backed
        # AnnData needs it), then back to the requested order
        unique, inverse = np.unique(np.concatenate([rows, partners]), return_inverse=True)
        data = self.base[unique]
        batch = {key: values[inverse[:n]] for key, values in data.items()}
        batch[TREATMENT_IDX_KEY], batch[TREATMENT_DOSE_KEY] = self.treatments.of(rows)
        if self.pool is not None:
            batch[CONTROL_X_KEY] = data[X_KEY][inverse[n:]]
        return batch


class AllRows:
    """The rows ``0..n-1`` of a loader over all the cells, without an array of them (8 bytes
    per cell): ``rows[slice]`` and ``rows[positions]`` give int64 arrays, as
    ``np.arange(n)`` would."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(self.n), dtype=np.int64)
        positions = np.asarray(key)
        if positions.dtype == bool or positions.dtype.kind not in "iu":
            return np.arange(self.n, dtype=np.int64)[key]
        positions = positions.astype(np.int64)
        if positions.size and (positions.min() < -self.n or positions.max() >= self.n):
            raise IndexError(f"index out of bounds for {self.n} rows")
        return np.where(positions < 0, positions + self.n, positions)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.arange(self.n, dtype=dtype or np.int64)


class ShuffledBatches(torch.utils.data.Sampler):
    """Minibatches of positions ``0..n-1`` in a new random order every epoch.

    The batches of ``BatchSampler(RandomSampler(range(n)), batch_size, drop_last)``, drawn
    from the same random numbers, as arrays: torch's samplers hold the epoch's order as a
    Python list (about 40 bytes per cell), this a 4-byte integer per cell.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool = False):
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last

    def __iter__(self) -> Iterator[np.ndarray]:
        # RandomSampler's draws: a seed from torch's global generator, then a permutation
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
        dtype = torch.int32 if self.n < 2**31 else torch.int64
        order = torch.randperm(self.n, generator=generator, dtype=dtype).numpy()
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size


class FCRDataLoader(DataLoader):
    """Minibatches of registered cells for FCR (one ``__getitem__`` call per minibatch).

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData / MuData.
    indices
        Rows to iterate over (default all).
    batch_size
        Cells per minibatch (per process under DDP).
    shuffle
        Shuffle the rows every epoch.
    pair_controls
        Add a random control partner of the same covariate group to every cell.
    treatments
        Precomputed :func:`cell_treatments` (computed when omitted).
    drop_last
        Drop the last incomplete minibatch.
    distributed_sampler
        Split the rows over DDP processes with scvi-tools' ``BatchDistributedSampler``.
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (e.g. ``num_workers``).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        pair_controls: bool = False,
        treatments: CellTreatments | None = None,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        **kwargs,
    ):
        n_obs = adata_manager.adata.n_obs
        if indices is None:
            indices = AllRows(n_obs)
        else:
            indices = np.asarray(indices)
            if indices.dtype == bool:
                indices = np.flatnonzero(indices)
        if treatments is None:
            treatments = cell_treatments(adata_manager)
        pool = None
        if pair_controls:
            pool = ControlPool(
                covariate_codes(adata_manager), control_mask(adata_manager), indices
            )
            missing = pool.groups_without_controls(indices)
            if len(missing):
                codes = covariate_codes(adata_manager)
                names = [
                    describe_covariate_group(adata_manager, codes[pool.group == g][0])
                    for g in missing
                ]
                raise ValueError(
                    "FCR pairs every cell with a control cell of the same covariates, but these "
                    f"covariate groups have no control cells: {'; '.join(names)}. Add controls "
                    "for them or remove their cells."
                )
        self.indices = indices
        dataset = FCRDataset(adata_manager, indices, treatments, pool)
        if distributed_sampler:
            sampler = BatchDistributedSampler(
                dataset, batch_size=batch_size, drop_last=drop_last, shuffle=shuffle
            )
        elif shuffle:
            sampler = ShuffledBatches(len(dataset), batch_size=batch_size, drop_last=drop_last)
        else:
            sampler = BatchSampler(
                SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last
            )
        kwargs.pop("load_sparse_tensor", None)
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)


class FCRDataSplitter(DataSplitter):
    """scvi-tools' DataSplitter with FCR's loader: control partners in train and validation."""

    def setup(self, stage: str | None = None):
        super().setup(stage)
        self._treatments = cell_treatments(self.adata_manager)

    def teardown(self, stage: str | None = None):
        """Drop the treatment encoding of every cell once training is over (the trainer, and
        with it this splitter, lives as long as the model)."""
        self._treatments = None

    def _loader(self, indices, shuffle: bool, drop_last: bool, pair: bool):
        if len(indices) == 0:
            return None
        return FCRDataLoader(
            self.adata_manager,
            indices=indices,
            shuffle=shuffle,
            drop_last=drop_last,
            pair_controls=pair,
            treatments=self._treatments,
            pin_memory=self.pin_memory,
            **self.data_loader_kwargs,
        )

    def train_dataloader(self):
        """Training minibatches with control partners."""
        return self._loader(self.train_idx, shuffle=True, drop_last=self.drop_last, pair=True)

    def val_dataloader(self):
        """Validation minibatches with control partners (none without validation cells)."""
        loader = self._loader(self.val_idx, shuffle=False, drop_last=False, pair=True)
        # FCRModel.train validates every epoch; Lightning rejects None but skips an empty list
        return [] if loader is None else loader

    def test_dataloader(self):
        """Test minibatches with control partners."""
        return self._loader(self.test_idx, shuffle=False, drop_last=False, pair=True)
