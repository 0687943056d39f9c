"""FCRModel end to end: training, latents, IO, counterfactuals and data hygiene."""

import anndata as ad
import mudata
import numpy as np
import pytest
import scvi
from lightning.pytorch.callbacks import EarlyStopping

from fcr_tools import FCRModel
from fcr_tools._objective import LOSS_TERMS

# logged under _train and _validation by a model trained with the default weights
HISTORY_TERMS = [
    "nll_cell",
    "kl_cell",
    *(metric for term in LOSS_TERMS for metric in term.metrics),
    "elbo",
    "reconstruction_loss",
    "kl_local",
    "elbo_partner",
    "reconstruction_loss_partner",
    "kl_local_partner",
]
WIDTHS = {"x": 2, "t": 3, "tx": 2}  # the TINY model of conftest


def _history(model, key):
    return model.history[key].to_numpy(dtype=float).ravel()


def _dense(matrix):
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_training_decreases_the_loss(adata, build_model, likelihood):
    setup = {"layer": "counts"} if likelihood == "nb" else {}
    model = build_model(
        adata, setup=setup, likelihood=likelihood, train={"max_epochs": 5, "batch_size": 64}
    )
    assert model.is_trained
    for key in ("train_loss", "nll_cell_train", "elbo_train", "validation_loss"):
        values = _history(model, key)
        assert len(values) == 5, key
        assert np.isfinite(values).all(), key
    # a fixed seed: these fall by 3-10% over 5 epochs
    nll = _history(model, "nll_cell_train")
    assert nll[-1] < 0.995 * nll[0]
    loss = _history(model, "train_loss")
    assert loss[-1] < loss[0]
    assert _history(model, "validation_loss")[-1] < _history(model, "validation_loss")[0]


def test_history_has_every_term(trained_model):
    history = trained_model.history
    assert "train_loss" in history and "validation_loss" in history
    for term in HISTORY_TERMS:
        for split in ("train", "validation"):
            key = f"{term}_{split}"
            assert key in history, key
            values = _history(trained_model, key)
            assert len(values) == 2 and np.isfinite(values).all(), key
    assert "discriminator_loss_train" in history
    accuracy = _history(trained_model, "discriminator_accuracy_train")
    assert ((accuracy >= 0) & (accuracy <= 1)).all()


def test_logged_elbo_is_the_cells_own(trained_model):
    """elbo_* / reconstruction_loss_* / kl_local_* leave the control partners out."""
    for split in ("train", "validation"):

        def h(term, split=split):
            return _history(trained_model, f"{term}_{split}")

        np.testing.assert_allclose(h("reconstruction_loss"), h("nll_cell"), rtol=1e-4)
        np.testing.assert_allclose(h("kl_local"), h("kl_cell"), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(h("elbo"), h("nll_cell") + h("kl_cell"), rtol=1e-4)
        np.testing.assert_allclose(
            h("elbo_partner"), h("reconstruction_loss_partner") + h("kl_local_partner"), rtol=1e-4
        )


def test_metrics_are_logged_once_per_epoch(adata, build_model, monkeypatch):
    """Epoch means, logged at the epoch's end: no logging call per training step."""
    from collections import Counter

    from fcr_tools._training_plan import FCRTrainingPlan

    names = []
    log = FCRTrainingPlan.log

    def counting_log(self, name, *args, **kwargs):
        names.append(name)
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(FCRTrainingPlan, "log", counting_log)
    model = build_model(adata, train={"max_epochs": 3, "batch_size": 16})
    assert model.trainer.num_training_batches > 3  # several steps per epoch
    assert set(Counter(names).values()) == {3}  # every name once per epoch
    assert {"kl_weight", "train_loss", "elbo_train", "elbo_validation"} <= set(names)
    assert _history(model, "kl_weight").tolist() == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="on_step=True is not supported"):
        model.train(max_epochs=1, plan_kwargs={"on_step": True})


def test_partner_metrics_follow_control_weight(adata, build_model):
    model = build_model(adata, train={"plan_kwargs": {"control_weight": 0.0}})
    assert "elbo_train" in model.history
    assert not [key for key in model.history if "partner" in key]


def test_plan_kwargs_turn_terms_off(adata, build_model):
    model = build_model(
        adata,
        train={"plan_kwargs": {"adversarial_weight": 0.0, "similarity_weight": 0.0}},
    )
    assert "adversarial_train" not in model.history
    assert "discriminator_loss_train" not in model.history  # discriminators not trained
    assert "similarity_validation" not in model.history
    assert "treatment_ce_train" in model.history


def test_training_without_validation_cells(adata, build_model):
    model = build_model(adata, train={"train_size": 1.0})
    assert "train_loss" in model.history
    assert "validation_loss" not in model.history


def test_early_stopping_runs_and_stops(adata, build_model):
    model = build_model(
        adata,
        train={
            "max_epochs": 10,
            "early_stopping": True,
            "early_stopping_patience": 1,
            # no epoch can improve validation_loss by this much: stop after two epochs
            "early_stopping_min_delta": 1e9,
        },
    )
    assert len(_history(model, "validation_loss")) == 2
    assert len(_history(model, "train_loss")) == 2
    # it watches the validation cells' own negative ELBO, not the whole objective
    (callback,) = [c for c in model.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert callback.monitor == "elbo_validation"


def test_early_stopping_monitor_can_be_chosen(adata, build_model):
    model = build_model(
        adata,
        train={
            "early_stopping": True,
            "early_stopping_monitor": "validation_loss",
        },
    )
    (callback,) = [c for c in model.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert callback.monitor == "validation_loss"


# ---------------------------------------------------------------------------- latents
def test_latent_shapes_per_block(trained_model, adata):
    model = trained_model
    blocks = {b: model.get_latent_representation(block=b) for b in WIDTHS}
    for block, width in WIDTHS.items():
        assert blocks[block].shape == (adata.n_obs, width)
        assert np.isfinite(blocks[block]).all()
    full = model.get_latent_representation()
    assert full.shape == (adata.n_obs, sum(WIDTHS.values()))
    np.testing.assert_allclose(
        full, np.concatenate([blocks["x"], blocks["t"], blocks["tx"]], 1), rtol=1e-6
    )
    pair = model.get_latent_representation(block=["tx", "x"])
    np.testing.assert_allclose(pair, np.concatenate([blocks["tx"], blocks["x"]], 1), rtol=1e-6)
    subset = model.get_latent_representation(indices=[7, 2, 5], batch_size=2)
    np.testing.assert_allclose(subset, full[[7, 2, 5]], rtol=1e-5, atol=1e-6)


def test_write_latents(trained_model, adata):
    trained_model.write_latents()
    full = trained_model.get_latent_representation()
    start = 0
    for block, width in WIDTHS.items():
        key = f"X_fcr_{block}"
        assert adata.obsm[key].shape == (adata.n_obs, width)
        np.testing.assert_allclose(adata.obsm[key], full[:, start : start + width], rtol=1e-6)
        start += width
    trained_model.write_latents(prefix="emb")
    assert {"emb_x", "emb_t", "emb_tx"} <= set(adata.obsm)
    np.testing.assert_array_equal(adata.obsm["emb_t"], adata.obsm["X_fcr_t"])


def test_write_latents_to_another_anndata(trained_model, make_screen):
    other = make_screen()
    trained_model.write_latents(other, prefix="z")
    for block, width in WIDTHS.items():
        assert other.obsm[f"z_{block}"].shape == (other.n_obs, width)
    assert "z_x" not in trained_model.adata.obsm
    # the same cells: the same latents as in the training data
    np.testing.assert_allclose(
        other.obsm["z_tx"], trained_model.get_latent_representation(block="tx"), rtol=1e-5
    )


def test_give_mean(trained_model):
    mean_1 = trained_model.get_latent_representation(give_mean=True)
    mean_2 = trained_model.get_latent_representation(give_mean=True)
    np.testing.assert_array_equal(mean_1, mean_2)
    sample = trained_model.get_latent_representation(give_mean=False)
    assert sample.shape == mean_1.shape and np.isfinite(sample).all()
    assert not np.allclose(sample, mean_1)
    assert np.abs(sample - mean_1).mean() < 5.0  # samples around the mean


def test_reproducible_with_the_same_seed(make_screen, build_model):
    a, b, c = make_screen(), make_screen(), make_screen()
    first = build_model(a)
    second = build_model(b)
    np.testing.assert_array_equal(
        first.get_latent_representation(), second.get_latent_representation()
    )
    np.testing.assert_array_equal(_history(first, "train_loss"), _history(second, "train_loss"))
    FCRModel.setup_anndata(c, treatment_key="drug", dose_key="dose", covariate_keys="cell_line")
    scvi.settings.seed = 1
    other = FCRModel(
        c, n_latent_x=2, n_latent_t=3, n_latent_tx=2, n_hidden=16, n_covariate_embed=4
    )
    other.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    assert not np.allclose(first.get_latent_representation(), other.get_latent_representation())


def test_repr_mentions_the_model_and_likelihood(adata, build_model, capsys):
    model = build_model(adata, setup={"layer": "counts"}, likelihood="nb", train=False)
    print(model)
    out = capsys.readouterr().out
    assert "FCRModel" in out and "nb likelihood" in out
    assert "Not Trained" in out


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("save_anndata", [True, False])
def test_save_load_round_trip(trained_model, make_screen, tmp_path, save_anndata):
    path = tmp_path / "model"
    trained_model.save(path, save_anndata=save_anndata)
    if save_anndata:
        loaded = FCRModel.load(path)
    else:
        loaded = FCRModel.load(path, adata=make_screen())  # the same cells, simulated again
    assert loaded.is_trained
    assert loaded.module.likelihood == "gaussian"
    assert loaded.treatment_encoder == trained_model.treatment_encoder
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained_model.get_latent_representation()
    )
    expected = trained_model.predict_counterfactual(treatment="drug_2", dose=0.3, indices=[0, 1])
    got = loaded.predict_counterfactual(treatment="drug_2", dose=0.3, indices=[0, 1])
    np.testing.assert_array_equal(got.X, expected.X)


def test_load_without_anndata_then_predict(trained_model, make_screen, tmp_path):
    trained_model.save(tmp_path / "m")
    with pytest.warns(UserWarning, match="without anndata"):
        loaded = FCRModel.load(tmp_path / "m")
    assert loaded.adata is None
    np.testing.assert_array_equal(
        loaded.get_latent_representation(make_screen()),
        trained_model.get_latent_representation(),
    )
    with pytest.raises(ValueError, match="'cell_line_3'"):
        FCRModel.load(tmp_path / "m").get_latent_representation(make_screen(n_cell_lines=4))
    with pytest.raises(ValueError, match="loaded without data: pass adata"):
        FCRModel.load(tmp_path / "m").predict_counterfactual(treatment="drug_1")


def test_empty_indices_are_refused(trained_model):
    with pytest.raises(ValueError, match="indices is empty"):
        trained_model.get_latent_representation(indices=[])
    with pytest.raises(ValueError, match="indices is empty"):
        trained_model.predict_counterfactual(treatment="drug_1", indices=[])


def test_counterfactual_to_control_records_dose_zero(trained_model):
    pred = trained_model.predict_counterfactual(treatment="control", indices=[0, 1])
    assert list(pred.obs["dose"]) == [0.0, 0.0]
    assert pred.uns["fcr_counterfactual"]["dose"] == "0.0"
    treated = trained_model.predict_counterfactual(treatment="drug_1", indices=[0])
    assert treated.obs["dose"].iloc[0] == 1.0


def test_load_nb_model(adata, build_model, make_screen, tmp_path):
    model = build_model(adata, setup={"layer": "counts"}, likelihood="nb")
    model.save(tmp_path / "nb")
    loaded = FCRModel.load(tmp_path / "nb", adata=make_screen())
    assert loaded.module.likelihood == "nb"
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_load_onto_different_number_of_genes_raises(trained_model, make_screen, tmp_path):
    trained_model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes"):
        FCRModel.load(tmp_path / "m", adata=make_screen(n_genes=31))


@pytest.mark.parametrize("change", ["renamed", "reordered"])
def test_load_onto_different_genes_raises(trained_model, make_screen, tmp_path, change):
    trained_model.save(tmp_path / "m")
    other = make_screen()
    if change == "renamed":
        other.var_names = [f"other_{i}" for i in range(other.n_vars)]
    else:
        other = other[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes"):
        FCRModel.load(tmp_path / "m", adata=other)


# ---------------------------------------------------------------------------- counterfactuals
def test_counterfactual_of_a_pair_never_seen_in_training(make_screen, build_model):
    adata = make_screen(n_holdout_pairs=1)
    (pair,) = adata.uns["fcr_simulation"]["holdout_pairs"]
    line, drug = pair.split("|")
    train = adata[adata.obs["split"] == "train"].copy()
    seen = (train.obs["cell_line"] == line) & (train.obs["drug"] == drug)
    assert not seen.any()
    model = build_model(train)

    controls = adata[(adata.obs["cell_line"] == line) & (adata.obs["drug"] == "control")].copy()
    pred = model.predict_counterfactual(controls, treatment=drug, dose=1.0)
    assert isinstance(pred, ad.AnnData)
    assert pred.shape == controls.shape
    assert list(pred.obs_names) == list(controls.obs_names)
    assert list(pred.var_names) == list(controls.var_names)
    assert (pred.obs["drug"] == drug).all()
    assert (pred.obs["dose"] == 1.0).all()
    assert (pred.obs["source_drug"] == "control").all()
    assert (pred.obs["cell_line"] == line).all()
    assert not any(str(c).startswith("_scvi") for c in pred.obs.columns)
    assert pred.X.dtype == np.float32 and np.isfinite(pred.X).all()
    assert pred.uns["fcr_counterfactual"] == {
        "treatment": drug,
        "dose": "1.0",
        "mode": "abduction",
        "likelihood": "gaussian",
    }
    # the prediction moves the controls: it is not their observed expression
    assert not np.allclose(pred.X, _dense(controls.X), atol=1e-2)


def test_counterfactual_modes_and_errors(trained_model):
    prior = trained_model.predict_counterfactual(
        treatment="drug_1", dose=0.3, indices=[0, 1, 2], mode="prior"
    )
    abduction = trained_model.predict_counterfactual(
        treatment="drug_1", dose=0.3, indices=[0, 1, 2], mode="abduction"
    )
    assert abduction.uns["fcr_counterfactual"]["mode"] == "abduction"
    assert not np.allclose(prior.X, abduction.X)
    other_dose = trained_model.predict_counterfactual(
        treatment="drug_1", dose=1.0, indices=[0], mode="prior"
    )
    assert not np.allclose(prior.X[0], other_dose.X[0])
    with pytest.raises(ValueError, match="'posterior'"):
        trained_model.predict_counterfactual(treatment="drug_1", mode="posterior")
    with pytest.raises(ValueError, match="treatment is required"):
        trained_model.predict_counterfactual()
    with pytest.raises(ValueError, match=r"-1.0 for treatment 'drug_1' is negative"):
        trained_model.predict_counterfactual(treatment="drug_1", dose=-1.0)


def test_counterfactual_keeps_the_order_of_indices(trained_model, adata):
    pred = trained_model.predict_counterfactual(treatment="drug_0", indices=[9, 4, 6])
    assert list(pred.obs_names) == list(adata.obs_names[[9, 4, 6]])
    assert list(pred.obs["source_drug"]) == list(adata.obs["drug"].iloc[[9, 4, 6]])
    assert (pred.obs["dose"] == 1.0).all()  # dose=None means 1.0


def test_counterfactual_of_a_combination(combo_adata, build_model):
    model = build_model(combo_adata)
    controls = np.flatnonzero(combo_adata.obs["drug"] == "control")[:10]
    combo = model.predict_counterfactual(
        treatment="drug_0+drug_1", dose="1.0+0.3", indices=controls
    )
    assert combo.shape == (10, combo_adata.n_vars)
    assert np.isfinite(combo.X).all()
    assert (combo.obs["drug"] == "drug_0+drug_1").all()
    assert (combo.obs["dose"] == "1.0+0.3").all()
    single = model.predict_counterfactual(treatment="drug_0", dose=1.0, indices=controls)
    assert not np.allclose(combo.X, single.X)
    # parts in the other order with their doses: the same treatment vector
    swapped = model.predict_counterfactual(
        treatment="drug_1+drug_0", dose="0.3+1.0", indices=controls
    )
    np.testing.assert_allclose(swapped.X, combo.X, rtol=1e-5, atol=1e-5)
    # an unmeasured combination of measured drugs
    unseen = model.predict_counterfactual(treatment="drug_2+drug_3", dose=0.3, indices=controls)
    assert np.isfinite(unseen.X).all()
    with pytest.raises(ValueError, match="3 doses"):
        model.predict_counterfactual(treatment="drug_0+drug_1", dose="1+1+1")


def test_nb_counterfactual_scales(adata, build_model):
    model = build_model(adata, setup={"layer": "counts"}, likelihood="nb")
    pred = model.predict_counterfactual(treatment="drug_3", dose=0.3)
    library = _dense(adata.layers["counts"]).sum(1)
    np.testing.assert_allclose(pred.X.sum(1), library, rtol=1e-4)
    assert (pred.X >= 0).all()
    normalized = pred.layers["normalized"]
    np.testing.assert_allclose(normalized.sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(normalized, pred.X / library[:, None] * 1e4, rtol=1e-3, atol=1e-3)
    assert pred.uns["fcr_counterfactual"]["likelihood"] == "nb"


def test_gaussian_counterfactual_has_no_normalized_layer(trained_model):
    pred = trained_model.predict_counterfactual(treatment="control", indices=[0, 1])
    assert "normalized" not in pred.layers
    assert (pred.obs["drug"] == "control").all()


@pytest.mark.parametrize("treatment", ["drug_9", "drug_0+drug_9"])
def test_unseen_treatment_at_prediction(trained_model, treatment):
    with pytest.raises(ValueError, match="'drug_9'"):
        trained_model.predict_counterfactual(treatment=treatment)


def test_unseen_covariate_category_in_new_data(trained_model, make_screen):
    other = make_screen(n_cell_lines=4)
    with pytest.raises(ValueError, match=r"'cell_line_3' of obs\['cell_line'\]"):
        trained_model.predict_counterfactual(other, treatment="drug_0")
    with pytest.raises(ValueError, match=r"'cell_line_3' of obs\['cell_line'\]"):
        trained_model.get_latent_representation(other)


def test_unseen_treatment_label_in_new_data(trained_model, make_screen):
    other = make_screen(n_treatments=5)
    with pytest.raises(ValueError, match=r"'drug_4' of obs\['drug'\]"):
        trained_model.get_latent_representation(other)


def test_new_data_with_other_genes_or_columns(trained_model, make_screen):
    other = make_screen()
    other.var_names = [f"g{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="lacks 30 of the model's genes"):
        trained_model.get_latent_representation(other)
    other = make_screen()[:, ::-1].copy()
    with pytest.raises(ValueError, match="order"):
        trained_model.get_latent_representation(other)
    other = make_screen()
    del other.obs["cell_line"]
    with pytest.raises(KeyError, match="'cell_line'"):
        trained_model.predict_counterfactual(other, treatment="drug_0")


def test_new_data_with_a_subset_of_categories(trained_model, make_screen):
    full = make_screen()
    subset = full[full.obs["cell_line"] == "cell_line_1"].copy()
    latent = trained_model.get_latent_representation(subset)
    mask = (full.obs["cell_line"] == "cell_line_1").to_numpy()
    np.testing.assert_allclose(
        latent, trained_model.get_latent_representation()[mask], rtol=1e-5, atol=1e-6
    )


def _reorder_lines(adata):
    lines = adata.obs["cell_line"]
    adata.obs["cell_line"] = lines.cat.reorder_categories(list(lines.cat.categories[::-1]))
    return adata


def test_new_data_listing_categories_in_another_order(trained_model, make_screen, tmp_path):
    expected = trained_model.get_latent_representation()
    other = _reorder_lines(make_screen())
    np.testing.assert_allclose(
        trained_model.get_latent_representation(other), expected, rtol=1e-5, atol=1e-6
    )
    # loading a saved model onto such data too
    trained_model.save(tmp_path / "m")
    loaded = FCRModel.load(tmp_path / "m", adata=_reorder_lines(make_screen()))
    np.testing.assert_allclose(loaded.get_latent_representation(), expected, rtol=1e-5, atol=1e-6)
    pred = loaded.predict_counterfactual(treatment="drug_1", indices=[0, 1])
    want = trained_model.predict_counterfactual(treatment="drug_1", indices=[0, 1])
    np.testing.assert_allclose(pred.X, want.X, rtol=1e-5, atol=1e-5)


def test_mudata_for_a_model_set_up_from_an_anndata(trained_model, make_screen):
    with pytest.raises(ValueError, match=r"set up from an AnnData .* got a MuData.*mod\['rna'\]"):
        trained_model.get_latent_representation(mudata.MuData({"rna": make_screen()}))


def test_new_mudata(adata, make_screen, tmp_path):
    modalities = {key: "rna" for key in ("rna_layer", "treatment_key", "dose_key")}
    modalities["covariate_keys"] = "rna"
    mdata = mudata.MuData({"rna": adata})
    FCRModel.setup_mudata(
        mdata,
        treatment_key="drug",
        dose_key="dose",
        covariate_keys="cell_line",
        modalities=modalities,
    )
    model = FCRModel(mdata, n_latent_x=2, n_latent_t=3, n_latent_tx=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    expected = model.get_latent_representation()
    other = mudata.MuData({"rna": _reorder_lines(make_screen())})
    np.testing.assert_allclose(
        model.get_latent_representation(other), expected, rtol=1e-5, atol=1e-6
    )
    pred = model.predict_counterfactual(other, treatment="drug_0", indices=[4, 2])
    assert list(pred.obs_names) == list(other.obs_names[[4, 2]])
    assert (pred.obs["drug"] == "drug_0").all()
    renamed = make_screen()
    renamed.var_names = [f"g{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="lacks 30 of the model's genes"):
        model.get_latent_representation(mudata.MuData({"rna": renamed}))
    with pytest.raises(ValueError, match="'cell_line_3'"):
        model.get_latent_representation(mudata.MuData({"rna": make_screen(n_cell_lines=4)}))
    # an AnnData for a model set up from a MuData: a clear error, not an AttributeError
    with pytest.raises(ValueError, match=r"set up from a MuData .*'rna'.* got an AnnData"):
        model.predict_counterfactual(make_screen(), treatment="drug_0")
    with pytest.raises(ValueError, match=r"lacks the model's expression modality 'rna'"):
        model.get_latent_representation(mudata.MuData({"gex": make_screen()}))
    model.save(tmp_path / "m")
    loaded = FCRModel.load(tmp_path / "m", adata=mudata.MuData({"rna": make_screen()}))
    np.testing.assert_array_equal(loaded.get_latent_representation(), expected)
    with pytest.raises(ValueError, match="lacks 30 of the model's genes"):
        FCRModel.load(tmp_path / "m", adata=mudata.MuData({"rna": renamed}))


# ---------------------------------------------------------------------------- data hygiene
def test_prediction_leaves_the_training_data_alone(trained_model, adata, snapshot):
    check_registered = snapshot(adata)
    obs_columns, uns_keys = list(adata.obs.columns), set(adata.uns)
    trained_model.get_latent_representation()
    trained_model.get_latent_representation(block="t", give_mean=False)
    trained_model.predict_counterfactual(treatment="drug_1", dose=0.3)
    trained_model.predict_counterfactual(treatment="drug_1", mode="abduction", indices=[1])
    check_registered(adata)
    assert list(adata.obs.columns) == obs_columns and set(adata.uns) == uns_keys


def test_prediction_on_new_data_adds_only_registry_keys(trained_model, make_screen, snapshot):
    other = make_screen()
    check = snapshot(other)
    pred = trained_model.predict_counterfactual(other, treatment="drug_2")
    check(other)
    assert pred.obs_names.equals(other.obs_names)
    trained_model.get_latent_representation(other)
    check(other)
    # predicting returns new objects: editing them leaves the source alone
    pred.obs["drug"] = "edited"
    pred.X[:] = 0
    check(other)


def test_prediction_on_a_view_leaves_the_parent_alone(trained_model, make_screen, snapshot):
    parent = make_screen()
    check = snapshot(parent)
    view = parent[:20]
    pred = trained_model.predict_counterfactual(view, treatment="drug_2")
    assert pred.n_obs == 20
    check(parent)


@pytest.mark.parametrize(
    ("prior", "layers"),
    [("linear", ["Linear"]), ("mlp", ["Linear", "LayerNorm", "ReLU", "Linear"])],
)
def test_interaction_priors_train_predict_and_reload(adata, build_model, tmp_path, prior, layers):
    model = build_model(adata, interaction_prior=prior)
    head = model.module.priors["tx"].net
    assert [type(layer).__name__ for layer in head] == layers
    pred = model.predict_counterfactual(treatment="drug_1", dose=1.0)
    assert np.isfinite(pred.X).all()
    model.save(tmp_path / "m", overwrite=True)
    loaded = FCRModel.load(tmp_path / "m", adata=adata)
    assert loaded.module.interaction_prior == prior
    np.testing.assert_allclose(
        loaded.predict_counterfactual(treatment="drug_1", dose=1.0).X, pred.X, rtol=1e-5
    )


def test_default_interaction_prior_is_linear(adata, build_model):
    assert build_model(adata, train=False).module.interaction_prior == "linear"


def test_unknown_interaction_prior_is_rejected(adata, build_model):
    with pytest.raises(ValueError, match="interaction_prior must be 'mlp' or 'linear'"):
        build_model(adata, train=False, interaction_prior="deep")


def test_sample_mode_draws_from_the_target_priors(trained_model):
    import scvi

    kwargs = {"treatment": "drug_1", "dose": 0.3, "indices": list(range(30))}
    prior = trained_model.predict_counterfactual(**kwargs)
    scvi.settings.seed = 3
    first = trained_model.predict_counterfactual(**kwargs, mode="sample")
    scvi.settings.seed = 3
    again = trained_model.predict_counterfactual(**kwargs, mode="sample")
    other = trained_model.predict_counterfactual(**kwargs, mode="sample")
    assert first.uns["fcr_counterfactual"]["mode"] == "sample"
    np.testing.assert_array_equal(first.X, again.X)  # the seed repeats a draw
    assert not np.allclose(first.X, other.X)
    # draws spread the cells around the prior-mean prediction
    assert first.X.std(0).mean() > prior.X.std(0).mean()
