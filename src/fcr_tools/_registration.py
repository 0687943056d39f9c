"""Registering data with a trained model without writing into the user's objects."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scvi.data import AnnDataManager
from scvi.data._constants import _SETUP_ARGS_KEY
from scvi.data._utils import get_anndata_attribute

from ._constants import COVARIATES_KEY, X_KEY

# stand-in registrations a model keeps (each holds a reference to its data)
MAX_STAND_INS = 8


def check_genes(genes, expected) -> None:
    """Fail unless ``genes`` are the model's genes in the model's order."""
    expected, genes = pd.Index(expected), pd.Index(genes)
    if not genes.equals(expected):
        missing = expected.difference(genes)
        if len(missing):
            raise ValueError(
                f"adata lacks {len(missing)} of the model's genes (e.g. {list(missing[:5])})."
            )
        raise ValueError(
            "adata's genes differ from the model's in order or number; subset and reorder "
            "them first: adata = adata[:, model.get_var_names()].copy()."
        )


def check_source_genes(genes, kwargs: dict) -> None:
    """When a saved model is loaded onto data, check its genes (scvi-tools only warns)."""
    registry = kwargs.get("source_registry")
    if registry is None:
        return
    state = registry["field_registries"][X_KEY]["state_registry"]
    if state.get("column_names") is not None:
        check_genes(genes, state["column_names"])


def recode_covariates(manager: AnnDataManager) -> None:
    """Give covariates transferred from a model's registry the model's category codes.

    scvi-tools keeps the data's own codes when a categorical covariate lists the model's
    categories in another order (pandas deems the two dtypes equal), which silently swaps
    covariate groups; recode them in the registry's copy (``_scvi_extra_categorical_covs``).
    """
    if COVARIATES_KEY not in manager.data_registry:
        return
    state = manager.get_state_registry(COVARIATES_KEY)
    registered = manager.get_from_registry(COVARIATES_KEY)
    mod = (manager.registry[_SETUP_ARGS_KEY].get("modalities") or {}).get("covariate_keys")
    for key in state.field_keys:
        values = get_anndata_attribute(manager.adata, "obs", key, mod_key=mod)
        codes = pd.Categorical(np.asarray(values, dtype=object).ravel(), state.mappings[key]).codes
        if (codes >= 0).all() and not np.array_equal(registered[key].to_numpy(), codes):
            registered[key] = codes


def expression_modality(setup: dict) -> str | None:
    """The modality holding the expression for a ``setup_mudata`` setup, else ``None``."""
    return (setup.get("modalities") or {}).get("rna_layer")


def registered_layer(setup: dict) -> str | None:
    """The layer holding the expression (``None``: ``X``) for either setup method."""
    return setup.get("rna_layer") if expression_modality(setup) else setup.get("layer")


def check_data_kind(adata, setup: dict) -> None:
    """Fail unless ``adata`` is the kind of object (AnnData / MuData) the model was set up from.

    Parameters
    ----------
    adata
        The AnnData or MuData a model is applied to.
    setup
        The model's registered setup arguments.

    Raises
    ------
    ValueError
        For an AnnData given to a model set up from a MuData, a MuData given to a model set up
        from an AnnData, or a MuData without the model's expression modality.
    """
    modality = expression_modality(setup)
    is_mudata = hasattr(adata, "mod")
    if modality is not None and not is_mudata:
        raise ValueError(
            f"The model was set up from a MuData (expression in modality {modality!r}) and got "
            f"an AnnData: pass a MuData with a {modality!r} modality, e.g. "
            f"mudata.MuData({{{modality!r}: adata}})."
        )
    if modality is None and is_mudata:
        raise ValueError(
            "The model was set up from an AnnData and got a MuData: pass the AnnData of the "
            "expression, e.g. mdata.mod['rna']."
        )
    if is_mudata and modality not in adata.mod:
        raise ValueError(
            f"The MuData lacks the model's expression modality {modality!r} (it has "
            f"{list(adata.mod)})."
        )


def stand_in(adata, setup: dict):
    """A new AnnData / MuData with ``adata``'s arrays (shared, not copied) and copies of its obs.

    scvi-tools writes its registry (``_scvi_*`` obs columns, obsm and uns entries) into data a
    model is applied to, and turns a view into an actual AnnData in place. Prediction registers
    this stand-in instead, so the user's object is never written to.

    Parameters
    ----------
    adata
        The AnnData or MuData to stand in for, of the kind the model was set up from.
    setup
        The model's registered setup arguments (its expression layer and modalities).
    """
    check_data_kind(adata, setup)
    layer = registered_layer(setup)
    if hasattr(adata, "mod"):  # MuData
        import mudata

        rna = expression_modality(setup)
        parts = {
            name: _stand_in_anndata(mod, layer if name == rna else None)
            for name, mod in adata.mod.items()
        }
        stand_in = mudata.MuData(parts)
        stand_in.obs = adata.obs.copy()
        return stand_in
    return _stand_in_anndata(adata, layer)


def _stand_in_anndata(adata: ad.AnnData, layer: str | None) -> ad.AnnData:
    matrix = adata.X if layer is None else adata.layers[layer]
    if adata.is_view and matrix is not None:
        matrix = matrix.copy()  # the view's rows only
    var = pd.DataFrame(index=adata.var_names.copy())
    obs = adata.obs.copy()
    if layer is None:
        return ad.AnnData(X=matrix, obs=obs, var=var)
    return ad.AnnData(obs=obs, var=var, layers={layer: matrix})
