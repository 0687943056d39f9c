"""Saving and loading checks: version record, clear errors for damaged model directories."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from scvi.data._constants import _MODEL_NAME_KEY

# 1.1: the interaction prior became a model argument (default "linear"); models saved before
# it have the one-hidden-layer MLP prior.
# 1.2: posterior, interaction_context, decoder, treatment_prior and dose_response became model
# arguments (new defaults); models saved before them are rebuilt with the values they had.
MODEL_FORMAT = (1, 2)

# model arguments added after format 1.0, and the value every model saved before them had
ARGUMENTS_BEFORE = {
    "interaction_prior": "mlp",
    "posterior": "free",
    "interaction_context": "shared",
    "decoder": "mlp",
    "treatment_prior": "mlp",
    "dose_response": "linear",
}


def version_info() -> dict[str, str]:
    """The fcr_tools version and model format recorded with a saved model."""
    from . import __version__

    return {"fcr_tools": __version__, "model_format": ".".join(map(str, MODEL_FORMAT))}


def describe_version(info: dict | None) -> str:
    if not info:
        return "an fcr_tools version from before 0.1.0 (no version recorded; model format 0.0)"
    return f"fcr_tools {info.get('fcr_tools', '?')} (model format {info.get('model_format')})"


def saved_format(info: dict | None) -> tuple[int, int]:
    if not info:
        return (0, 0)
    try:
        major, minor = str(info["model_format"]).split(".")[:2]
        return int(major), int(minor)
    except (KeyError, ValueError) as err:
        raise ValueError(f"Unreadable fcr_tools version record {info!r}.") from err


def check_saved_model(
    dir_path, prefix: str | None, load_adata: bool, model_names: Sequence[str]
) -> dict | None:
    """Clear errors for a missing, truncated, foreign or too new saved model.

    Returns the version record of the saved model (``None`` before versions were recorded)
    and its saved ``__init__`` arguments.
    """
    path = os.fspath(dir_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No saved model at {path!r}: the directory does not exist.")
    model_file = os.path.join(path, f"{prefix or ''}model.pt")
    if not os.path.isfile(model_file):
        present = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{model_file!r} not found: {path!r} does not hold a saved model (it holds "
            f"{present[:10]}). Save one with model.save({path!r})."
        )
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, garbage bytes, pickle errors ...
        raise ValueError(
            f"Could not read the saved model {model_file!r}: the file is truncated or corrupt "
            f"({type(err).__name__}: {err}). Save the model again."
        ) from err
    attrs = saved.get("attr_dict") if isinstance(saved, dict) else None
    if (
        not isinstance(attrs, dict)
        or "registry_" not in attrs
        or not {"model_state_dict", "var_names"} <= set(saved)
    ):
        raise ValueError(
            f"{model_file!r} is not a model saved by scvi-tools' model.save (keys: "
            f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__})."
        )
    name = attrs["registry_"].get(_MODEL_NAME_KEY)
    if name is not None and name not in model_names:
        raise ValueError(
            f"{model_file!r} holds a {name} model, not an {model_names[0]}: load it with "
            f"{name}.load()."
        )
    info = attrs.get("fcr_version_")
    if saved_format(info) > MODEL_FORMAT:
        raise ValueError(
            f"The model at {path!r} was saved by {describe_version(info)}, a newer format than "
            f"this fcr_tools reads ({describe_version(version_info())}). Upgrade fcr_tools "
            "(pip install -U fcr-tools) to load it."
        )
    if load_adata:
        setup_method = attrs["registry_"].get("setup_method_name", "setup_anndata")
        data_file = "mdata.h5mu" if setup_method == "setup_mudata" else "adata.h5ad"
        data_path = os.path.join(path, f"{prefix or ''}{data_file}")
        if os.path.exists(data_path):
            import h5py

            try:
                with h5py.File(data_path, "r") as handle:
                    handle.visit(lambda name: None)
            except Exception as err:
                raise ValueError(
                    f"Could not read the data saved with the model, {data_path!r}: the file is "
                    f"truncated or corrupt ({err}). Pass adata=... to load the model onto your "
                    "data instead."
                ) from err
    init = attrs.get("init_params_") or {}
    return info, {**init.get("non_kwargs", {}), **init.get("kwargs", {})}


def legacy_model_arguments(saved_arguments: dict) -> dict:
    """Arguments whose default changed since a model was saved: their value at the time."""
    return {name: value for name, value in ARGUMENTS_BEFORE.items() if name not in saved_arguments}
