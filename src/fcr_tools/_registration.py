"""Registering data with a trained model without writing into the user's objects."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
from scvi.data import AnnDataManager

from ._backed import arrow_names
from ._constants import COVARIATES_KEY, X_KEY
from ._scvi_compat import obs_column, setup_args, state_registry
from ._validation import as_key_list

# stand-in registrations a model keeps (each holds a reference to its data)
MAX_STAND_INS = 8


@dataclass(frozen=True)
class RegisteredSetup:
    """Where a model reads its data from, answered from its registered setup arguments.

    The one place that knows the two setups: after ``setup_anndata`` everything is read from
    the AnnData (expression from ``layer``); after ``setup_mudata`` the expression is read from
    one modality (``modalities["rna_layer"]``, layer ``rna_layer``) and each obs column from the
    modality ``modalities`` maps its argument to, or from the MuData's own obs.

    Parameters
    ----------
    args
        The setup arguments, ``registry["setup_args"]`` (see :meth:`from_registry`).
    """

    args: Mapping

    @classmethod
    def from_registry(cls, registry: Mapping) -> RegisteredSetup:
        """The setup recorded in a model's or a manager's registry."""
        return cls(setup_args(registry))

    @classmethod
    def of(cls, setup: RegisteredSetup | Mapping) -> RegisteredSetup:
        """``setup`` itself, or the setup of the setup arguments ``setup``."""
        return setup if isinstance(setup, cls) else cls(setup)

    @property
    def treatment_key(self) -> str:
        """The treatment column."""
        return self.args["treatment_key"]

    @property
    def control_treatment(self) -> str:
        """The label of control cells."""
        return self.args["control_treatment"]

    @property
    def dose_key(self) -> str | None:
        """The dose column, or ``None`` (dose 1 for every treated cell)."""
        return self.args.get("dose_key")

    @property
    def covariate_keys(self) -> list[str]:
        """The covariate columns."""
        return as_key_list(self.args.get("covariate_keys"))

    @property
    def modalities(self) -> dict[str, str]:
        """Setup argument -> modality, for a MuData setup (empty for an AnnData one)."""
        return dict(self.args.get("modalities") or {})

    @property
    def expression_modality(self) -> str | None:
        """The modality holding the expression for a MuData setup, else ``None``."""
        return self.modalities.get("rna_layer")

    @property
    def is_mudata(self) -> bool:
        """Whether the model was set up from a MuData."""
        return self.expression_modality is not None

    @property
    def layer(self) -> str | None:
        """The layer holding the expression (``None``: ``X``) for either setup method."""
        return self.args.get("rna_layer") if self.is_mudata else self.args.get("layer")

    def modality(self, argument: str) -> str | None:
        """The modality whose obs holds the column(s) of ``argument`` (``"treatment_key"``,
        ``"dose_key"``, ``"covariate_keys"``); ``None``: the data's own obs."""
        return self.modalities.get(argument)

    def expression_data(self, data) -> ad.AnnData:
        """The AnnData of ``data`` (an AnnData or MuData of the setup's kind) with the genes."""
        return data.mod[self.expression_modality] if self.is_mudata else data

    def obs(self, data, argument: str) -> pd.DataFrame:
        """The obs of ``data`` that holds the column(s) of ``argument``."""
        mod = self.modality(argument)
        return (data.mod[mod] if mod else data).obs

    def column(self, data, argument: str, key: str | None = None):
        """The values of the column of ``argument`` (or of its column ``key``) in ``data``."""
        key = self.args[argument] if key is None else key
        return obs_column(data, key, mod_key=self.modality(argument))

    def genes(self, var_names):
        """The model's genes from ``model.get_var_names()`` (per modality for a MuData)."""
        return var_names[self.expression_modality] if isinstance(var_names, dict) else var_names


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
    state = state_registry(registry, X_KEY)
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
    setup = RegisteredSetup.from_registry(manager.registry)
    for key in state.field_keys:
        values = setup.column(manager.adata, "covariate_keys", key)
        codes = pd.Categorical(np.asarray(values, dtype=object).ravel(), state.mappings[key]).codes
        if (codes >= 0).all() and not np.array_equal(registered[key].to_numpy(), codes):
            registered[key] = codes


def check_data_kind(adata, setup: RegisteredSetup | Mapping) -> None:
    """Fail unless ``adata`` is the kind of object (AnnData / MuData) the model was set up from.

    Parameters
    ----------
    adata
        The AnnData or MuData a model is applied to.
    setup
        The model's registered setup (or its setup arguments).

    Raises
    ------
    ValueError
        For an AnnData given to a model set up from a MuData, a MuData given to a model set up
        from an AnnData, or a MuData without the model's expression modality.
    """
    modality = RegisteredSetup.of(setup).expression_modality
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


def stand_in(adata, setup: RegisteredSetup | Mapping):
    """A new AnnData / MuData with ``adata``'s arrays (shared, not copied) and copies of its obs.

    scvi-tools writes its registry (``_scvi_*`` obs columns, obsm and uns entries) into data a
    model is applied to, and turns a view into an actual AnnData in place. Prediction registers
    this stand-in instead, so the user's object is never written to.

    Parameters
    ----------
    adata
        The AnnData or MuData to stand in for, of the kind the model was set up from.
    setup
        The model's registered setup (or its setup arguments).
    """
    setup = RegisteredSetup.of(setup)
    check_data_kind(adata, setup)
    layer = setup.layer
    if hasattr(adata, "mod"):  # MuData
        import mudata

        rna = setup.expression_modality
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
    # the names are the user's, checked with their AnnData: Arrow names (a store's) are not
    # checked again, which would hash them as a Python string per cell
    unchecked = (
        ad.settings.override(check_uniqueness=False)
        if arrow_names(obs.index) and hasattr(ad.settings, "check_uniqueness")
        else nullcontext()
    )
    with unchecked:
        if layer is None:
            return ad.AnnData(X=matrix, obs=obs, var=var)
        return ad.AnnData(obs=obs, var=var, layers={layer: matrix})
