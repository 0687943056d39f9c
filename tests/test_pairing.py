"""Data loading: treatment encoding of each row and control partners of the same covariates."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from torch.utils.data import BatchSampler, RandomSampler

from fcr_tools import FCRModel
from fcr_tools import _pairing as pairing
from fcr_tools._pairing import (
    AllRows,
    ControlPool,
    FCRDataLoader,
    FCRDataSplitter,
    ShuffledBatches,
)
from fcr_tools._treatments import TreatmentEncoder


def _with_row_ids(adata):
    """Gene 0 holds the row number, so a batch tells which rows (and partners) it holds."""
    dense = adata.X.toarray() if sparse.issparse(adata.X) else np.array(adata.X)
    dense[:, 0] = np.arange(adata.n_obs)
    adata.X = sparse.csr_matrix(dense) if sparse.issparse(adata.X) else dense
    return adata


def _add_replicate(adata):
    """Two replicates, balanced within every (cell line, drug, dose) condition."""
    rank = adata.obs.groupby("condition", observed=True).cumcount().to_numpy()
    adata.obs["replicate"] = pd.Categorical(np.where(rank % 2 == 0, "r0", "r1"))
    return adata


def _manager(adata, covariate_keys="cell_line", **setup):
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys=covariate_keys, **setup
    )
    return FCRModel._get_most_recent_anndata_manager(adata, required=True)


def _rows_and_partners(loader):
    rows, partners = [], []
    for batch in loader:
        rows.append(batch["X"][:, 0].numpy().astype(int))
        partners.append(batch["control_X"][:, 0].numpy().astype(int))
    return np.concatenate(rows), np.concatenate(partners)


@pytest.mark.parametrize("covariate_keys", ["cell_line", ["cell_line", "replicate"]])
def test_partners_are_controls_of_the_same_covariate_group(adata, covariate_keys):
    adata = _add_replicate(_with_row_ids(adata))
    manager = _manager(adata, covariate_keys)
    loader = FCRDataLoader(manager, batch_size=50, shuffle=True, pair_controls=True)
    rows, partners = _rows_and_partners(loader)
    np.testing.assert_array_equal(np.sort(rows), np.arange(adata.n_obs))
    obs = adata.obs
    assert (obs["drug"].to_numpy()[partners] == "control").all()
    for key in ["cell_line", "replicate"]:
        same = obs[key].to_numpy()[partners] == obs[key].to_numpy()[rows]
        if key in covariate_keys:
            assert same.all()
        else:
            assert not same.all()  # not matched on columns that are not covariates
    # the partner's expression really is that control's row
    batch = next(iter(FCRDataLoader(manager, batch_size=20, pair_controls=True)))
    partner_rows = batch["control_X"][:, 0].numpy().astype(int)
    np.testing.assert_array_equal(batch["control_X"].numpy(), adata.X[partner_rows])


def test_no_covariates_pairs_with_any_control(adata):
    adata = _with_row_ids(adata)
    manager = _manager(adata, covariate_keys=None)
    rows, partners = _rows_and_partners(FCRDataLoader(manager, batch_size=64, pair_controls=True))
    assert (adata.obs["drug"].to_numpy()[partners] == "control").all()
    lines = adata.obs["cell_line"].to_numpy()
    assert (lines[partners] != lines[rows]).any()


def test_partners_are_redrawn_every_epoch(adata):
    adata = _with_row_ids(adata)
    splitter = FCRDataSplitter(_manager(adata), train_size=0.9)
    splitter.setup()
    loader = splitter.train_dataloader()
    epochs = []
    for _ in range(2):
        rows, partners = _rows_and_partners(loader)
        epochs.append(pd.Series(partners, index=rows).sort_index())
    first, second = epochs
    assert first.index.equals(second.index)
    assert len(first) == len(splitter.train_idx)
    assert (first != second).mean() > 0.5  # ~15 controls per group: most partners change
    # rows are reshuffled too
    assert not np.array_equal(_rows_and_partners(loader)[0], _rows_and_partners(loader)[0])


def test_training_partners_come_from_the_training_split(adata):
    adata = _with_row_ids(adata)
    splitter = FCRDataSplitter(_manager(adata), train_size=0.8)
    splitter.setup()
    _, partners = _rows_and_partners(splitter.train_dataloader())
    assert set(partners) <= set(splitter.train_idx.tolist())
    rows, partners = _rows_and_partners(splitter.val_dataloader())
    assert set(rows) == set(splitter.val_idx.tolist())
    assert (adata.obs["drug"].to_numpy()[partners] == "control").all()


def test_pool_prefers_controls_among_the_indices_and_falls_back(adata):
    adata = _with_row_ids(adata)
    manager = _manager(adata)
    obs = adata.obs
    is_control = (obs["drug"] == "control").to_numpy()
    line = obs["cell_line"].to_numpy()
    # the indices hold every treated cell but the controls of cell_line_0 only
    indices = np.flatnonzero(~is_control | (line == "cell_line_0"))
    loader = FCRDataLoader(manager, indices=indices, batch_size=64, pair_controls=True)
    rows, partners = _rows_and_partners(loader)
    np.testing.assert_array_equal(rows, indices)
    in_indices = np.isin(partners, indices)
    assert in_indices[line[rows] == "cell_line_0"].all()
    # cell_line_1 and _2 have no control among the indices: all controls of their line
    assert not in_indices[line[rows] != "cell_line_0"].any()
    assert is_control[partners].all()
    assert (line[partners] == line[rows]).all()


def test_control_pool_directly():
    covariates = np.array([[0], [0], [0], [1], [1], [2], [2]])
    is_control = np.array([True, True, False, True, False, True, False])
    pool = ControlPool(covariates, is_control, candidates=np.array([0, 2, 4, 5, 6]))
    torch.manual_seed(0)
    draws = np.stack([pool.sample(np.array([2, 4, 6, 0])) for _ in range(50)])
    assert set(draws[:, 0]) == {0}  # row 1 is a control of group 0 but not a candidate
    assert set(draws[:, 1]) == {3}  # group 1 has no candidate control: falls back to row 3
    assert set(draws[:, 2]) == {5}
    assert set(draws[:, 3]) == {0}  # a control may be its own partner
    assert len(pool.groups_without_controls(np.arange(7))) == 0
    full = ControlPool(covariates, is_control, candidates=np.arange(7))
    assert set(np.concatenate([full.sample(np.array([2])) for _ in range(60)])) == {0, 1}
    no_ctrl = ControlPool(
        covariates,
        np.array([True, True, False, False, False, True, False]),
        candidates=np.arange(7),
    )
    np.testing.assert_array_equal(no_ctrl.groups_without_controls(np.array([0, 4, 6])), [1])
    with pytest.raises(RuntimeError, match="without control"):
        no_ctrl.sample(np.array([4]))


def _drop_controls(adata, mask):
    keep = ~((adata.obs["drug"] == "control").to_numpy() & mask)
    return adata[keep].copy()


def test_group_without_controls_is_named(adata):
    adata = _drop_controls(adata, (adata.obs["cell_line"] == "cell_line_2").to_numpy())
    manager = _manager(adata)
    with pytest.raises(ValueError, match="cell_line='cell_line_2'"):
        FCRDataLoader(manager, pair_controls=True)
    # without pairing (prediction) the same data loads
    assert len(list(FCRDataLoader(manager, batch_size=500))) == 1


def test_group_without_controls_named_with_several_covariates(adata):
    adata = _add_replicate(adata)
    obs = adata.obs
    mask = ((obs["cell_line"] == "cell_line_1") & (obs["replicate"] == "r1")).to_numpy()
    adata = _drop_controls(adata, mask)
    manager = _manager(adata, ["cell_line", "replicate"])
    with pytest.raises(ValueError, match="cell_line='cell_line_1', replicate='r1'") as info:
        FCRDataLoader(manager, pair_controls=True)
    assert "cell_line='cell_line_0'" not in str(info.value)


def test_training_fails_for_a_group_without_controls(adata):
    adata = _drop_controls(adata, (adata.obs["cell_line"] == "cell_line_0").to_numpy())
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    model = FCRModel(adata, n_latent_x=2, n_latent_t=2, n_latent_tx=2, n_hidden=16)
    with pytest.raises(ValueError, match="cell_line='cell_line_0'"):
        model.train(max_epochs=1, enable_progress_bar=False)


@pytest.mark.parametrize("as_sparse", [False, True])
def test_unshuffled_loader_returns_rows_in_order(make_screen, as_sparse):
    adata = make_screen(as_sparse=as_sparse, combinations=[("drug_0", "drug_2")])
    manager = _manager(adata)
    loader = FCRDataLoader(manager, batch_size=37)
    batches = list(loader)
    assert len(batches) == int(np.ceil(adata.n_obs / 37))
    assert "control_X" not in batches[0]
    x = np.concatenate([b["X"].numpy() for b in batches])
    dense = adata.X.toarray() if as_sparse else adata.X
    np.testing.assert_array_equal(x, dense)
    idx = np.concatenate([b["treatment_idx"].numpy() for b in batches])
    dose = np.concatenate([b["treatment_dose"].numpy() for b in batches])
    encoder = TreatmentEncoder.from_labels(list(adata.obs["drug"].cat.categories), "control")
    want_idx, want_dose = encoder.encode(adata.obs["drug"].astype(str), adata.obs["dose"])
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dose, want_dose)
    assert idx.shape == (adata.n_obs, 2)  # combinations: two parts
    combo = (adata.obs["drug"] == "drug_0+drug_2").to_numpy()
    assert (idx[combo] == [0, 2]).all() and (dose[combo] > 0).all()
    control = (adata.obs["drug"] == "control").to_numpy()
    assert (dose[control] == 0).all() and (idx[control] == 4).all()
    covs = np.concatenate([b["extra_categorical_covs"].numpy() for b in batches]).ravel()
    np.testing.assert_array_equal(covs, adata.obs["cell_line"].cat.codes.to_numpy())


@pytest.mark.parametrize("indices", [[5, 3, 9, 3], "mask"])
def test_loader_keeps_the_order_of_given_indices(adata, indices):
    manager = _manager(adata)
    if indices == "mask":
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[[2, 40, 7]] = True
        indices, expected = mask, [2, 7, 40]
    else:
        expected = indices
    loader = FCRDataLoader(manager, indices=indices, batch_size=2)
    x = np.concatenate([b["X"].numpy() for b in loader])
    np.testing.assert_array_equal(x, adata.X[expected])
    np.testing.assert_array_equal(loader.indices, expected)


def test_sparse_x_with_partners(make_screen):
    adata = _with_row_ids(make_screen(as_sparse=True))
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    manager = _manager(adata)
    loader = FCRDataLoader(manager, batch_size=50, shuffle=True, pair_controls=True)
    dense = adata.X.toarray()
    for batch in loader:
        assert isinstance(batch["X"], torch.Tensor) and not batch["X"].is_sparse
        rows = batch["X"][:, 0].numpy().astype(int)
        partners = batch["control_X"][:, 0].numpy().astype(int)
        np.testing.assert_array_equal(batch["X"].numpy(), dense[rows])
        np.testing.assert_array_equal(batch["control_X"].numpy(), dense[partners])
        assert (adata.obs["drug"].to_numpy()[partners] == "control").all()
        lines = adata.obs["cell_line"].to_numpy()
        assert (lines[partners] == lines[rows]).all()


def test_model_trains_on_sparse_x(make_screen, build_model):
    adata = make_screen(as_sparse=True)
    model = build_model(adata, train={"max_epochs": 1})
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert model.get_latent_representation().shape == (adata.n_obs, 7)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    groups=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    seed=st.integers(0, 2**16),
)
def test_control_pool_property(groups, seed):
    """Random groups, controls and candidates: partners are controls of the row's own group,
    taken among the candidates whenever the group has a control there."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    covariates = np.array(groups)[:, None] * np.array([[1, 10]])  # two covariate columns
    is_control = rng.random(n) < 0.4
    candidates = np.flatnonzero(rng.random(n) < 0.7)
    pool = ControlPool(covariates, is_control, candidates)
    rows = np.arange(n)
    without = set(pool.groups_without_controls(rows).tolist())
    has_control = {g for g in set(groups) if is_control[np.array(groups) == g].any()}
    assert {pool.group[i] for i in rows if groups[i] not in has_control} == without
    rows = np.array([i for i in rows if groups[i] in has_control], dtype=np.int64)
    if rows.size == 0:
        return
    torch.manual_seed(seed)
    partners = pool.sample(rows)
    assert is_control[partners].all()
    np.testing.assert_array_equal(np.array(groups)[partners], np.array(groups)[rows])
    in_candidates = np.isin(partners, candidates)
    for row, ok in zip(rows, in_candidates, strict=True):
        group_candidates = is_control[candidates] & (np.array(groups)[candidates] == groups[row])
        assert ok == group_candidates.any()


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last"), [(300, 64, False), (300, 64, True), (5, 8, False)]
)
def test_shuffled_batches_are_torchs_batches(n, batch_size, drop_last):
    # the same batches as BatchSampler(RandomSampler) from the same random numbers, and the
    # same draws of torch's global generator (which also draws the control partners)
    torch.manual_seed(3)
    sampler = ShuffledBatches(n, batch_size=batch_size, drop_last=drop_last)
    ours = [batch.tolist() for epoch in range(2) for batch in sampler]
    after_ours = torch.rand(3)
    torch.manual_seed(3)
    torch_sampler = BatchSampler(RandomSampler(range(n)), batch_size, drop_last)
    theirs = [batch for epoch in range(2) for batch in torch_sampler]
    assert ours == theirs
    assert torch.equal(after_ours, torch.rand(3))
    assert len(sampler) == len(torch_sampler)


def test_all_rows_index_as_an_arange():
    rows, expected = AllRows(10), np.arange(10)
    assert len(rows) == 10
    np.testing.assert_array_equal(np.asarray(rows), expected)
    for key in [slice(2, 7), slice(None, None, 3), slice(8, 20), [3, 1, -1], np.array([0, 9])]:
        got = rows[key]
        np.testing.assert_array_equal(got, expected[key])
        assert got.dtype == np.int64
    with pytest.raises(IndexError):
        rows[[10]]


def test_treatment_encoding_by_chunks(combo_adata, monkeypatch):
    # combinations with per-part string doses: chunks of 7 cells give the whole data's encoding
    manager = _manager(combo_adata)
    encoder = TreatmentEncoder.from_labels(list(combo_adata.obs["drug"].cat.categories), "control")
    want_idx, want_dose = encoder.encode(
        combo_adata.obs["drug"].astype(str), combo_adata.obs["dose"]
    )
    for chunk in (7, 2**16):
        monkeypatch.setattr(pairing, "_ENCODE_CHUNK", chunk)
        treatments = pairing.cell_treatments(manager)
        assert treatments.codes.dtype == np.uint8  # one byte per cell
        idx, dose = treatments.of(np.arange(combo_adata.n_obs))
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(dose, want_dose)


def test_covariate_groups_by_chunks(monkeypatch):
    def factorized(covariates):  # the groups as the pool numbered them before
        group = np.zeros(len(covariates), dtype=np.int64)
        for column in covariates.T:
            codes, uniques = pd.factorize(column)
            group, _ = pd.factorize(group * len(uniques) + codes)
        return group

    rng = np.random.default_rng(0)
    for chunk in (7, 2**16):
        monkeypatch.setattr(pairing, "_ENCODE_CHUNK", chunk)
        for width in (1, 2, 3):
            covariates = rng.integers(0, 4, (200, width)).astype(np.int8)
            np.testing.assert_array_equal(
                pairing.covariate_groups(covariates), factorized(covariates)
            )
    assert (pairing.covariate_groups(np.zeros((4, 0))) == 0).all()
