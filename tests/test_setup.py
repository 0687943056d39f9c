"""FCRModel.setup_anndata / setup_mudata: accepted layouts, side effects and input errors."""

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest

from fcr_tools import FCRModel, FCRTrainingPlan
from fcr_tools import _validation as validation
from fcr_tools._pairing import registered_treatments

MODALITIES = {
    "rna_layer": "rna",
    "treatment_key": "rna",
    "dose_key": "rna",
    "covariate_keys": "rna",
}


def _setup(adata, **kwargs):
    args = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
    FCRModel.setup_anndata(adata, **{**args, **kwargs})


def _add_replicate(adata):
    rank = adata.obs.groupby("condition", observed=True).cumcount().to_numpy()
    adata.obs["replicate"] = pd.Categorical(np.where(rank % 2 == 0, "r0", "r1"))
    return adata


def _model(adata, **kwargs):
    return FCRModel(adata, n_latent_x=2, n_latent_t=2, n_latent_tx=2, n_hidden=16, **kwargs)


def _manager(model):
    return model.adata_manager


# ---------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("covariate_keys", ["cell_line", ["cell_line"]])
def test_one_covariate_as_str_or_list(adata, covariate_keys, capsys):
    _setup(adata, covariate_keys=covariate_keys)
    model = _model(adata)
    assert model.covariate_keys == ["cell_line"]
    assert model.module.n_cats_per_cov == [3]
    assert model.treatment_key == "drug" and model.dose_key == "dose"
    assert model.treatment_encoder.components == ("drug_0", "drug_1", "drug_2", "drug_3")
    print(model)  # scvi-tools' repr prints the summary (and returns "")
    assert "covariates: cell_line" in capsys.readouterr().out


def test_several_covariates(adata, build_model):
    _add_replicate(adata)
    model = build_model(
        adata, setup={"covariate_keys": ["cell_line", "replicate"]}, train={"max_epochs": 1}
    )
    assert model.covariate_keys == ["cell_line", "replicate"]
    assert model.module.n_cats_per_cov == [3, 2]
    assert len(model.module.covariate_classifiers) == 2
    assert "covariate_ce_train" in model.history
    assert model.get_latent_representation().shape == (adata.n_obs, 7)


def test_without_covariates(adata, build_model):
    model = build_model(adata, setup={"covariate_keys": None}, train={"max_epochs": 1})
    assert model.covariate_keys == []
    assert model.module.n_cats_per_cov == []
    assert "covariate_ce_train" not in model.history
    assert "_scvi_extra_categorical_covs" not in adata.obsm
    assert np.isfinite(model.get_latent_representation(block="x")).all()
    pred = model.predict_counterfactual(treatment="drug_2", dose=0.3, indices=[0, 1])
    assert pred.shape == (2, adata.n_vars)


def test_without_dose_treated_cells_get_dose_one(adata, build_model):
    model = build_model(adata, setup={"dose_key": None}, train={"max_epochs": 1})
    assert model.dose_key is None
    _, dose = registered_treatments(_manager(model))
    treated = (adata.obs["drug"] != "control").to_numpy()
    np.testing.assert_array_equal(dose[treated, 0], 1.0)
    np.testing.assert_array_equal(dose[~treated, 0], 0.0)
    pred = model.predict_counterfactual(treatment="drug_1", indices=[3])
    assert "dose" in pred.obs  # the user's own column, untouched
    assert pred.obs["dose"].iloc[0] == adata.obs["dose"].iloc[3]


def test_with_dose_registered_doses(adata):
    _setup(adata)
    idx, dose = registered_treatments(_manager(_model(adata)))
    np.testing.assert_allclose(dose[:, 0], adata.obs["dose"].to_numpy(), rtol=1e-6)
    codes = {"control": 4, "drug_0": 0, "drug_1": 1, "drug_2": 2, "drug_3": 3}
    np.testing.assert_array_equal(idx[:, 0], adata.obs["drug"].map(codes).to_numpy())


def test_combinations_with_string_doses(combo_adata, build_model):
    adata = combo_adata
    assert set(adata.obs.loc[adata.obs["drug"] == "drug_0+drug_1", "dose"]) == {
        "0.3+0.3",
        "1.0+1.0",
    }
    model = build_model(adata, train={"max_epochs": 1})
    encoder = model.treatment_encoder
    assert encoder.components == ("drug_0", "drug_1", "drug_2", "drug_3")
    assert encoder.max_parts == 2
    idx, dose = registered_treatments(_manager(model))
    combo = (adata.obs["drug"] == "drug_0+drug_1").to_numpy()
    assert (idx[combo] == [0, 1]).all()
    assert set(dose[combo, 0]) == {np.float32(0.3), np.float32(1.0)}
    np.testing.assert_array_equal(dose[combo, 0], dose[combo, 1])
    single = (adata.obs["drug"] == "drug_2").to_numpy()
    assert (idx[single, 1] == 4).all() and (dose[single, 1] == 0).all()


def test_layer_counts(adata, build_model):
    model = build_model(adata, setup={"layer": "counts"}, likelihood="nb", train={"max_epochs": 1})
    assert model.registry_["setup_args"]["layer"] == "counts"
    batch = next(iter(model._loader(adata, indices=[0, 1, 2])))
    np.testing.assert_array_equal(batch["X"].numpy(), adata.layers["counts"][:3])


@pytest.mark.parametrize("dtype", [object, str])  # str: pandas >= 3 gives a string dtype
def test_object_dtype_columns_are_accepted_and_kept(adata, snapshot, dtype):
    adata.obs["drug"] = adata.obs["drug"].astype(dtype)
    adata.obs["cell_line"] = adata.obs["cell_line"].astype(dtype)
    before = adata.obs["drug"].dtype
    assert not isinstance(before, pd.CategoricalDtype)
    check = snapshot(adata)
    _setup(adata)
    check(adata)
    assert adata.obs["drug"].dtype == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"covariate_keys": None, "dose_key": None},
        {"layer": "counts"},
        {"covariate_keys": ["cell_line", "replicate"]},
    ],
)
def test_setup_adds_only_scvi_entries(adata, snapshot, kwargs):
    _add_replicate(adata)
    check = snapshot(adata)
    _setup(adata, **kwargs)
    check(adata)
    assert any(str(k).startswith("_scvi") for k in adata.uns)


def test_setup_mudata_with_modalities(adata, build_model, snapshot):
    rna = adata
    mdata = mudata.MuData({"rna": rna})
    check = snapshot(rna)
    FCRModel.setup_mudata(
        mdata,
        treatment_key="drug",
        dose_key="dose",
        covariate_keys="cell_line",
        rna_layer="counts",
        modalities=MODALITIES,
    )
    check(mdata["rna"])
    model = _model(mdata, likelihood="nb")
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert model.covariate_keys == ["cell_line"]
    latent = model.get_latent_representation(block="t")
    assert latent.shape == (mdata.n_obs, 2)
    pred = model.predict_counterfactual(treatment="drug_3", dose=1.0, indices=[0, 5])
    assert list(pred.obs_names) == list(mdata.obs_names[[0, 5]])
    assert list(pred.var_names) == list(rna.var_names)
    assert (pred.obs["drug"] == "drug_3").all()


def test_setup_mudata_with_columns_in_the_global_obs(adata, build_model):
    mdata = mudata.MuData({"rna": adata})
    for key in ("drug", "dose", "cell_line"):
        mdata.obs[key] = adata.obs[key].to_numpy()
    FCRModel.setup_mudata(
        mdata,
        treatment_key="drug",
        dose_key="dose",
        covariate_keys="cell_line",
        modalities={"rna_layer": "rna"},
    )
    model = _model(mdata)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    _, dose = registered_treatments(_manager(model))
    np.testing.assert_allclose(dose[:, 0], adata.obs["dose"].to_numpy(), rtol=1e-6)
    assert model.get_latent_representation().shape == (adata.n_obs, 6)


def test_setup_mudata_errors(adata):
    mdata = mudata.MuData({"rna": adata})
    with pytest.raises(ValueError, match="rna_layer"):
        FCRModel.setup_mudata(mdata, treatment_key="drug", modalities={"treatment_key": "rna"})
    with pytest.raises(KeyError, match=r"'drugs'.*Did you mean"):
        FCRModel.setup_mudata(mdata, treatment_key="drugs", modalities=MODALITIES)
    with pytest.raises(ValueError, match="treatment_key and dose_key"):
        FCRModel.setup_mudata(
            mdata,
            treatment_key="drug",
            dose_key="dose",
            modalities={"rna_layer": "rna", "dose_key": "rna"},
        )
    adata.X[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"mdata\['rna'\]\.X.*NaN"):
        FCRModel.setup_mudata(mdata, treatment_key="drug", modalities=MODALITIES)


def test_setup_mudata_nb_checks_the_registered_modality(adata):
    mdata = mudata.MuData({"rna": adata})
    FCRModel.setup_mudata(mdata, treatment_key="drug", modalities=MODALITIES)
    with pytest.raises(ValueError, match=r"mdata\['rna'\]\.X has non-integer"):
        _model(mdata, likelihood="nb")


# ---------------------------------------------------------------------------- bad input
def test_missing_treatment_column(adata):
    with pytest.raises(KeyError, match="treatment_key='perturbation'"):
        _setup(adata, treatment_key="perturbation")


def test_misspelled_treatment_column_suggests(adata):
    with pytest.raises(KeyError, match=r"'drugs'.*Did you mean \['drug'\]"):
        _setup(adata, treatment_key="drugs")


def test_missing_covariate_column(adata):
    with pytest.raises(KeyError, match="covariate_keys='donor'"):
        _setup(adata, covariate_keys=["cell_line", "donor"])


def test_missing_dose_column(adata):
    with pytest.raises(KeyError, match="dose_key='concentration'"):
        _setup(adata, dose_key="concentration")


def test_missing_layer(adata):
    # the layers named, not X (which anndata >= 0.13 lists among them as None)
    expected = r"layer='count' not found in adata.layers \(\['counts', 'expected'\]\)"
    with pytest.raises(KeyError, match=expected):
        _setup(adata, layer="count")


def test_control_category_absent(adata):
    with pytest.raises(ValueError, match=r"'DMSO'.*obs\['drug'\]"):
        _setup(adata, control_treatment="DMSO")


@pytest.mark.parametrize("keep_categories", [False, True])
def test_only_controls(adata, keep_categories):
    controls = adata[adata.obs["drug"] == "control"].copy()
    if keep_categories:  # the drugs stay categories of the column, without cells
        categories = adata.obs["drug"].cat.categories
        controls.obs["drug"] = pd.Categorical(controls.obs["drug"].astype(str), categories)
    with pytest.raises(ValueError, match=r"obs\['drug'\] contains only the control 'control'"):
        _setup(controls)


@pytest.mark.parametrize("categorical", [True, False])
def test_nan_treatment_label(adata, categorical):
    labels = adata.obs["drug"] if categorical else adata.obs["drug"].astype(object)
    labels = labels.copy()
    labels.iloc[7] = np.nan
    adata.obs["drug"] = labels
    with pytest.raises(ValueError, match=r"obs\['drug'\] has 1 missing"):
        _setup(adata)


def test_nan_covariate(adata):
    lines = adata.obs["cell_line"].copy()
    lines.iloc[3] = np.nan
    adata.obs["cell_line"] = lines
    with pytest.raises(ValueError, match=r"obs\['cell_line'\] has 1 missing"):
        _setup(adata)


def _set_dose(adata, value, treated=True):
    doses = adata.obs["dose"].astype(object)
    row = np.flatnonzero((adata.obs["drug"] != "control").to_numpy() == treated)[0]
    doses.iloc[row] = value
    adata.obs["dose"] = doses
    return adata.obs["drug"].iloc[row]


def test_non_numeric_dose(adata):
    drug = _set_dose(adata, "high")
    with pytest.raises(ValueError, match=f"'high' in obs\\['dose'\\] for treatment '{drug}'"):
        _setup(adata)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_dose_on_a_treated_cell(adata, value):
    drug = _set_dose(adata, value)
    with pytest.raises(ValueError, match=f"in obs\\['dose'\\] for treatment '{drug}' is NaN"):
        _setup(adata)


def test_nan_dose_on_a_control_is_fine(adata):
    adata.obs.loc[adata.obs["drug"] == "control", "dose"] = np.nan
    _setup(adata)
    _, dose = registered_treatments(_manager(_model(adata)))
    assert np.isfinite(dose).all()


def test_negative_dose(adata):
    _set_dose(adata, -0.5)
    with pytest.raises(ValueError, match=r"-0.5 in obs\['dose'\].*negative"):
        _setup(adata)


def test_boolean_dose(adata):
    adata.obs["dose"] = adata.obs["dose"] > 0
    with pytest.raises(ValueError, match=r"obs\['dose'\] is boolean"):
        _setup(adata)


def test_combination_with_control(adata):
    labels = adata.obs["drug"].astype(str).to_numpy()
    labels[0] = "control+drug_1"
    adata.obs["drug"] = pd.Categorical(labels)
    with pytest.raises(ValueError, match=r"'control\+drug_1'"):
        _setup(adata)


def test_treatment_as_covariate(adata):
    with pytest.raises(ValueError, match="'drug' is both"):
        _setup(adata, covariate_keys=["cell_line", "drug"])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_x(adata, value):
    adata.X[5, 3] = value
    with pytest.raises(ValueError, match=r"adata.X contains NaN or infinite"):
        _setup(adata)


def test_nan_in_layer(adata):
    adata.layers["counts"][2, 2] = np.nan
    _setup(adata)  # the layer is not used
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] contains NaN"):
        _setup(adata, layer="counts")


def test_nb_rejects_negative_values(adata):
    adata.layers["shifted"] = adata.layers["counts"] - 1.0
    _setup(adata, layer="shifted")
    _model(adata, likelihood="gaussian")  # fine for a gaussian model
    with pytest.raises(ValueError, match=r"adata.layers\['shifted'\] has negative values"):
        _model(adata, likelihood="nb")


def test_nb_rejects_non_integer_values(adata):
    _setup(adata)  # adata.X is log-normalised
    with pytest.raises(ValueError, match=r"adata.X has non-integer values.*layer='counts'"):
        _model(adata, likelihood="nb")


def test_nb_accepts_integer_counts_of_any_dtype(adata):
    adata.layers["int_counts"] = adata.layers["counts"].astype(np.int32)
    _setup(adata, layer="int_counts")
    assert _model(adata, likelihood="nb").module.likelihood == "nb"


@pytest.mark.parametrize("subset", ["cells", "genes"])
def test_empty_anndata(adata, subset):
    empty = adata[:0].copy() if subset == "cells" else adata[:, :0].copy()
    shape = "\\(0, 30\\)" if subset == "cells" else "\\(240, 0\\)"
    with pytest.raises(ValueError, match=f"adata has shape {shape}"):
        _setup(empty)


def test_view_is_rejected(adata):
    view = adata[:10]
    with pytest.raises(ValueError, match="adata is a view"):
        _setup(view)


def test_bad_block_name(trained_model):
    with pytest.raises(ValueError, match=r"block must be .* got 'z'"):
        trained_model.get_latent_representation(block="z")
    with pytest.raises(ValueError, match=r"got \['x', 'zz'\]"):
        trained_model.get_latent_representation(block=["x", "zz"])


def test_bad_likelihood_name(adata):
    _setup(adata)
    with pytest.raises(ValueError, match="likelihood must be 'gaussian' or 'nb', not 'poisson'"):
        _model(adata, likelihood="poisson")


@pytest.mark.parametrize("name", ["n_latent_x", "n_latent_t", "n_latent_tx", "n_hidden"])
def test_bad_sizes(adata, name):
    _setup(adata)
    kwargs = {"n_latent_x": 2, "n_latent_t": 2, "n_latent_tx": 2, "n_hidden": 16, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        FCRModel(adata, **kwargs)


def test_bad_plan_weight(trained_model):
    with pytest.raises(ValueError, match="adversarial_weight"):
        trained_model.train(
            max_epochs=1, enable_progress_bar=False, plan_kwargs={"adversarial_weight": -1.0}
        )


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(2.0), np.int64(3), 0, 1.5])
def test_plan_weight_accepts_any_finite_real_number(adata, build_model, value):
    plan = FCRTrainingPlan(build_model(adata, train=False).module, similarity_weight=value)
    assert plan.loss_kwargs["similarity_weight"] == float(value)
    assert type(plan.loss_kwargs["similarity_weight"]) is float


@pytest.mark.parametrize(
    "value", [True, np.bool_(False), -1.0, np.float32(-0.5), float("nan"), np.inf, "1", None]
)
def test_plan_weight_rejects_bools_and_non_finite_or_negative_values(adata, build_model, value):
    module = build_model(adata, train=False).module
    with pytest.raises(ValueError, match=r"similarity_weight must be a finite real number >= 0"):
        FCRTrainingPlan(module, similarity_weight=value)


def test_unregistered_anndata_is_rejected():
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        FCRModel(adata)


def test_setup_checks_by_chunks_report_the_first_bad_pair(adata, monkeypatch):
    # bad doses on two treated cells: checked a few cells at a time, the error is the one of
    # the whole data at once (the first offending pair, in the order of the cells)
    doses = adata.obs["dose"].astype(object)
    treated = np.flatnonzero((adata.obs["drug"] != "control").to_numpy())
    doses.iloc[treated[9]] = "high"
    doses.iloc[treated[3]] = -0.5
    adata.obs["dose"] = doses
    messages = []
    for chunk in (2**16, 5):
        monkeypatch.setattr(validation, "_CHUNK_CELLS", chunk)
        with pytest.raises(ValueError, match="negative") as error:
            _setup(adata.copy())
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    # and the labels, in order of first appearance, as without chunks
    monkeypatch.setattr(validation, "_CHUNK_CELLS", 5)
    labels = adata.obs["drug"].astype(str).to_numpy()
    labels[7] = "control+drug_1"
    labels[2] = "drug_0+drug_0"
    adata.obs["drug"] = labels
    with pytest.raises(ValueError, match="'drug_0\\+drug_0' names the same part twice"):
        _setup(adata)
