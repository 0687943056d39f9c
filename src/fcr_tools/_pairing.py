"""How registered cells reach a minibatch: treatment vectors and control partners.

Data flow: the registered AnnData -> :func:`registered_treatments` (the treatment encoding of
every cell) and :class:`ControlPool` (control cells per covariate group) -> :class:`FCRDataset`
(rows of the AnnData plus their treatment and, in training, a random control partner of the
same covariate group drawn anew at every access, so anew every epoch) -> :class:`FCRDataLoader`
-> :class:`FCRDataSplitter` for Lightning.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from ._backed import StoreRows
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
from ._treatments import TreatmentEncoder, string_codes


def treatment_encoder(registry: dict) -> TreatmentEncoder:
    """The treatment encoder implied by a registry (treatment labels seen at setup)."""
    state = state_registry(registry, TREATMENT_KEY)
    control = RegisteredSetup.from_registry(registry).control_treatment
    return TreatmentEncoder.from_labels(list(state["categorical_mapping"]), control)


def registered_treatments(adata_manager: AnnDataManager) -> tuple[np.ndarray, np.ndarray]:
    """Treatment encoding (component indices, doses) of every registered cell.

    Each distinct (treatment, dose) pair is encoded once and broadcast to its cells, so that
    no per-cell array of labels or dose strings is built (millions of cells in a store).
    """
    setup = RegisteredSetup.from_registry(adata_manager.registry)
    state = adata_manager.get_state_registry(TREATMENT_KEY)
    codes = adata_manager.get_from_registry(TREATMENT_KEY).ravel().astype(np.int64)
    mapping = np.asarray(state.categorical_mapping, dtype=object)
    dose_key = setup.dose_key
    encoder = treatment_encoder(adata_manager.registry)
    if dose_key is None:
        pairs, uniques = pd.factorize(codes)
        idx, dose = encoder.encode(mapping[uniques], None, dose_column=dose_key)
        return idx[pairs], dose[pairs]
    doses = pd.Series(np.asarray(setup.column(adata_manager.adata, "dose_key")).ravel())
    dose_codes = string_codes(doses)
    pairs, _ = pd.factorize(codes * (int(dose_codes.max(initial=0)) + 1) + dose_codes)
    first = np.unique(pairs, return_index=True)[1]  # a cell of each pair, in pair order
    idx, dose = encoder.encode(
        mapping[codes[first]], doses.iloc[first].to_numpy(), dose_column=dose_key
    )
    return idx[pairs], dose[pairs]


def covariate_codes(adata_manager: AnnDataManager) -> np.ndarray:
    """Integer codes ``(n_obs, n_covariates)`` of the registered covariates."""
    if COVARIATES_KEY not in adata_manager.data_registry:
        return np.zeros((adata_manager.adata.n_obs, 0), dtype=np.int64)
    return np.asarray(adata_manager.get_from_registry(COVARIATES_KEY)).astype(np.int64)


def control_mask(adata_manager: AnnDataManager) -> np.ndarray:
    """Boolean mask of the registered control cells."""
    state = adata_manager.get_state_registry(TREATMENT_KEY)
    control = RegisteredSetup.from_registry(adata_manager.registry).control_treatment
    code = list(state.categorical_mapping).index(control)
    return adata_manager.get_from_registry(TREATMENT_KEY).ravel().astype(int) == code


def describe_covariate_group(adata_manager: AnnDataManager, codes: np.ndarray) -> str:
    """Readable name of a covariate group, e.g. ``cell_line='A549', replicate='r1'``."""
    if COVARIATES_KEY not in adata_manager.data_registry:
        return "all cells"
    state = adata_manager.get_state_registry(COVARIATES_KEY)
    return ", ".join(
        f"{key}={state.mappings[key][code]!r}"
        for key, code in zip(state.field_keys, codes, strict=True)
    )


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
        group = np.zeros(n_obs, dtype=np.int64)
        for column in np.asarray(covariates).T:  # hash-based: linear in the number of cells
            codes, uniques = pd.factorize(column)
            group, _ = pd.factorize(group * len(uniques) + codes)
        group = group.astype(np.int32 if n_obs < 2**31 else np.int64)  # 4 bytes per cell
        self.group = group
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
        treatments: tuple[np.ndarray, np.ndarray],
        pool: ControlPool | None = None,
    ):
        # the rows of an AnnData through scvi-tools, of a store (X on disk) through StoreRows
        self.base = StoreRows.of(adata_manager)
        if self.base is None:
            self.base = adata_manager.create_torch_dataset()
        self.indices = np.asarray(indices)
        self.t_idx, self.t_dose = treatments
        self.pool = pool

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions) -> dict[str, np.ndarray]:
        rows = self.indices[np.atleast_1d(np.asarray(positions))]
        n = len(rows)
        if self.pool is None and (n < 2 or bool((rows[1:] > rows[:-1]).all())):
            batch = dict(self.base[rows])  # already sorted and distinct (e.g. inference)
            batch[TREATMENT_IDX_KEY] = self.t_idx[rows]
            batch[TREATMENT_DOSE_KEY] = self.t_dose[rows]
            return batch
        partners = self.pool.sample(rows) if self.pool is not None else rows[:0]
        # one read for cells and partners: each distinct row once, in sorted order (backed
        # AnnData needs it), then back to the requested order
        unique, inverse = np.unique(np.concatenate([rows, partners]), return_inverse=True)
        data = self.base[unique]
        batch = {key: values[inverse[:n]] for key, values in data.items()}
        batch[TREATMENT_IDX_KEY] = self.t_idx[rows]
        batch[TREATMENT_DOSE_KEY] = self.t_dose[rows]
        if self.pool is not None:
            batch[CONTROL_X_KEY] = data[X_KEY][inverse[n:]]
        return batch


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
        Precomputed :func:`registered_treatments` (computed when omitted).
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
        treatments: tuple[np.ndarray, np.ndarray] | None = None,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        **kwargs,
    ):
        n_obs = adata_manager.adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if treatments is None:
            treatments = registered_treatments(adata_manager)
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
        else:
            base = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
            sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
        kwargs.pop("load_sparse_tensor", None)
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)


class FCRDataSplitter(DataSplitter):
    """scvi-tools' DataSplitter with FCR's loader: control partners in train and validation."""

    def setup(self, stage: str | None = None):
        super().setup(stage)
        self._treatments = registered_treatments(self.adata_manager)

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
