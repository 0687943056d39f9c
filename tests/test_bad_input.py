"""Messy input: matrix formats, foreign setups, broken saved models, data never written to.

Each test here is a row of the table in docs/bad_input.md (with the tests of test_setup.py,
test_model.py and test_pairing.py it cites).
"""

import sys
import tempfile
import threading
import types
import typing
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse
from scvi.model.base import BaseModelClass

from fcr_tools import FCRModel, __version__
from fcr_tools._pairing import registered_treatments, treatment_encoder
from fcr_tools._registration import RegisteredSetup, stand_in
from fcr_tools._saving import MODEL_FORMAT, check_saved_model

SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
TINY = {"n_latent_x": 2, "n_latent_t": 3, "n_latent_tx": 2, "n_hidden": 16}
ONE_EPOCH = {"max_epochs": 1, "batch_size": 64, "enable_progress_bar": False}
FORMAT = ".".join(map(str, MODEL_FORMAT))


def _setup(adata, **kwargs):
    FCRModel.setup_anndata(adata, **{**SETUP, **kwargs})


def _as(matrix, kind: str, dtype):
    dense = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    dense = dense.astype(dtype)
    return {"dense": dense, "csr": sparse.csr_matrix(dense), "csc": sparse.csc_matrix(dense)}[kind]


def _frozen(data):
    """Everything of an AnnData / MuData, ``_scvi`` entries included, to compare later."""

    def _values(x):
        return x.toarray() if sparse.issparse(x) else np.array(x)

    def _one(a):
        return {
            "is_view": a.is_view,
            "X": None if a.X is None else _values(a.X),
            "X_type": type(a.X),
            "obs": a.obs.copy(),
            "var": a.var.copy(),
            "obsm": {
                k: _values(v) if not isinstance(v, pd.DataFrame) else v.copy()
                for k, v in a.obsm.items()
            },
            "layers": {k: _values(v) for k, v in a.layers.items()},
            "uns": {k: str(v) for k, v in a.uns.items()},
        }

    if isinstance(data, mudata.MuData):
        return {
            "obs": data.obs.copy(),
            "uns": dict(data.uns),
            **{name: _one(mod) for name, mod in data.mod.items()},
        }
    return _one(data)


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, dict):
            _assert_same(value, other)
        elif isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(other, value)
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(other, value)
            assert other.dtype == value.dtype
        else:
            assert other == value, key


# ---------------------------------------------------------------------------- matrix formats
@pytest.mark.parametrize(
    ("kind", "dtype", "likelihood"),
    [
        ("dense", np.float64, "gaussian"),
        ("csr", np.float32, "gaussian"),
        ("csr", np.float64, "gaussian"),
        ("csc", np.float32, "gaussian"),
        ("dense", np.int32, "nb"),
        ("csr", np.int64, "nb"),
    ],
)
def test_matrix_formats_are_accepted(adata, kind, dtype, likelihood, recwarn):
    source = adata.layers["counts"] if likelihood == "nb" else adata.X
    adata.X = _as(source, kind, dtype)
    check = _frozen(adata)
    _setup(adata)
    model = FCRModel(adata, likelihood=likelihood, **TINY)
    model.train(**ONE_EPOCH)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert np.isfinite(model.get_latent_representation()).all()
    pred = model.predict_counterfactual(treatment="drug_1", indices=[0, 1])
    assert pred.X.dtype == np.float32 and np.isfinite(pred.X).all()
    # the user's matrix keeps its type, dtype and values
    assert type(adata.X) is check["X_type"] and adata.X.dtype == dtype
    np.testing.assert_array_equal(_as(adata.X, "dense", dtype), check["X"])


@pytest.mark.parametrize(
    ("kind", "dtype"), [("dense", np.float64), ("csr", np.float32), ("csc", np.float64)]
)
def test_prediction_is_the_same_for_every_format(trained_model, make_screen, kind, dtype):
    expected = trained_model.get_latent_representation()
    other = make_screen()
    other.X = _as(other.X, kind, dtype)
    np.testing.assert_allclose(
        trained_model.get_latent_representation(other), expected, rtol=1e-5, atol=1e-6
    )


def test_csc_input_warns_about_speed(adata):
    adata.X = sparse.csc_matrix(adata.X)
    # scvi-tools' own warning
    with pytest.warns(UserWarning, match=r"faster when sparse matrix is formatted as CSR"):
        _setup(adata)
    assert sparse.isspmatrix_csc(adata.X)  # used as is, not converted


@pytest.mark.parametrize("kind", ["csr", "csc"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_sparse_x_names_the_row(adata, kind, value):
    dense = np.asarray(adata.X).copy()
    dense[7, 4] = value
    adata.X = _as(dense, kind, np.float32)
    with pytest.raises(ValueError, match=r"adata.X contains NaN or infinite values .*row 7\)"):
        _setup(adata)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_nb_errors_name_the_row(adata, kind):
    counts = _as(adata.layers["counts"], kind, np.float32)
    counts[11, 2] = -3.0
    adata.layers["counts"] = counts
    _setup(adata, layer="counts")
    with pytest.raises(ValueError, match=r"negative values \(the first, -3.0, in row 11\)"):
        FCRModel(adata, likelihood="nb", **TINY)
    counts[11, 2] = 2.5
    adata.layers["counts"] = counts
    with pytest.raises(ValueError, match=r"non-integer values \(the first, 2.5, in row 11\)"):
        FCRModel(adata, likelihood="nb", **TINY)


def test_data_edited_after_setup_is_checked_before_training(adata):
    _setup(adata)
    model = FCRModel(adata, **TINY)
    adata.X[5, 0] = np.nan  # after setup, which checked the values
    with pytest.raises(ValueError, match=r"adata.X contains NaN .*row 5"):
        model.train(**ONE_EPOCH)
    assert not model.is_trained


def test_sparse_training_never_densifies_the_whole_matrix(make_screen, monkeypatch):
    adata = make_screen(as_sparse=True)
    assert sparse.isspmatrix_csr(adata.X)
    rows = []
    for name in ("toarray", "todense"):
        original = getattr(sparse.csr_matrix, name)

        def spy(self, *args, _original=original, **kwargs):
            rows.append(self.shape[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(sparse.csr_matrix, name, spy)
    _setup(adata)
    model = FCRModel(adata, **TINY)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    model.get_latent_representation(batch_size=32)
    model.predict_counterfactual(treatment="drug_0", batch_size=32)
    assert rows, "the spy saw no densification"
    # one minibatch and its control partners (read together) at a time, never the whole matrix
    assert max(rows) <= 2 * 32 < adata.n_obs


# ---------------------------------------------------------------------------- foreign setups
def test_anndata_set_up_for_another_model(adata):
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="cell_line")
    with pytest.raises(ValueError, match=r"set up your AnnData with FCRModel.setup_anndata"):
        FCRModel(adata, **TINY)


@pytest.mark.parametrize("when", ["before the model", "after the model"])
def test_another_models_setup_does_not_leak_into_fcr(adata, when):
    """SCVI's setup on the same object overwrites the shared registry entries; FCR re-registers."""
    adata.obs["plate"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "p1", "p2"))
    _setup(adata)
    if when == "after the model":
        model = FCRModel(adata, **TINY)
    scvi.model.SCVI.setup_anndata(adata, layer="counts", categorical_covariate_keys=["plate"])
    assert list(adata.obsm["_scvi_extra_categorical_covs"].columns) == ["plate"]
    if when == "before the model":
        model = FCRModel(adata, **TINY)
    model.train(**ONE_EPOCH)
    assert list(adata.obsm["_scvi_extra_categorical_covs"].columns) == ["cell_line"]
    batch = next(iter(model._loader(adata, indices=np.arange(20))))
    np.testing.assert_array_equal(
        batch["extra_categorical_covs"].numpy().ravel(),
        adata.obs["cell_line"].cat.codes.to_numpy()[:20],
    )


# ---------------------------------------------------------------------------- data left alone
def test_prediction_writes_nothing_into_new_data(trained_model, make_screen):
    other = make_screen()
    before = _frozen(other)
    trained_model.get_latent_representation(other)
    pred = trained_model.predict_counterfactual(other, treatment="drug_2", indices=[3, 1])
    trained_model.predict_counterfactual(other, treatment="drug_2", mode="abduction")
    _assert_same(before, _frozen(other))
    assert list(pred.obs_names) == list(other.obs_names[[3, 1]])
    assert not any(str(c).startswith("_scvi") for c in pred.obs.columns)


def test_prediction_on_a_copy_of_the_training_data(trained_model, adata):
    """A copy carries the training data's registry ids; scvi-tools would rewrite them."""
    copy = adata[adata.obs["drug"] == "control"].copy()
    before = _frozen(copy)
    latent = trained_model.get_latent_representation(copy)
    _assert_same(before, _frozen(copy))
    mask = (adata.obs["drug"] == "control").to_numpy()
    np.testing.assert_allclose(
        latent, trained_model.get_latent_representation()[mask], rtol=1e-5, atol=1e-6
    )


def test_prediction_on_a_view_leaves_the_view_alone(trained_model, make_screen):
    parent = make_screen()
    view = parent[parent.obs["cell_line"] == "cell_line_1"]
    assert view.is_view
    before_parent, before_view = _frozen(parent), _frozen(view)
    latent = trained_model.get_latent_representation(view)
    pred = trained_model.predict_counterfactual(view, treatment="drug_0")
    assert view.is_view  # scvi-tools would have turned it into an actual AnnData
    _assert_same(before_view, _frozen(view))
    _assert_same(before_parent, _frozen(parent))
    assert latent.shape[0] == pred.n_obs == view.n_obs
    assert list(pred.obs_names) == list(view.obs_names)


def test_prediction_writes_nothing_into_a_new_mudata(adata, make_screen):
    modalities = dict.fromkeys(("rna_layer", "treatment_key", "dose_key", "covariate_keys"), "rna")
    mdata = mudata.MuData({"rna": adata})
    FCRModel.setup_mudata(mdata, modalities=modalities, **SETUP)
    model = FCRModel(mdata, **TINY)
    model.train(**ONE_EPOCH)
    other = mudata.MuData({"rna": make_screen()})
    before = _frozen(other)
    latent = model.get_latent_representation(other)
    pred = model.predict_counterfactual(other, treatment="drug_1", indices=[2, 0])
    _assert_same(before, _frozen(other))
    np.testing.assert_allclose(latent, model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    assert list(pred.obs_names) == list(other.obs_names[[2, 0]])


def test_registered_setup_says_where_either_setup_reads_from(adata):
    setup = RegisteredSetup({**SETUP, "control_treatment": "control", "layer": "counts"})
    assert (setup.is_mudata, setup.layer, setup.covariate_keys) == (False, "counts", ["cell_line"])
    assert setup.expression_data(adata) is adata
    assert setup.obs(adata, "dose_key") is adata.obs
    assert setup.genes(adata.var_names) is adata.var_names
    mdata = mudata.MuData({"rna": adata})
    mods = {"rna_layer": "rna", "covariate_keys": "rna"}
    setup = RegisteredSetup({**SETUP, "rna_layer": "counts", "modalities": mods})
    assert (setup.is_mudata, setup.layer, setup.expression_modality) == (True, "counts", "rna")
    assert setup.expression_data(mdata) is mdata.mod["rna"]
    assert setup.obs(mdata, "covariate_keys") is mdata.mod["rna"].obs
    assert setup.obs(mdata, "treatment_key") is mdata.obs  # not mapped: the MuData's own obs
    np.testing.assert_array_equal(
        np.ravel(setup.column(mdata, "covariate_keys", "cell_line")), adata.obs["cell_line"]
    )
    assert setup.genes({"rna": adata.var_names}) is adata.var_names


def test_stand_in_reads_the_expression_layer_of_either_setup(adata):
    mods = {"rna_layer": "rna"}
    proxy = stand_in(mudata.MuData({"rna": adata}), {"rna_layer": "counts", "modalities": mods})
    assert list(proxy.mod["rna"].layers) == ["counts"]
    assert proxy.mod["rna"].layers["counts"] is adata.layers["counts"]  # shared, not copied
    assert list(stand_in(adata, {"layer": "counts"}).layers) == ["counts"]
    with pytest.raises(ValueError, match=r"set up from a MuData .* got an AnnData"):
        stand_in(adata, {"rna_layer": "counts", "modalities": mods})


def test_repeated_predictions_keep_a_bounded_number_of_registrations(trained_model, make_screen):
    other = make_screen()
    for _ in range(12):
        trained_model.get_latent_representation(other, indices=[0])
    store = trained_model._per_instance_manager_store[trained_model.id]
    assert len(store) <= 1 + 8  # the training data and the last few stand-ins


def test_new_data_with_nan_values(trained_model, make_screen):
    other = make_screen()
    other.X[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"adata.X contains NaN .*row 4"):
        trained_model.predict_counterfactual(other, treatment="drug_1")


def test_new_data_without_the_dose_column(trained_model, make_screen):
    other = make_screen()
    del other.obs["dose"]
    with pytest.raises(KeyError, match=r"'dose' \(the model's dose_key\)"):
        trained_model.get_latent_representation(other)


# ---------------------------------------------------------------------------- saved models
@pytest.fixture
def saved(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(path, save_anndata=True)
    return path


def _edit_saved(path, edit):
    file = path / "model.pt"
    content = torch.load(file, map_location="cpu", weights_only=False)
    edit(content)
    torch.save(content, file)


def test_saved_model_records_the_version(saved, trained_model):
    loaded = FCRModel.load(saved)
    assert loaded.fcr_version_ == {"fcr_tools": __version__, "model_format": FORMAT}
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained_model.get_latent_representation()
    )


def test_load_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*nowhere.*does not exist"):
        FCRModel.load(tmp_path / "nowhere")


def test_load_a_directory_without_model_file(saved):
    (saved / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.pt' not found.*adata.h5ad"):
        FCRModel.load(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_a_corrupt_model_file(saved, damage):
    file = saved / "model.pt"
    content = file.read_bytes()
    file.write_bytes(
        {"truncated": content[: len(content) // 2], "garbage": b"not a model", "empty": b""}[
            damage
        ]
    )
    with pytest.raises(ValueError, match=r"Could not read the saved model .*model.pt.*truncated"):
        FCRModel.load(saved)


def test_load_a_whole_model_file_these_libraries_cannot_read(saved, monkeypatch):
    """As a model.pt pickled with newer libraries (e.g. pandas 3's string dtype under pandas 2)."""
    gone = types.ModuleType("fcr_newer_library")

    class Newer:
        pass

    Newer.__module__, Newer.__qualname__ = gone.__name__, "Newer"
    gone.Newer = Newer
    monkeypatch.setitem(sys.modules, gone.__name__, gone)
    _edit_saved(saved, lambda content: content["attr_dict"].update(newer_=Newer()))
    monkeypatch.delitem(sys.modules, gone.__name__)
    with pytest.raises(
        ValueError,
        match=r"Could not read the saved model .*model.pt' with the libraries installed here "
        r"\(torch .*, pandas .*, scvi-tools .*\): ModuleNotFoundError.*saved with newer versions",
    ):
        FCRModel.load(saved)


def test_load_a_file_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match=r"not a model saved by scvi-tools"):
        FCRModel.load(tmp_path / "m")


def test_load_a_truncated_saved_anndata(saved, make_screen):
    file = saved / "adata.h5ad"
    content = file.read_bytes()
    file.write_bytes(content[: len(content) // 3])
    with pytest.raises(ValueError, match=r"adata.h5ad.*truncated or corrupt.*Pass adata="):
        FCRModel.load(saved)
    assert FCRModel.load(saved, adata=make_screen()).is_trained  # the way out


def test_load_a_model_of_another_class(adata, tmp_path):
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    scvi.model.SCVI(adata, n_latent=2, n_hidden=8).save(tmp_path / "scvi")
    with pytest.raises(ValueError, match=r"holds a SCVI model, not an FCRModel"):
        FCRModel.load(tmp_path / "scvi", adata=adata)


@pytest.mark.parametrize(
    "model_format", [f"{MODEL_FORMAT[0] + 1}.0", f"{MODEL_FORMAT[0]}.{MODEL_FORMAT[1] + 1}"]
)
def test_load_a_model_saved_by_a_newer_version(saved, model_format):
    newer = {"fcr_tools": "9.1.0", "model_format": model_format}
    _edit_saved(saved, lambda c: c["attr_dict"].update(fcr_version_=newer))
    installed = rf"fcr_tools {__version__} \(model format {FORMAT}\)"
    with pytest.raises(
        ValueError,
        match=rf"saved by fcr_tools 9.1.0 \(model format {model_format}\), a newer format "
        rf"than this fcr_tools reads \({installed}\).*Upgrade",
    ):
        FCRModel.load(saved)


MAJOR, MINOR = MODEL_FORMAT


@pytest.mark.parametrize(
    ("model_format", "readable"),
    [
        (f"{MAJOR}.0", True),
        (f"{MAJOR}.{MINOR}", True),
        (f"{MAJOR}.{MINOR + 1}", False),
        (f"{MAJOR + 1}.0", False),
        (f"{MAJOR - 1}.{MINOR + 5}", False),
        (None, True),  # saved before formats were recorded: read as format 1.0
    ],
)
def test_model_format_policy(saved, model_format, readable):
    """Same major and a minor <= the reader's loads; a newer minor or another major fails,
    naming the saved format, the version that wrote it and the installed one."""
    record = None if model_format is None else {"fcr_tools": "0.0.7", "model_format": model_format}
    _edit_saved(saved, lambda c: c["attr_dict"].update(fcr_version_=record))
    if readable:
        assert check_saved_model(saved, None, True, ["FCRModel"])[0] == record
        return
    with pytest.raises(ValueError) as error:
        check_saved_model(saved, None, True, ["FCRModel"])
    message = str(error.value)
    assert f"fcr_tools 0.0.7 (model format {model_format})" in message
    assert f"fcr_tools {__version__} (model format {FORMAT})" in message
    assert str(saved) in message


def test_check_saved_model_returns_what_it_declares(saved, trained_model):
    info, arguments = check_saved_model(saved, None, True, ["FCRModel"])
    assert info == {"fcr_tools": __version__, "model_format": FORMAT}
    assert arguments["n_latent_t"] == trained_model.module.n_latent["t"]
    assert typing.get_type_hints(check_saved_model)["return"] == tuple[dict | None, dict]


def test_load_a_compatible_model_saved_before_versions_were_recorded(saved, trained_model):
    _edit_saved(saved, lambda c: c["attr_dict"].pop("fcr_version_"))
    loaded = FCRModel.load(saved)
    assert loaded.fcr_version_ is None
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained_model.get_latent_representation()
    )
    loaded.save(saved, overwrite=True)  # saving again records this version
    assert FCRModel.load(saved).fcr_version_["fcr_tools"] == __version__


def test_load_a_model_saved_before_the_interaction_prior_argument(adata, build_model, tmp_path):
    """Format 1.0 models had the MLP interaction prior and no argument for it."""
    model = build_model(adata, interaction_prior="mlp")
    path = tmp_path / "old"
    model.save(path, save_anndata=True)

    def edit(content):
        attrs = content["attr_dict"]
        attrs["init_params_"]["non_kwargs"].pop("interaction_prior")
        attrs["fcr_version_"] = {"fcr_tools": "0.1.0", "model_format": "1.0"}

    _edit_saved(path, edit)
    loaded = FCRModel.load(path)
    assert loaded.module.interaction_prior == "mlp"
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    # and the next model built in this session has the current default again
    assert build_model(adata.copy(), train=False).module.interaction_prior == "linear"


def test_load_a_model_saved_by_0_1_with_its_architecture(adata, build_model, tmp_path):
    """Format 1.1 models (fcr_tools 0.1) had free posteriors, the shared interaction context,
    the MLP decoder and the MLP treatment prior, and none of those arguments."""
    from fcr_tools._saving import ARGUMENTS_BEFORE

    old = {
        name: ARGUMENTS_BEFORE[name] for name in ARGUMENTS_BEFORE if name != "interaction_prior"
    }
    model = build_model(adata, **old)
    path = tmp_path / "v01"
    model.save(path, save_anndata=True)

    def edit(content):
        attrs = content["attr_dict"]
        for name in old:
            attrs["init_params_"]["non_kwargs"].pop(name)
        attrs["fcr_version_"] = {"fcr_tools": "0.1.0", "model_format": "1.1"}

    _edit_saved(path, edit)
    loaded = FCRModel.load(path)
    module = loaded.module
    assert (module.posterior, module.interaction_context, module.decoder_kind) == (
        "free",
        "shared",
        "mlp",
    )
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    controls = adata[adata.obs["drug"] == "control"].copy()
    np.testing.assert_array_equal(
        loaded.predict_counterfactual(controls, treatment="drug_1").X,
        model.predict_counterfactual(controls, treatment="drug_1").X,
    )
    # saved again, the model records the values it was rebuilt with
    loaded.save(path, overwrite=True)
    assert FCRModel.load(path).module.decoder_kind == "mlp"
    assert build_model(adata.copy(), train=False).module.decoder_kind == "skip"


def _save_as_format_1_0(model, path, **edits):
    """Save ``model`` as fcr_tools 0.1.0 did in format 1.0: no interaction_prior argument."""

    def edit(content):
        attrs = content["attr_dict"]
        attrs["init_params_"]["non_kwargs"].pop("interaction_prior")
        attrs["init_params_"]["non_kwargs"].update(edits)
        attrs["fcr_version_"] = {"fcr_tools": "0.1.0", "model_format": "1.0"}

    model.save(path, save_anndata=True)
    _edit_saved(path, edit)
    return path


def test_loads_of_models_of_different_formats_in_a_row_leave_no_state(
    adata, build_model, saved, tmp_path, monkeypatch
):
    """Loading a model of an older format changes nothing for the next model, nor the save."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    old = _save_as_format_1_0(
        build_model(adata, train=False, interaction_prior="mlp"), tmp_path / "old"
    )
    before = (old / "model.pt").read_bytes()
    for path, prior in [(old, "mlp"), (saved, "linear"), (old, "mlp"), (saved, "linear")]:
        assert FCRModel.load(path).module.interaction_prior == prior
    assert FCRModel.load(old, adata=adata.copy()).module.interaction_prior == "mlp"
    assert (old / "model.pt").read_bytes() == before  # the saved model is never written to
    assert list(scratch.iterdir()) == []  # nor is anything left behind
    assert build_model(adata.copy(), train=False).module.interaction_prior == "linear"


def test_a_failed_load_of_an_older_model_leaves_no_state(
    adata, build_model, saved, tmp_path, monkeypatch
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = build_model(adata, train=False, interaction_prior="mlp")
    broken = _save_as_format_1_0(model, tmp_path / "broken", n_hidden=0)
    with pytest.raises(ValueError, match="n_hidden must be a positive integer"):
        FCRModel.load(broken)  # raised by __init__, while scvi-tools constructs the model
    assert list(scratch.iterdir()) == []
    assert FCRModel.load(saved).module.interaction_prior == "linear"
    assert build_model(adata.copy(), train=False).module.interaction_prior == "linear"


def test_loads_in_threads_build_each_model_with_its_own_arguments(
    adata, build_model, saved, tmp_path, monkeypatch
):
    """Two loads whose constructions overlap (an older format's and the current one's)."""
    other = adata.copy()
    # scvi-tools keeps the setups of all models of a class by the data's uuid: data saved with
    # both models under one uuid would collide there (scvi-tools' state, not FCRModel's)
    del other.uns["_scvi_uuid"]
    old = _save_as_format_1_0(
        build_model(other, train=False, interaction_prior="mlp"), tmp_path / "old"
    )
    barrier = threading.Barrier(2, timeout=60)
    construct = BaseModelClass.__init__

    def overlapping(self, *args, **kwargs):
        barrier.wait()  # both loads are inside their construction before either goes on
        construct(self, *args, **kwargs)

    monkeypatch.setattr(BaseModelClass, "__init__", overlapping)
    with ThreadPoolExecutor(max_workers=2) as pool:
        models = list(pool.map(FCRModel.load, [old, saved]))
    assert [m.module.interaction_prior for m in models] == ["mlp", "linear"]


def test_load_an_incompatible_older_model_names_the_versions(saved):
    def edit(content):
        content["attr_dict"].pop("fcr_version_")
        state = content["model_state_dict"]
        key = next(iter(state))
        state[f"old_{key}"] = state.pop(key)  # a parameter renamed since

    _edit_saved(saved, edit)
    with pytest.raises(
        ValueError,
        match=rf"before 0.1.0 \(no version recorded.*cannot be loaded by fcr_tools {__version__}",
    ):
        FCRModel.load(saved)


# ---------------------------------------------------------------------------- property-based
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples in every run (CI)
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORMATS = ["float32", "float64", "int64", "csr", "csc"]


@st.composite
def screens(draw):
    """A small random AnnData with a treatment column, 0-2 covariates and maybe doses."""
    n_obs = draw(st.integers(4, 30))
    n_vars = draw(st.integers(1, 5))
    control = draw(st.sampled_from(["control", "DMSO", "ctrl 0", "vehicle"]))
    drugs = draw(
        st.lists(st.sampled_from(["A", "B", "drug-1", "Ω"]), min_size=1, max_size=3, unique=True)
    )
    if len(drugs) > 1 and draw(st.booleans()):
        drugs.append(f"{drugs[0]}+{drugs[1]}")
    labels = draw(st.lists(st.sampled_from([control, *drugs]), min_size=n_obs, max_size=n_obs))
    labels[:2] = [control, drugs[0]]  # at least one control and one treated cell
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    categorical = draw(st.booleans())
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    obs["treatment"] = pd.Categorical(labels) if categorical else np.array(labels, dtype=object)
    covariates = [f"cov{j}" for j in range(draw(st.integers(0, 2)))]
    for key in covariates:
        values = rng.choice(["x", "y", "z"][: draw(st.integers(1, 3))], n_obs)
        obs[key] = pd.Categorical(values) if categorical else values.astype(object)
    dose_key = draw(st.sampled_from([None, "dose"]))
    if dose_key:
        doses = np.round(rng.uniform(0.0, 10.0, n_obs), 3)
        if draw(st.booleans()):  # doses of controls are ignored, NaN included
            doses[np.asarray(labels) == control] = np.nan
        obs["dose"] = doses
    kind = draw(st.sampled_from(FORMATS))
    counts = rng.poisson(2.0, (n_obs, n_vars))
    X = {
        "float32": counts.astype(np.float32),
        "float64": np.log1p(counts.astype(np.float64)),
        "int64": counts.astype(np.int64),
        "csr": sparse.csr_matrix(counts.astype(np.float32)),
        "csc": sparse.csc_matrix(counts.astype(np.float32)),
    }[kind]
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
    setup = {
        "treatment_key": "treatment",
        "control_treatment": control,
        "covariate_keys": covariates or None,
        "dose_key": dose_key,
    }
    return adata, setup


@pytest.mark.filterwarnings("ignore")
@PROPERTY
@given(screen=screens())
def test_setup_of_random_anndata_registers_and_adds_only_registry_entries(screen, snapshot):
    adata, setup = screen
    check = snapshot(adata)
    FCRModel.setup_anndata(adata, **setup)
    check(adata)  # nothing but scvi-tools' registry entries was added
    manager = FCRModel._get_most_recent_anndata_manager(adata, required=True)
    idx, dose = registered_treatments(manager)
    encoder = treatment_encoder(manager.registry)
    labels = adata.obs["treatment"].astype(str).to_numpy()
    control = labels == setup["control_treatment"]
    assert (idx[control] == encoder.n_components).all() and (dose[control] == 0).all()
    names = np.array([*encoder.components, ""])
    decoded = ["+".join(p for p in names[row] if p) for row in idx[~control]]
    assert sorted(decoded) == sorted(
        "+".join(sorted(label.split("+"), key=encoder.components.index))
        for label in labels[~control]
    )
    treated_dose = dose[~control][idx[~control] < encoder.n_components]
    if setup["dose_key"] is None:
        assert (treated_dose == 1.0).all()
    else:
        assert (treated_dose >= 0).all()
    for key in setup["covariate_keys"] or []:
        state = manager.get_state_registry("extra_categorical_covs")
        codes = manager.get_from_registry("extra_categorical_covs")[key].to_numpy()
        mapping = np.asarray(state.mappings[key], dtype=object)
        np.testing.assert_array_equal(mapping[codes], adata.obs[key].astype(str).to_numpy())


DEFECTS = [
    "control absent",
    "misspelled key",
    "only controls",
    "NaN in X",
    "negative dose",
    "missing covariate value",
]


@pytest.mark.filterwarnings("ignore")
@PROPERTY
@given(screens(), st.sampled_from(DEFECTS), st.integers(0, 1000))
def test_setup_of_random_bad_anndata_names_the_culprit(screen, defect, where):
    adata, setup = screen
    row = where % adata.n_obs
    if defect == "control absent":
        setup["control_treatment"] = "untreated"
        error, match = ValueError, r"Control category 'untreated' not found in obs\['treatment'\]"
    elif defect == "misspelled key":
        setup["treatment_key"] = "treatmnt"
        error, match = KeyError, r"treatment_key='treatmnt'.*Did you mean \['treatment'\]"
    elif defect == "only controls":
        adata.obs["treatment"] = np.array([setup["control_treatment"]] * adata.n_obs, dtype=object)
        error, match = ValueError, r"contains only the control"
    elif defect == "NaN in X":
        dense = np.asarray(adata.X.toarray() if sparse.issparse(adata.X) else adata.X, float)
        dense[row, where % adata.n_vars] = np.nan
        adata.X = type(adata.X)(dense) if sparse.issparse(adata.X) else dense
        error, match = ValueError, rf"adata.X contains NaN or infinite values .*in row {row}\)"
    elif defect == "negative dose":
        treated = np.flatnonzero(
            adata.obs["treatment"].astype(str).to_numpy() != setup["control_treatment"]
        )
        doses = np.ones(adata.n_obs)
        doses[treated[where % len(treated)]] = -2.5
        adata.obs["dose"], setup["dose_key"] = doses, "dose"
        error, match = ValueError, r"Dose -2.5 in obs\['dose'\] .* is negative"
    else:
        adata.obs["cov_nan"] = np.where(np.arange(adata.n_obs) == row, None, "x").astype(object)
        setup["covariate_keys"] = [*(setup["covariate_keys"] or []), "cov_nan"]
        error, match = ValueError, r"Covariate obs\['cov_nan'\] has 1 missing"
    before = _frozen(adata)
    with pytest.raises(error, match=match):
        FCRModel.setup_anndata(adata, **setup)
    _assert_same(before, _frozen(adata))  # a failed setup writes nothing at all
