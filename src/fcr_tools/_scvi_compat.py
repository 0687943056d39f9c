"""Every use of scvi-tools internals in fcr_tools, in one place.

fcr_tools builds on scvi-tools' public model API (``BaseModelClass``, ``AnnDataManager``,
``TrainingPlan``, ``DataSplitter``) and on the protected hooks scvi-tools' model-development
guide tells subclasses to use (``_get_setup_method_args``, ``register_manager``,
``_validate_anndata`` ...). Anything beyond that -- private modules (``scvi.*._*``), private
constants, the manager stores, the layout of registries and of saved models -- is reached only
through the names below, each saying what it wraps and why. The rest of the package imports
these names and never scvi-tools' internals, so that a new scvi-tools release is checked here
(``tests/test_scvi_compat.py`` checks each name against the installed scvi-tools and that no
other module reaches into scvi-tools' private modules).

Checked against scvi-tools 1.4.2 (Python 3.11) and 1.5.1 (Python 3.12).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from scvi.data._constants import (
    _FIELD_REGISTRIES_KEY,
    _MODEL_NAME_KEY,
    _SCVI_UUID_KEY,
    _SETUP_ARGS_KEY,
    _SETUP_METHOD_NAME,
    _STATE_REGISTRY_KEY,
)
from scvi.dataloaders import BatchDistributedSampler

__all__ = [
    "MODEL_FILE",
    "SCVI_UUID_KEY",
    "BatchDistributedSampler",
    "add_init_arguments",
    "data_uuid",
    "forget_instance_manager",
    "forget_setup_manager",
    "instance_manager",
    "obs_column",
    "portable_history",
    "read_model_file",
    "release_fit_loaders",
    "saved_data_file",
    "saved_init_arguments",
    "saved_model_name",
    "setup_args",
    "setup_method_name",
    "state_registry",
    "write_model_file",
]

# ---------------------------------------------------------------------------- registry keys
#: Key of the AnnData's ``uns`` entry holding the UUID scvi-tools registers it under
#: (``scvi.data._constants._SCVI_UUID_KEY``, ``"_scvi_uuid"``).
SCVI_UUID_KEY: str = _SCVI_UUID_KEY
# the other keys (from scvi.data._constants) are those of a registry dict (``model.registry_``,
# ``manager.registry``), read through the functions below: no public accessor takes a bare
# registry, and a model loaded without data or a ``source_registry`` has no manager to ask


def setup_args(registry: Mapping) -> Mapping:
    """The arguments ``setup_anndata`` / ``setup_mudata`` was called with, from a registry.

    Wraps ``registry[scvi.data._constants._SETUP_ARGS_KEY]`` (``"setup_args"``).
    """
    return registry[_SETUP_ARGS_KEY]


def setup_method_name(registry: Mapping) -> str:
    """``"setup_anndata"`` or ``"setup_mudata"``: the setup method recorded in a registry.

    Wraps ``registry[scvi.data._constants._SETUP_METHOD_NAME]``; registries without it (none
    written by scvi-tools >= 1.0) count as ``"setup_anndata"``.
    """
    return registry.get(_SETUP_METHOD_NAME, "setup_anndata")


def saved_model_name(registry: Mapping) -> str | None:
    """The model class name a registry was written by (``None`` if unrecorded).

    Wraps ``registry[scvi.data._constants._MODEL_NAME_KEY]`` (``"model_name"``).
    """
    return registry.get(_MODEL_NAME_KEY)


def state_registry(registry: Mapping, registry_key: str) -> Mapping:
    """The state registry (a plain dict) of field ``registry_key`` in a registry dict.

    The dict counterpart of :meth:`scvi.data.AnnDataManager.get_state_registry`, for a model's
    ``registry_`` or a ``source_registry`` without a manager: wraps
    ``registry["field_registries"][registry_key]["state_registry"]``.
    """
    return registry[_FIELD_REGISTRIES_KEY][registry_key][_STATE_REGISTRY_KEY]


# ---------------------------------------------------------------------------- data access
def obs_column(data, key: str, mod_key: str | None = None) -> np.ndarray:
    """Column ``key`` of the obs of ``data`` (of its modality ``mod_key``) as ``(n_obs, 1)``.

    The obs case of ``scvi.data._utils.get_anndata_attribute``, which registered fields read
    their columns with, written out here (same result, same errors) instead of importing that
    private helper; ``tests/test_scvi_compat.py`` compares the two on the installed
    scvi-tools.

    Parameters
    ----------
    data
        AnnData or MuData.
    key
        The obs column.
    mod_key
        The MuData modality whose obs holds the column; ``None``: ``data.obs``.

    Raises
    ------
    ValueError
        For a modality of an AnnData, an unknown modality or an unknown column.
    """
    if mod_key is not None:
        if not hasattr(data, "mod"):
            raise ValueError(f"Cannot access modality {mod_key} on an AnnData object.")
        if mod_key not in data.mod:
            raise ValueError(f"{mod_key} is not a valid modality in adata.mod.")
        data = data.mod[mod_key]
    obs: pd.DataFrame = data.obs
    if key not in obs.columns:
        raise ValueError(f"{key} is not a valid column in adata.obs.")
    return obs.loc[:, key].to_numpy().reshape(-1, 1)


def data_uuid(adata) -> str | None:
    """The UUID scvi-tools registered ``adata`` under (``None``: never registered).

    Reads ``adata.uns[scvi.data._constants._SCVI_UUID_KEY]`` without writing to ``adata``
    (:meth:`~scvi.model.base.BaseModelClass.get_anndata_manager` assigns a new UUID to a copy).
    """
    return adata.uns.get(SCVI_UUID_KEY)


# ---------------------------------------------------------------------------- manager stores
# BaseModelClass keeps the AnnDataManagers of setup_anndata in the class-level dict
# ``_setup_adata_manager_store`` (data UUID -> manager) and those of each model in
# ``_per_instance_manager_store`` (model id -> data UUID -> manager). Its public
# ``deregister_manager(adata)`` needs the data to still be in the class store, which a
# stand-in registered for prediction (see ``_registration.stand_in``) is not; fcr_tools
# looks managers up and forgets them by UUID through these three functions.
def instance_manager(model, uuid: str | None):
    """The manager ``model`` registered data of UUID ``uuid`` with, or ``None``.

    Unlike :meth:`~scvi.model.base.BaseModelClass.get_anndata_manager`, it never writes to
    the data or registers anything.
    """
    return model._per_instance_manager_store.get(model.id, {}).get(uuid)


def forget_instance_manager(model, uuid: str) -> None:
    """Drop ``model``'s manager of the data of UUID ``uuid`` (no-op if it has none)."""
    model._per_instance_manager_store.get(model.id, {}).pop(uuid, None)


def forget_setup_manager(model_cls: type, uuid: str) -> None:
    """Drop the manager ``model_cls.setup_anndata`` left for data of UUID ``uuid``.

    ``setup_anndata`` registers every manager in the class store, where it would keep the data
    alive for the session; a model that registered a stand-in with itself drops it there.
    """
    model_cls._setup_adata_manager_store.pop(uuid, None)


# ---------------------------------------------------------------------------- saved models
#: File ``BaseModelClass.save`` writes the model to (without a prefix).
MODEL_FILE = "model.pt"


def read_model_file(path: str | os.PathLike) -> object:
    """The contents of a ``model.pt`` written by scvi-tools' ``BaseModelClass.save``, on CPU.

    scvi-tools pickles a dict (``attr_dict`` with the registry and ``init_params_``,
    ``model_state_dict``, ``var_names``) with :func:`torch.save` and reads it back in the
    private ``scvi.model.base._save_load._load_saved_files``, with ``weights_only=False``
    since the registry holds more than tensors. fcr_tools reads it first to check the saved
    model (class, format version) before handing it to ``load``.
    """
    return torch.load(path, map_location="cpu", weights_only=False)


def portable_history(history: Mapping | None) -> dict | None:
    """``model.history_`` with its tables' string-dtype row and column labels as object dtype.

    ``BaseModelClass.save`` pickles ``history_`` (metric name -> DataFrame) into ``model.pt``.
    Under pandas >= 3 (installed with scvi-tools 1.5 on Python >= 3.12) the column labels have
    pandas 3's string dtype, whose pickle pandas 2 cannot read: a model saved there would not
    load where scvi-tools 1.4 and pandas 2 are installed. Object-dtype labels read under both.
    """
    if history is None:
        return None
    tables = {}
    for name, table in history.items():
        if isinstance(table, pd.DataFrame):
            table = table.copy(deep=False)
            table.columns, table.index = _plain_labels(table.columns), _plain_labels(table.index)
        tables[name] = table
    return tables


def _plain_labels(labels: pd.Index) -> pd.Index:
    return labels.astype(object) if isinstance(labels.dtype, pd.StringDtype) else labels


def write_model_file(saved: Mapping, path: str | os.PathLike) -> None:
    """Write ``saved`` (the contents of a ``model.pt``) as scvi-tools' ``save`` does."""
    torch.save(dict(saved), path)


def saved_data_file(registry: Mapping) -> str:
    """Name of the data file ``save(save_anndata=True)`` writes for a model of ``registry``.

    ``"mdata.h5mu"`` for a MuData setup, else ``"adata.h5ad"`` (``BaseModelClass.save``).
    """
    return "mdata.h5mu" if setup_method_name(registry) == "setup_mudata" else "adata.h5ad"


def saved_init_arguments(init: Mapping | None) -> dict:
    """The ``__init__`` arguments in ``attr_dict["init_params_"]`` of a saved model.

    ``BaseModelClass._get_init_params`` records ``{"kwargs": {name: {...}}, "non_kwargs":
    {...}}``; scvi-tools < 0.15 recorded a flat dict (its dict values: the ``**kwargs``).
    """
    init = init or {}
    if "non_kwargs" not in init:
        return {name: value for name, value in init.items() if not isinstance(value, dict)}
    kwargs = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
    return {**init["non_kwargs"], **kwargs}


def add_init_arguments(init: Mapping, arguments: Mapping) -> dict:
    """A copy of ``attr_dict["init_params_"]`` with ``arguments`` added as named arguments."""
    if "non_kwargs" in init:
        return {**init, "non_kwargs": {**init["non_kwargs"], **arguments}}
    return {**init, **arguments}


# ---------------------------------------------------------------------------- trainer
def release_fit_loaders(trainer) -> None:
    """Let the data loaders of a finished ``fit`` go.

    scvi-tools keeps the trainer as ``model.trainer``; Lightning's fit loop keeps the training
    and validation loaders (``_combined_loader``) for a later ``fit`` on the same trainer,
    which scvi-tools never makes (each ``train`` builds a new trainer). The loaders hold arrays
    of every cell (treatment encoding, control partners, row pointers of a store) for as long
    as the model lives; Lightning builds them anew whenever it needs them.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    val_loop = getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None)
    for loop in (fit_loop, val_loop):
        if getattr(loop, "_combined_loader", None) is not None:
            loop._combined_loader = None
