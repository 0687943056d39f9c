"""Saving and loading checks: version record, clear errors for damaged model directories.

Model format policy
-------------------
``model.save`` records the fcr_tools version and the model format, ``"major.minor"``
(:data:`MODEL_FORMAT`), in ``model.fcr_version_``. A new minor format adds model arguments (or
the like) that a reader of that minor rebuilds older models with (:data:`ARGUMENTS_BEFORE`); a
new major changes what every reader relies on. ``FCRModel.load`` reads a model whose format has
its own major version and a minor up to its own. A newer minor format, which an older reader
could silently get wrong, and any other major format fail with a message naming the saved
format, the fcr_tools version that wrote it and the installed one. Models saved before formats
were recorded (before fcr_tools 0.1.0) are read as format 1.0. This is the one statement of the
policy in the code; ``docs/bad_input.md`` gives it to users.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ._scvi_compat import (
    MODEL_FILE,
    add_init_arguments,
    read_model_file,
    saved_data_file,
    saved_init_arguments,
    saved_model_name,
    write_model_file,
)

# 1.1: the interaction prior became a model argument (default "linear"); models saved before
# it have the one-hidden-layer MLP prior.
# 1.2: posterior, interaction_context, decoder, treatment_prior and dose_response became model
# arguments (new defaults); models saved before them are rebuilt with the values they had.
# 1.3: the model keeps the shrinkage weight of unmeasured pairs and the training data's group
# means (shrinkage_, from FCRModel.fit_shrinkage); models saved before it predict with FCR alone,
# and a 1.2 reader, which would ignore the weight, refuses 1.3 models.
# 1.4: the shrinkage record names the baseline it shrinks towards ("target"; new models: the
# context-adjusted additive baseline); records without it shrink towards the plain additive
# baseline, as they were chosen, and a 1.3 reader, which would do so for every record, refuses
# 1.4 models.
# 1.5: the model keeps the rotation in which z_tx is reported (interaction_axes_, from
# FCRModel.align_interaction_axes); models saved before it report z_tx in the module's own axes,
# and a 1.4 reader, which would ignore the rotation and report other columns, refuses 1.5 models.
MODEL_FORMAT = (1, 5)
# the libraries whose versions decide whether a saved model.pt can be unpickled
LIBRARIES = ("torch", "pandas", "numpy", "scvi-tools", "anndata")
# the format of models saved before formats were recorded
UNRECORDED_FORMAT = (1, 0)

# model arguments added after format 1.0, and the value every model saved before them had
# (how this reader rebuilds a model of an older minor format)
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


def installed_libraries() -> str:
    """``"torch X, pandas Y, ..."``: the versions of :data:`LIBRARIES` installed here."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in LIBRARIES)


def describe_version(info: dict | None) -> str:
    """``"fcr_tools X (model format M.m)"`` for a version record (``None``: none recorded)."""
    if not info:
        return (
            "an fcr_tools version from before 0.1.0 (no version recorded; read as model "
            "format 1.0)"
        )
    return f"fcr_tools {info.get('fcr_tools', '?')} (model format {info.get('model_format')})"


def saved_format(info: dict | None) -> tuple[int, int]:
    """The ``(major, minor)`` model format of a version record (``None``: 1.0)."""
    if not info:
        return UNRECORDED_FORMAT
    try:
        major, minor = str(info["model_format"]).split(".")[:2]
        return int(major), int(minor)
    except (KeyError, ValueError) as err:
        raise ValueError(f"Unreadable fcr_tools version record {info!r}.") from err


def check_format(info: dict | None, path: str) -> None:
    """Fail unless this fcr_tools reads the model format of ``info`` (see the module's policy).

    Parameters
    ----------
    info
        The saved model's version record (``None``: saved before records, format 1.0).
    path
        The saved model's directory, for the message.

    Raises
    ------
    ValueError
        For a newer minor format or another major one, naming the saved format, the fcr_tools
        version that wrote it and the installed one.
    """
    saved, installed = describe_version(info), describe_version(version_info())
    try:
        major, minor = saved_format(info)
    except ValueError as err:
        raise ValueError(f"The model at {path!r}: {err}") from err
    if major > MODEL_FORMAT[0] or (major == MODEL_FORMAT[0] and minor > MODEL_FORMAT[1]):
        raise ValueError(
            f"The model at {path!r} was saved by {saved}, a newer format than this fcr_tools "
            f"reads ({installed}). Upgrade fcr_tools (pip install -U fcr-tools) to load it."
        )
    if major < MODEL_FORMAT[0]:
        raise ValueError(
            f"The model at {path!r} was saved by {saved}, an older major format that this "
            f"fcr_tools no longer reads ({installed}). Load it with the fcr_tools version that "
            "saved it, or train the model again."
        )


def read_saved_model(
    dir_path, prefix: str | None, load_adata: bool, model_names: Sequence[str]
) -> dict:
    """The contents of a saved model's ``model.pt``, with clear errors for a missing,
    truncated, foreign or unreadable-format saved model.

    Parameters
    ----------
    dir_path
        Directory written by ``model.save``.
    prefix
        Prefix of the file names.
    load_adata
        Whether the data saved with the model will be read (then it is checked too).
    model_names
        Model class names the saved model may have; the first is named in errors.

    Returns
    -------
    The dictionary scvi-tools' ``model.save`` wrote (``attr_dict``, ``model_state_dict``,
    ``var_names``), read onto the CPU.
    """
    path = os.fspath(dir_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No saved model at {path!r}: the directory does not exist.")
    model_file = os.path.join(path, f"{prefix or ''}{MODEL_FILE}")
    if not os.path.isfile(model_file):
        present = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{model_file!r} not found: {path!r} does not hold a saved model (it holds "
            f"{present[:10]}). Save one with model.save({path!r})."
        )
    try:
        saved = read_model_file(model_file)
    except Exception as err:  # truncated zip, garbage bytes, pickle errors ...
        if zipfile.is_zipfile(model_file):  # a whole torch file: its pickle is the problem
            raise ValueError(
                f"Could not read the saved model {model_file!r} with the libraries installed "
                f"here ({installed_libraries()}): {type(err).__name__}: {err}. The file is "
                "whole, so it was most likely saved with newer versions of them: load it where "
                "those are installed, or upgrade these (pip install -U scvi-tools pandas)."
            ) from err
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
    name = saved_model_name(attrs["registry_"])
    if name is not None and name not in model_names:
        raise ValueError(
            f"{model_file!r} holds a {name} model, not an {model_names[0]}: load it with "
            f"{name}.load()."
        )
    info = attrs.get("fcr_version_")
    check_format(info, path)
    if load_adata:
        data_path = saved_data_path(path, prefix, attrs["registry_"])
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
    return saved


def check_saved_model(
    dir_path, prefix: str | None, load_adata: bool, model_names: Sequence[str]
) -> tuple[dict | None, dict]:
    """Clear errors for a missing, truncated, foreign or unreadable-format saved model.

    Parameters are those of :func:`read_saved_model`.

    Returns
    -------
    info : dict or None
        The saved model's version record (``None`` before versions were recorded).
    arguments : dict
        Its saved ``__init__`` arguments.
    """
    saved = read_saved_model(dir_path, prefix, load_adata, model_names)
    return saved["attr_dict"].get("fcr_version_"), saved_arguments(saved)


def saved_data_path(dir_path, prefix: str | None, registry: dict) -> str:
    """Where ``model.save(..., save_anndata=True)`` writes the data of a model (its registry)."""
    return os.path.join(os.fspath(dir_path), f"{prefix or ''}{saved_data_file(registry)}")


def saved_arguments(saved: dict) -> dict:
    """The ``__init__`` arguments in the contents of a saved model."""
    return saved_init_arguments(saved["attr_dict"].get("init_params_"))


def legacy_model_arguments(saved_arguments: dict) -> dict:
    """Arguments whose default changed since a model was saved: their value at the time."""
    return {name: value for name, value in ARGUMENTS_BEFORE.items() if name not in saved_arguments}


def with_arguments_before(saved: dict) -> dict | None:
    """The contents of a saved model with the arguments its format predates filled in.

    A model of an older minor format was saved without the arguments added since; rebuilt
    with today's defaults it would get another architecture. This returns a copy of
    ``saved`` whose ``__init__`` arguments also hold those arguments' values at the time
    (:data:`ARGUMENTS_BEFORE`), so that the model is constructed with them as ordinary
    arguments. ``None`` when nothing is missing (``saved`` loads as it is).
    """
    attrs = saved["attr_dict"]
    init = attrs.get("init_params_")
    if not isinstance(init, dict):
        return None  # scvi-tools' load says what is wrong
    missing = legacy_model_arguments(saved_arguments(saved))
    if not missing:
        return None
    init = add_init_arguments(init, missing)
    return {**saved, "attr_dict": {**attrs, "init_params_": init}}


@contextmanager
def loadable_save(dir_path, prefix: str | None, saved: dict, adata) -> Iterator[tuple]:
    """Where scvi-tools' ``load`` reads a saved model from: ``(dir_path, prefix, adata)``.

    A model of the current format is read where it is. For one of an older minor format
    (:func:`with_arguments_before`), the completed ``model.pt`` is written to a temporary
    directory, removed on exit, and the data saved with the model (when ``adata`` is
    ``None``) is read from the original directory and passed on as ``adata``. The saved
    model itself is never written to.
    """
    converted = with_arguments_before(saved)
    if converted is None:
        yield dir_path, prefix, adata
        return
    if adata is None:
        data_path = saved_data_path(dir_path, prefix, saved["attr_dict"]["registry_"])
        if os.path.exists(data_path):
            adata = _read_data(data_path)
    with tempfile.TemporaryDirectory(prefix="fcr_tools_load_") as scratch:
        write_model_file(converted, os.path.join(scratch, MODEL_FILE))
        yield scratch, None, adata


def _read_data(path: str):
    """Read saved data as scvi-tools' ``load`` does."""
    if path.endswith(".h5mu"):
        import mudata

        return mudata.read_h5mu(path)
    import anndata

    return anndata.read_h5ad(path)
