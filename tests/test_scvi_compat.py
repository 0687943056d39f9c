"""The adapter to scvi-tools internals (``fcr_tools._scvi_compat``) against the installed
scvi-tools, and that no other module reaches into scvi-tools' internals."""

import ast
from pathlib import Path

import mudata
import numpy as np
import pandas as pd
import pytest
from scvi.data._utils import get_anndata_attribute

from conftest import SETUP
from fcr_tools import FCRModel
from fcr_tools import _scvi_compat as compat
from fcr_tools._constants import TREATMENT_KEY, X_KEY

PACKAGE = Path(compat.__file__).parent
ADAPTER = Path(compat.__file__).name
# attributes of scvi-tools objects that only the adapter may touch
PRIVATE_ATTRIBUTES = {"_setup_adata_manager_store", "_per_instance_manager_store", "__wrapped__"}


def _private_scvi_uses(source: str) -> list[str]:
    """Imports of private scvi-tools modules or names, and the private attributes, in code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "scvi":
            parts = node.module.split(".")
            names = [alias.name for alias in node.names]
            if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                found.append(f"from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "scvi" and any(p.startswith("_") for p in parts):
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(node.attr)
    return found


def test_the_scan_finds_private_uses():
    source = (
        "from scvi.data._constants import _SCVI_UUID_KEY\n"
        "from scvi.data import _utils\n"
        "import scvi.model.base._save_load\n"
        "from scvi.data import AnnDataManager\n"
        "x = cls._setup_adata_manager_store\n"
        "f = TrainingPlan.compute_and_log_metrics.__wrapped__\n"
    )
    assert _private_scvi_uses(source) == [
        "from scvi.data._constants import _SCVI_UUID_KEY",
        "from scvi.data import _utils",
        "import scvi.model.base._save_load",
        "_setup_adata_manager_store",
        "__wrapped__",
    ]


def test_only_the_adapter_uses_scvi_internals():
    offenders = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != ADAPTER and (uses := _private_scvi_uses(path.read_text()))
    }
    assert offenders == {}, f"use fcr_tools._scvi_compat instead: {offenders}"
    assert _private_scvi_uses((PACKAGE / ADAPTER).read_text())  # the scan sees the adapter's


def test_registry_accessors_read_a_models_registry(trained_model):
    registry = trained_model.registry_
    args = compat.setup_args(registry)
    assert args["treatment_key"] == SETUP["treatment_key"]
    assert args["covariate_keys"] == SETUP["covariate_keys"]
    assert compat.setup_method_name(registry) == "setup_anndata"
    assert compat.saved_model_name(registry) == "FCRModel"
    state = compat.state_registry(registry, TREATMENT_KEY)
    manager_state = trained_model.adata_manager.get_state_registry(TREATMENT_KEY)
    assert list(state["categorical_mapping"]) == list(manager_state.categorical_mapping)
    genes = compat.state_registry(registry, X_KEY)["column_names"]
    assert list(genes) == list(trained_model.adata.var_names)
    assert compat.saved_data_file(registry) == "adata.h5ad"
    assert compat.saved_data_file({"setup_method_name": "setup_mudata"}) == "mdata.h5mu"


def test_obs_column_matches_scvi_tools(adata):
    np.testing.assert_array_equal(
        compat.obs_column(adata, "drug"), get_anndata_attribute(adata, "obs", "drug")
    )
    mdata = mudata.MuData({"rna": adata})
    mdata.obs["batch"] = "b0"
    for key, mod in [("drug", "rna"), ("batch", None)]:
        ours = compat.obs_column(mdata, key, mod_key=mod)
        theirs = get_anndata_attribute(mdata, "obs", key, mod_key=mod)
        assert ours.shape == theirs.shape == (adata.n_obs, 1)
        np.testing.assert_array_equal(ours, theirs)
    for data, key, mod in [(adata, "missing", None), (adata, "drug", "rna"), (mdata, "drug", "x")]:
        with pytest.raises(ValueError) as ours:
            compat.obs_column(data, key, mod_key=mod)
        with pytest.raises(ValueError) as theirs:
            get_anndata_attribute(data, "obs", key, mod_key=mod)
        assert str(ours.value) == str(theirs.value)


def test_manager_stores(trained_model, adata):
    uuid = compat.data_uuid(adata)
    assert uuid is not None
    assert compat.instance_manager(trained_model, uuid) is trained_model.adata_manager
    assert trained_model.get_anndata_manager(adata) is trained_model.adata_manager
    assert compat.data_uuid(adata.copy()[:0].to_memory()) == uuid  # a copy keeps the uns
    assert compat.instance_manager(trained_model, "no such uuid") is None

    compat.forget_setup_manager(FCRModel, uuid)
    assert FCRModel._get_most_recent_anndata_manager(adata) is None
    compat.forget_instance_manager(trained_model, uuid)
    assert compat.instance_manager(trained_model, uuid) is None
    assert trained_model.get_anndata_manager(adata) is None  # scvi-tools agrees
    compat.forget_instance_manager(trained_model, uuid)  # twice is fine


def test_model_file_round_trip(trained_model, tmp_path):
    trained_model.save(tmp_path / "m")
    saved = compat.read_model_file(tmp_path / "m" / compat.MODEL_FILE)
    assert {"attr_dict", "model_state_dict", "var_names"} <= set(saved)
    compat.write_model_file(saved, tmp_path / "copy.pt")
    again = compat.read_model_file(tmp_path / "copy.pt")
    assert set(again) == set(saved)
    init = saved["attr_dict"]["init_params_"]
    arguments = compat.saved_init_arguments(init)
    assert arguments["n_latent_t"] == 3
    assert arguments["likelihood"] == "gaussian"
    extended = compat.saved_init_arguments(compat.add_init_arguments(init, {"new_arg": 1}))
    assert extended == {**arguments, "new_arg": 1}


def test_flat_init_record_of_old_scvi_tools():
    init = {"n_latent_t": 3, "kwargs": {"extra": 1}}
    assert compat.saved_init_arguments(init) == {"n_latent_t": 3}
    assert compat.saved_init_arguments(compat.add_init_arguments(init, {"a": 2})) == {
        "n_latent_t": 3,
        "a": 2,
    }
    assert compat.saved_init_arguments(None) == {}


def test_portable_history_has_object_labels():
    table = pd.DataFrame({"elbo_train": [1.0, 0.5]}, index=pd.Index([0, 1], name="epoch"))
    table.columns = table.columns.astype("string")  # pandas 3's default for labels
    history = {"elbo_train": table, "other": None}
    portable = compat.portable_history(history)
    assert portable["elbo_train"].columns.dtype == object
    assert portable["elbo_train"].index.dtype == np.int64
    pd.testing.assert_frame_equal(portable["elbo_train"], table, check_column_type=False)
    assert isinstance(history["elbo_train"].columns.dtype, pd.StringDtype)  # not changed
    assert portable["other"] is None
    assert compat.portable_history(None) is None


def test_saving_keeps_the_models_history(trained_model, tmp_path):
    history = trained_model.history_
    trained_model.save(tmp_path / "m")
    assert trained_model.history_ is history
    saved = compat.read_model_file(tmp_path / "m" / compat.MODEL_FILE)
    for table in saved["attr_dict"]["history_"].values():
        assert not isinstance(table.columns.dtype, pd.StringDtype)
