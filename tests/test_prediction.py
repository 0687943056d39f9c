"""The public inference path and grid prediction: one pass over the cells for many targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from conftest import SETUP, TINY, TRAIN, small_screen
from fcr_tools import FCRModel


def _train(likelihood: str, tmp_path_factory) -> tuple[FCRModel, object]:
    adata = small_screen()
    setup = {**SETUP, "layer": "counts"} if likelihood == "nb" else SETUP
    FCRModel.setup_anndata(adata, **setup)
    scvi.settings.seed = 0
    old_dir = scvi.settings.logging_dir
    scvi.settings.logging_dir = tmp_path_factory.mktemp("scvi_log")
    model = FCRModel(adata, likelihood=likelihood, **TINY)
    model.train(**TRAIN)
    scvi.settings.logging_dir = old_dir
    return model, adata


# trained once per module and only read by the tests below
@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    return _train("gaussian", tmp_path_factory)


@pytest.fixture(scope="module")
def nb(tmp_path_factory):
    return _train("nb", tmp_path_factory)


def _controls(adata):
    return adata[adata.obs["drug"] == "control"].copy()


# ---------------------------------------------------------------------------- inference path
def test_inference_batches_cover_the_cells_in_order(gaussian):
    model, adata = gaussian
    cells = [7, 3, 20, 11]
    batches = list(model.inference_batches(adata, indices=cells, batch_size=3))
    assert [len(b["indices"]) for b in batches] == [3, 1]
    assert np.concatenate([b["indices"] for b in batches]).tolist() == cells
    z_t = torch.cat([b["qz_t"].loc for b in batches]).numpy()
    expected = model.get_latent_representation(adata, indices=cells, block="t")
    np.testing.assert_allclose(z_t, expected, rtol=1e-6, atol=1e-6)


def test_default_inference_batches_hold_about_4_million_values(gaussian, monkeypatch):
    import fcr_tools._model as model_module

    model, adata = gaussian
    n_genes = adata.n_vars
    # few genes: every cell in one minibatch
    assert len(list(model.inference_batches(adata))) == 1
    # the budget in values decides the cells per minibatch, never fewer than the minimum
    monkeypatch.setattr(model_module, "INFERENCE_VALUES", 10 * n_genes)
    monkeypatch.setattr(model_module, "INFERENCE_BATCH_SIZE", 4)
    sizes = [len(b["indices"]) for b in model.inference_batches(adata)]
    assert sizes[0] == 10 and sum(sizes) == adata.n_obs
    monkeypatch.setattr(model_module, "INFERENCE_BATCH_SIZE", 16)
    assert len(next(iter(model.inference_batches(adata)))["indices"]) == 16
    pred = model.predict_counterfactual(_controls(adata), treatment="drug_2", dose=0.3)
    monkeypatch.undo()
    whole = model.predict_counterfactual(_controls(adata), treatment="drug_2", dose=0.3)
    np.testing.assert_allclose(pred.X, whole.X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["gaussian", "nb"])
def test_decode_of_counterfactual_latents_is_the_prediction(fixture, request):
    model, adata = request.getfixturevalue(fixture)
    controls = _controls(adata)
    parts, normalized = [], []
    for out in model.inference_batches(controls, batch_size=7):
        blocks = model.counterfactual_latents(out, "drug_2", dose=0.3)
        decoded = model.decode(blocks, out)
        parts.append(decoded["mean"].numpy())
        if "normalized" in decoded:
            normalized.append(decoded["normalized"].numpy())
    pred = model.predict_counterfactual(controls, treatment="drug_2", dose=0.3)
    np.testing.assert_allclose(np.concatenate(parts), pred.X, rtol=1e-5, atol=1e-5)
    if fixture == "nb":
        np.testing.assert_allclose(
            np.concatenate(normalized), pred.layers["normalized"], rtol=1e-4, atol=1e-3
        )


def test_counterfactual_latents_checks_its_arguments(gaussian):
    model, adata = gaussian
    out = next(iter(model.inference_batches(adata, indices=[0, 1])))
    with pytest.raises(ValueError, match="'posterior'"):
        model.counterfactual_latents(out, "drug_1", mode="posterior")
    with pytest.raises(ValueError, match="drug_9"):
        model.counterfactual_latents(out, "drug_9")


# ---------------------------------------------------------------------------- grid
@pytest.mark.parametrize("fixture", ["gaussian", "nb"])
def test_grid_of_cells_stacks_the_single_predictions(fixture, request):
    model, adata = request.getfixturevalue(fixture)
    controls = _controls(adata)
    grid = model.predict_grid(
        controls, treatment=["drug_0", "drug_3", "control"], dose=[0.3, 1.0], mode="prior"
    )
    targets = [("drug_0", 0.3), ("drug_0", 1.0), ("drug_3", 0.3), ("drug_3", 1.0)]
    targets.append(("control", None))  # the control once, without a dose
    n = controls.n_obs
    assert grid.shape == (n * len(targets), adata.n_vars)
    assert grid.uns["fcr_counterfactual"]["targets"][-1] == ["control", "0.0"]
    for k, (treatment, dose) in enumerate(targets):
        rows = grid[k * n : (k + 1) * n]
        single = model.predict_counterfactual(controls, treatment, dose=dose, mode="prior")
        np.testing.assert_allclose(rows.X, single.X, rtol=1e-5, atol=1e-5)
        if fixture == "nb":
            np.testing.assert_allclose(
                rows.layers["normalized"], single.layers["normalized"], rtol=1e-4, atol=1e-3
            )
        assert (rows.obs["target"] == k).all()
        assert (rows.obs["drug"] == treatment).all()
        assert (rows.obs["dose"] == (0.0 if dose is None else dose)).all()
        assert list(rows.obs["source_cell"]) == list(controls.obs_names)
        assert list(rows.obs_names) == [f"{c}-{k}" for c in controls.obs_names]
        assert (rows.obs["source_drug"] == "control").all()
    assert list(grid.obs["drug"].cat.categories) == ["drug_0", "drug_3", "control"]


@pytest.mark.parametrize("fixture", ["gaussian", "nb"])
def test_grid_means_are_the_group_means_of_the_cells(fixture, request):
    model, adata = request.getfixturevalue(fixture)
    cells = adata[adata.obs["split"] == "train"].copy()  # controls and treated cells
    means = model.predict_grid(cells, treatment=["drug_1", "drug_2"], dose=1.0, aggregate="mean")
    lines = list(dict.fromkeys(cells.obs["cell_line"].astype(str)))
    assert means.n_obs == 2 * len(lines)
    assert list(means.obs["cell_line"].astype(str)) == lines * 2
    for treatment in ("drug_1", "drug_2"):
        single = model.predict_counterfactual(cells, treatment=treatment, dose=1.0)
        group = single.obs["cell_line"].astype(str).to_numpy()
        expected = pd.DataFrame(single.X).groupby(group).mean().loc[lines].to_numpy()
        rows = means[means.obs["drug"] == treatment]
        np.testing.assert_allclose(rows.X, expected, rtol=1e-4, atol=1e-4)
        counts = pd.Series(group).value_counts().loc[lines].to_numpy()
        assert rows.obs["n_cells"].tolist() == counts.tolist()
        if fixture == "nb":
            norm = pd.DataFrame(single.layers["normalized"]).groupby(group).mean()
            np.testing.assert_allclose(
                rows.layers["normalized"], norm.loc[lines].to_numpy(), rtol=1e-3, atol=1e-2
            )


def test_grid_means_by_other_columns_and_without_covariates(gaussian):
    model, adata = gaussian
    by_line_and_drug = model.predict_grid(
        adata, treatment="drug_0", aggregate="mean", groupby=["cell_line", "drug"]
    )
    pairs = adata.obs[["cell_line", "drug"]].astype(str).drop_duplicates()
    assert by_line_and_drug.n_obs == len(pairs)
    assert by_line_and_drug.obs["n_cells"].sum() == adata.n_obs
    # the target treatment is in "drug", the groups' own in "source_drug"
    assert (by_line_and_drug.obs["drug"] == "drug_0").all()
    observed = by_line_and_drug.obs[["cell_line", "source_drug"]].astype(str)
    assert sorted(map(tuple, observed.to_numpy())) == sorted(map(tuple, pairs.to_numpy()))
    everything = model.predict_grid(adata, treatment="drug_0", aggregate="mean", groupby=[])
    assert everything.n_obs == 1 and everything.obs["n_cells"].iloc[0] == adata.n_obs
    np.testing.assert_allclose(
        everything.X[0],
        model.predict_counterfactual(adata, treatment="drug_0").X.mean(0),
        rtol=1e-4,
        atol=1e-4,
    )


def test_grid_rows_per_cell_whatever_the_obs_columns(gaussian):
    model, adata = gaussian
    controls = _controls(adata)
    controls.obs["n_cells"] = 1  # a user column named like the group counts
    grid = model.predict_grid(controls, treatment="drug_0", dose=[0.3, 1.0])
    assert grid.n_obs == 2 * controls.n_obs
    assert list(grid.obs["source_cell"][: controls.n_obs]) == list(controls.obs_names)


def test_grid_errors_name_the_problem(gaussian):
    model, adata = gaussian
    with pytest.raises(ValueError, match="aggregate must be 'cells' or 'mean'"):
        model.predict_grid(adata, treatment="drug_0", aggregate="median")
    with pytest.raises(ValueError, match="groupby is used with aggregate='mean'"):
        model.predict_grid(adata, treatment="drug_0", groupby="cell_line")
    with pytest.raises(KeyError, match="'batch'"):
        model.predict_grid(adata, treatment="drug_0", aggregate="mean", groupby="batch")
    with pytest.raises(ValueError, match="treatment is required"):
        model.predict_grid(adata, treatment=[])
    with pytest.raises(ValueError, match="dose is an empty list"):
        model.predict_grid(adata, treatment="drug_0", dose=[])
    with pytest.raises(ValueError, match="drug_9"):
        model.predict_grid(adata, treatment=["drug_0", "drug_9"])
    with pytest.raises(ValueError, match="'posterior'"):
        model.predict_grid(adata, treatment="drug_0", mode="posterior")


def test_grid_leaves_the_data_alone(gaussian, snapshot):
    model, adata = gaussian
    controls = _controls(adata)
    check = snapshot(controls)
    model.predict_grid(controls, treatment=["drug_0", "drug_1"], dose=[0.3, 1.0])
    model.predict_grid(controls, treatment="drug_0", aggregate="mean")
    check(controls)


# ---------------------------------------------------------------------------- ELBO, summary
def test_get_elbo_is_the_cells_own_negative_elbo(gaussian, adata, build_model):
    model, data = gaussian
    torch.manual_seed(0)
    parts = model.get_elbo(data, return_parts=True)
    assert set(parts) == {"elbo", "reconstruction_loss", "kl_local"}
    assert parts["elbo"] == pytest.approx(parts["reconstruction_loss"] + parts["kl_local"])
    # another set of cells, the same random draws: another mean
    torch.manual_seed(1)
    first = model.get_elbo(data, indices=range(10), batch_size=10)
    torch.manual_seed(1)
    both = model.get_elbo(data, indices=range(20), batch_size=10)
    assert np.isfinite(both) and both != first
    assert model.get_elbo(data, indices=range(10), n_samples=3, return_parts=True)["kl_local"] >= 0
    # training lowers it: an untrained model of the same size fits worse
    untrained = build_model(adata, train=False)
    assert untrained.get_elbo() > model.get_elbo(data)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        model.get_elbo(n_samples=0)


def test_summary_says_whether_the_model_is_trained(gaussian, adata, build_model):
    model, _ = gaussian
    assert "FCR" in model.summary and model.summary.endswith("(trained)")
    assert build_model(adata, train=False).summary.endswith("(not trained)")
