"""FCRModel: the user-facing FCR model (setup, training, latents, counterfactuals, IO)."""

from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from ._axes import condition_covariances, fit_rotation, total_correlation
from ._backed import (
    check_store,
    create_obsm_arrays,
    is_store,
    plain_names,
    plain_obs_index,
    remember_store,
    writable,
)
from ._constants import COVARIATES_KEY, LATENT_BLOCKS, TREATMENT_KEY, X_KEY
from ._module import FCRModule, _check_choice
from ._objective import LOSS_TERMS
from ._pairing import (
    FCRDataLoader,
    FCRDataSplitter,
    cell_treatments,
    control_mask,
    covariate_codes,
    treatment_encoder,
)
from ._prediction import (
    NORMALIZED_SCALE,
    check_mode,
    counterfactual_expression,
    grid_targets,
    group_codes,
)
from ._registration import (
    MAX_STAND_INS,
    RegisteredSetup,
    check_data_kind,
    check_genes,
    check_source_genes,
    recode_covariates,
    stand_in,
)
from ._saving import (
    describe_version,
    loadable_save,
    read_saved_model,
    version_info,
)
from ._scvi_compat import (
    data_uuid,
    forget_instance_manager,
    forget_setup_manager,
    instance_manager,
    obs_column,
    portable_history,
    release_fit_loaders,
    setup_method_name,
)
from ._shrinkage import MIN_CELLS as SHRINKAGE_MIN_CELLS
from ._shrinkage import ShrinkageUnavailable, fit_shrinkage, saved_target, shrink, target_name
from ._training_plan import FCRTrainingPlan
from ._treatments import TreatmentEncoder
from ._validation import as_key_list, check_expression, check_setup_columns, layer_names

Block = Literal["x", "t", "tx", "all"]


def _selected_blocks(block: str | Sequence[str]) -> list[str]:
    blocks = list(LATENT_BLOCKS) if block == "all" else as_key_list(block)
    unknown = [b for b in blocks if b not in LATENT_BLOCKS]
    if unknown or not blocks:
        raise ValueError(f"block must be 'x', 't', 'tx' or 'all', got {block!r}.")
    return blocks


def _data_matrix(adata, layer: str | None, modality: str | None = None):
    """The expression matrix registered from an AnnData / MuData, and a readable name."""
    if modality is not None:
        if modality not in adata.mod:
            raise KeyError(f"Modality {modality!r} not found in the MuData ({list(adata.mod)}).")
        adata = adata.mod[modality]
    if layer is None:
        return adata.X, "adata.X" if modality is None else f"mdata[{modality!r}].X"
    if layer not in adata.layers:
        raise KeyError(f"layer={layer!r} not found in adata.layers ({layer_names(adata)}).")
    name = f"adata.layers[{layer!r}]" if modality is None else f"mdata[{modality!r}].layers"
    return adata.layers[layer], name


# DDP strategies and their variants that allow parameters without gradient in a backward pass:
# the discriminator update touches only the discriminators, the autoencoder update not them all.
_DDP_FIND_UNUSED = {
    name: f"{name}_find_unused_parameters_true"
    for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}


# minibatch size of inference (latents, counterfactuals): large batches cut per-batch overhead,
# so as many cells as hold about INFERENCE_VALUES expression values (16 MB of float32), at
# least INFERENCE_BATCH_SIZE
INFERENCE_BATCH_SIZE = 1024
INFERENCE_VALUES = 2**22
# the most cells whose conditions choose the axes of z_tx at the end of training (a random
# subset beyond it: per-condition covariances need no more, and the pass stays short on
# screens of millions of cells)
ALIGN_MAX_CELLS = 200_000
# train() arguments the second training of fit_shrinkage does not repeat (a user's callbacks
# and loggers belong to the model they were given for; the data split to its data)
_NOT_REPEATED = ("callbacks", "logger", "strategy", "datasplitter_kwargs", "max_epochs")

# under scvi-tools' logger, so its verbosity setting applies and the messages show by default
logger = logging.getLogger(f"scvi.{__name__}")


class FCRModel(UnsupervisedTrainingMixin, BaseModelClass):
    """Factorized Causal Representations of cellular responses (Mao et al., NeurIPS 2024).

    FCR learns three latent blocks per cell: z_x (context / covariates), z_t (treatment)
    and z_tx (their interaction), with conditional priors p(z_x | x), p(z_t | t) and
    p(z_tx | x, t), and predicts the expression of cells under treatments they did not
    receive, including (covariate, treatment) pairs never measured.

    Parameters
    ----------
    adata
        AnnData / MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    registry
        Registry of a saved model (used by :meth:`load`; leave ``None``).
    n_latent_x, n_latent_t, n_latent_tx
        Sizes of the covariate, treatment and interaction blocks.
    n_hidden
        Width of the hidden layers.
    n_layers
        Hidden layers of the expression encoder and of the decoder.
    n_covariate_embed
        Embedding size of each covariate.
    dropout_rate
        Dropout rate of the expression encoder.
    likelihood
        ``"gaussian"`` for log-normalised expression (the paper's default) or ``"nb"`` for raw
        counts (negative binomial with the observed library size, as in scVI).
    interaction_prior
        Network of the interaction prior p(z_tx | x, t) on k_t(t) * e_x(x): ``"linear"``
        (default; its mean and variance parameters linear in it, a bilinear context x
        treatment law) or ``"mlp"`` (one hidden layer, the paper's choice). Predictions for
        pairs never measured rest on this network; on the benchmark screens the linear prior
        extrapolates to them more reliably and gives a more identifiable z_tx (see the
        benchmarks page).
    posterior
        ``"residual"`` (default): each block's posterior mean is its conditional prior mean
        plus a deviation the encoder computes from the cell, so the treatment's and the
        context's prior means reach the decoder from the first step and every cell carries
        its own deviation into counterfactuals (``mode="abduction"``). ``"free"``: the
        encoders give the posterior means directly (fcr_tools 0.1).
    interaction_context
        The context embedding of the interaction prior. ``"centred"`` (default): an
        embedding of its own, centred over the contexts that had treated cells in training
        and zero for the others, so that a context never measured under treatment gets the
        average interaction. ``"shared"``: the covariate embedding e_x, shared with
        p(z_x | x) (fcr_tools 0.1).
    decoder
        ``"skip"`` (default): an MLP over the three blocks plus a linear map of them, so that
        each block has a direct additive path to the genes next to the nonlinear one;
        ``"mlp"``: the MLP alone (the paper's, and fcr_tools 0.1's); ``"additive"``: one
        network per block, summed (f_x(z_x) + f_t(z_t) + f_tx(z_tx)).
    treatment_prior
        Network of p(z_t | t): ``"mlp"`` (one hidden layer) or ``"linear"`` (a sum of
        treatment embeddings scaled by their dose response).
    dose_response
        ``"linear"``: doses enter as given; ``"hill"``: each treatment's dose passes through a
        learned saturating curve d^n / (d^n + c^n) (g(0) = 0) before the priors and encoders;
        ``"auto"`` (default): ``"hill"`` when some treatment was given at two or more doses
        in the registered data (a curve can be learned), ``"linear"`` otherwise (one dose per
        treatment: the curve would only rescale it). The choice is logged and recorded in
        ``init_params_``, so a saved model is rebuilt with it.

    Examples
    --------
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cell_lines=2, n_treatments=2, n_cells_per_condition=10)
    >>> FCRModel.setup_anndata(
    ...     adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    ... )
    >>> model = FCRModel(adata, n_latent_x=4, n_latent_t=4, n_latent_tx=4)
    >>> model.train(max_epochs=1, enable_progress_bar=False)
    >>> model.write_latents()
    >>> adata.obsm["X_fcr_tx"].shape
    (180, 4)
    """

    _module_cls = FCRModule
    _training_plan_cls = FCRTrainingPlan
    _data_splitter_cls = FCRDataSplitter

    def __init__(
        self,
        adata: ad.AnnData | None = None,
        registry: dict | None = None,
        n_latent_x: int = 16,
        n_latent_t: int = 16,
        n_latent_tx: int = 16,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_covariate_embed: int = 16,
        dropout_rate: float = 0.1,
        likelihood: Literal["gaussian", "nb"] = "gaussian",
        interaction_prior: Literal["linear", "mlp"] = "linear",
        posterior: Literal["residual", "free"] = "residual",
        decoder: Literal["skip", "mlp", "additive"] = "skip",
        interaction_context: Literal["centred", "shared"] = "centred",
        treatment_prior: Literal["mlp", "linear"] = "mlp",
        dose_response: Literal["auto", "linear", "hill"] = "auto",
    ):
        super().__init__(adata, registry)
        if adata is not None:
            # another model's setup on the same object may have overwritten FCR's entries
            self.adata_manager.validate()
        if likelihood not in ("gaussian", "nb"):
            raise ValueError(f"likelihood must be 'gaussian' or 'nb', not {likelihood!r}.")
        # FCRModule checks the architecture arguments (load() passes a model saved before one
        # existed the value it had then, see _saving.with_arguments_before)
        for name, value in [
            ("n_latent_x", n_latent_x),
            ("n_latent_t", n_latent_t),
            ("n_latent_tx", n_latent_tx),
            ("n_hidden", n_hidden),
            ("n_layers", n_layers),
            ("n_covariate_embed", n_covariate_embed),
        ]:
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if adata is not None and likelihood == "nb":
            check_expression(*self._registered_matrix(adata), counts=True)

        _check_choice("dose_response", dose_response, ("auto", "linear", "hill"))
        if dose_response == "auto":
            dose_response = self._auto_dose_response(adata is not None)
        encoder = self.treatment_encoder
        treatments = self.get_state_registry(TREATMENT_KEY).categorical_mapping
        self.module = FCRModule(
            n_input=self.summary_stats.n_vars,
            n_cats_per_cov=self._n_cats_per_cov(),
            n_treatment_components=encoder.n_components,
            n_treatment_categories=len(treatments),
            control_code=list(treatments).index(encoder.control),
            n_latent_x=n_latent_x,
            n_latent_t=n_latent_t,
            n_latent_tx=n_latent_tx,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_covariate_embed=n_covariate_embed,
            dropout_rate=dropout_rate,
            likelihood=likelihood,
            interaction_prior=interaction_prior,
            posterior=posterior,
            decoder=decoder,
            interaction_context=interaction_context,
            treatment_prior=treatment_prior,
            dose_response=dose_response,
            treated_categories=self._treated_categories() if adata is not None else None,
        )
        covariates = self.covariate_keys or ["none"]
        self._model_summary_string = (
            f"FCRModel: {likelihood} likelihood; latent blocks x={n_latent_x}, t={n_latent_t}, "
            f"tx={n_latent_tx}; {encoder.n_components} treatments in "
            f"{len(treatments) - 1} treatment labels; covariates: {', '.join(covariates)}; "
            f"{self.summary_stats.n_vars} genes."
        )
        self.fcr_version_ = version_info()
        self.init_params_ = self._get_init_params(locals())
        # how far predictions of unmeasured pairs shrink towards a baseline
        # (set by train / fit_shrinkage; saved with the model)
        self.shrinkage_ = None
        # the rotation that reports z_tx in its aligned axes (set by train /
        # align_interaction_axes; saved with the model; None: the module's own axes)
        self.interaction_axes_ = None

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        treatment_key: str,
        control_treatment: str = "control",
        covariate_keys: str | Sequence[str] | None = None,
        dose_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ):
        """Register an AnnData for FCR.

        Only scvi-tools' registry entries are added to ``adata``; nothing else is changed.

        Parameters
        ----------
        adata
            Cells x genes. ``adata.X`` (or ``layer``) holds log-normalised expression for
            ``likelihood="gaussian"`` or raw counts for ``likelihood="nb"``. A store (an
            AnnData in backed mode, see :func:`fcr_tools.data.read_store`) keeps its
            expression on disk: minibatches read their rows from the file.
        treatment_key
            Categorical obs column with the treatment of each cell. Combinations are written
            ``"drugA+drugB"``.
        control_treatment
            The label of control (untreated / vehicle) cells in ``treatment_key``.
        covariate_keys
            Categorical obs column(s) describing each cell's context: cell line, donor,
            replicate... Every covariate group needs control cells.
        dose_key
            Numeric obs column of doses (for combinations, one shared number or a string
            ``"d1+d2"``). ``None``: dose 1 for every treated cell. Doses of controls are
            ignored. Scale doses to about [0, 1] (e.g. dose / max dose).
        layer
            Layer with the expression; ``None`` uses ``adata.X``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> from fcr_tools import FCRModel
        >>> from fcr_tools.data import simulate_screen
        >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
        >>> FCRModel.setup_anndata(
        ...     adata, treatment_key="drug", dose_key="dose", covariate_keys=["cell_line"]
        ... )
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise ValueError(
                "adata is a view (a subset of another AnnData); call adata = adata.copy() first."
            )
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"adata has shape {adata.shape}: no cells or no genes.")
        check_source_genes(adata.var_names, kwargs)
        covariates = as_key_list(covariate_keys)
        with plain_obs_index(adata):  # Arrow names (a store's) stay Arrow: see plain_obs_index
            check_setup_columns(
                lambda key: adata.obs[key],
                list(adata.obs.columns),
                treatment_key,
                control_treatment,
                covariates,
                dose_key,
                require_control="source_registry" not in kwargs,
            )
            matrix, name = _data_matrix(adata, layer)
            check_expression(matrix, name, counts=False)
            fields = [
                LayerField(X_KEY, layer, is_count_data=False),
                CategoricalObsField(TREATMENT_KEY, treatment_key),
            ]
            if covariates:
                fields.append(CategoricalJointObsField(COVARIATES_KEY, covariates))
            manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
            manager.register_fields(adata, **kwargs)
            if "source_registry" in kwargs:
                recode_covariates(manager)
        cls.register_manager(manager)
        remember_store(adata)  # a store (backed AnnData): what its file is like now

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        treatment_key: str,
        control_treatment: str = "control",
        covariate_keys: str | Sequence[str] | None = None,
        dose_key: str | None = None,
        rna_layer: str | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ):
        """Register a MuData for FCR (expression from one modality).

        Parameters
        ----------
        mdata
            MuData object.
        treatment_key, control_treatment, covariate_keys, dose_key
            As in :meth:`setup_anndata`; columns are read from ``mdata.obs`` or from the
            modality given in ``modalities``.
        rna_layer
            Layer of the expression modality; ``None`` uses its ``.X``.
        modalities
            Maps argument names to modality names, e.g. ``{"rna_layer": "rna"}`` (required
            for ``rna_layer``) or ``{"treatment_key": "rna", ...}`` for columns stored in a
            modality's obs.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> import mudata
        >>> from fcr_tools import FCRModel
        >>> from fcr_tools.data import simulate_screen
        >>> rna = simulate_screen(n_cells_per_condition=5, n_genes=20)
        >>> mdata = mudata.MuData({"rna": rna})
        >>> FCRModel.setup_mudata(
        ...     mdata,
        ...     treatment_key="drug",
        ...     dose_key="dose",
        ...     covariate_keys="cell_line",
        ...     modalities={
        ...         "rna_layer": "rna",
        ...         "treatment_key": "rna",
        ...         "dose_key": "rna",
        ...         "covariate_keys": "rna",
        ...     },
        ... )
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if modalities is None or "rna_layer" not in modalities:
            raise ValueError("modalities must map 'rna_layer' to the expression modality.")
        mods = cls._create_modalities_attr_dict(modalities, setup_method_args)
        if mods.rna_layer in mdata.mod:
            check_source_genes(mdata.mod[mods.rna_layer].var_names, kwargs)
        covariates = as_key_list(covariate_keys)
        cov_mod = mods.covariate_keys
        for arg in ("treatment_key", "dose_key"):
            if mods[arg] != mods.treatment_key and locals()[arg] is not None:
                raise ValueError("treatment_key and dose_key must be read from the same place.")

        def get_column(key):
            mod = cov_mod if key in covariates else mods.treatment_key
            return obs_column(mdata, key, mod_key=mod)

        def columns_of(mod):
            return list((mdata.mod[mod] if mod else mdata).obs.columns)

        available = set(columns_of(mods.treatment_key)) | set(columns_of(cov_mod))
        check_setup_columns(
            get_column,
            sorted(available),
            treatment_key,
            control_treatment,
            covariates,
            dose_key,
            require_control="source_registry" not in kwargs,
        )
        matrix, name = _data_matrix(mdata, rna_layer, mods.rna_layer)
        check_expression(matrix, name, counts=False)
        fields = [
            MuDataLayerField(
                X_KEY, rna_layer, mod_key=mods.rna_layer, is_count_data=False, mod_required=True
            ),
            MuDataCategoricalObsField(TREATMENT_KEY, treatment_key, mod_key=mods.treatment_key),
        ]
        if covariates:
            fields.append(
                MuDataCategoricalJointObsField(COVARIATES_KEY, covariates, mod_key=cov_mod)
            )
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        if "source_registry" in kwargs:
            recode_covariates(manager)
        cls.register_manager(manager)

    # ------------------------------------------------------------------ registry facts
    def _auto_dose_response(self, has_data: bool) -> str:
        """``"hill"`` if some treatment has two or more doses in the registered data."""
        if not has_data:
            return "linear"
        pairs = cell_treatments(self.adata_manager)
        components, doses = pairs.idx.reshape(-1), pairs.dose.reshape(-1)
        given = doses > 0
        distinct = pd.DataFrame({"k": components[given], "d": doses[given]}).drop_duplicates()
        several = bool((distinct.groupby("k").size() > 1).any())
        choice = "hill" if several else "linear"
        logger.info(
            f"dose_response='auto' -> {choice!r} ("
            + ("some treatment was given at several doses)." if several else "one dose each).")
        )
        return choice

    @property
    def treatment_encoder(self) -> TreatmentEncoder:
        """The encoder of treatment labels and doses into treatment vectors."""
        return treatment_encoder(self.registry_)

    @property
    def _setup(self) -> RegisteredSetup:
        """Where the model reads its data from (layer, modalities, columns)."""
        return RegisteredSetup.from_registry(self.registry_)

    @property
    def treatment_key(self) -> str:
        """The registered treatment column."""
        return self._setup.treatment_key

    @property
    def dose_key(self) -> str | None:
        """The registered dose column, or ``None`` (dose 1 for every treated cell)."""
        return self._setup.dose_key

    @property
    def covariate_keys(self) -> list[str]:
        """The registered covariate columns."""
        return self._setup.covariate_keys

    def _registered_matrix(self, adata):
        """The expression matrix the model reads from ``adata``, and a readable name."""
        setup = self._setup
        return _data_matrix(adata, setup.layer, setup.expression_modality)

    def _treated_categories(self) -> list[list[bool]] | None:
        """Per covariate, which categories have treated cells in the registered data."""
        if not self.covariate_keys:
            return None
        codes = covariate_codes(self.adata_manager)
        treated = ~control_mask(self.adata_manager)
        return [
            np.isin(np.arange(n), codes[treated, i]).tolist()
            for i, n in enumerate(self._n_cats_per_cov())
        ]

    def _n_cats_per_cov(self) -> list[int]:
        if not self.covariate_keys:
            return []
        return list(self.get_state_registry(COVARIATES_KEY).n_cats_per_key)

    # ------------------------------------------------------------------ data
    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """The registered data to read ``adata`` from, never writing into a user's new object.

        The training data (or data registered with this model before) is validated as in
        scvi-tools. Any other AnnData / MuData (including a view) is checked against the model
        (genes, columns, categories, values) and a stand-in sharing its arrays is registered and
        returned instead: prediction adds nothing to the user's object.
        """
        if adata is None and self.adata is None:
            raise ValueError(
                "This model was loaded without data: pass adata=... (with the model's genes "
                "and obs columns)."
            )
        if adata is None or self._is_registered(adata):
            check_store(self.adata if adata is None else adata)  # a store rewritten since setup
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        self._check_new_data(adata)
        setup = self._setup
        proxy = stand_in(adata, setup)
        if self.adata_manager is None:  # loaded without data: replay the saved setup
            cls = type(self)
            method = setup_method_name(self.registry_)
            getattr(cls, method)(proxy, source_registry=self.registry_, **setup.args)
            manager = cls._get_most_recent_anndata_manager(proxy, required=True)
            forget_setup_manager(cls, manager.adata_uuid)
        else:
            with plain_obs_index(proxy):  # Arrow names (a store's) stay Arrow
                manager = self.adata_manager.transfer_fields(proxy)
                recode_covariates(manager)
        self._register_manager_for_instance(manager)
        # keep the managers of the last few stand-ins only (each holds its data)
        if not hasattr(self, "_stand_ins"):
            self._stand_ins = deque()
        self._stand_ins.append(manager.adata_uuid)
        while len(self._stand_ins) > MAX_STAND_INS:
            forget_instance_manager(self, self._stand_ins.popleft())
        return proxy

    def _is_registered(self, adata) -> bool:
        """Whether this very object is registered with this model (without writing to it)."""
        manager = instance_manager(self, data_uuid(adata))
        return manager is not None and manager.adata is adata

    def _check_new_data(self, adata) -> None:
        """Clear errors for data that does not match the model (genes, columns, categories)."""
        setup = self._setup
        check_data_kind(adata, setup)
        genes_source = setup.expression_data(adata)
        if genes_source.n_obs == 0:
            raise ValueError("adata has no cells.")
        check_genes(genes_source.var_names, setup.genes(self.get_var_names()))
        check_expression(*self._registered_matrix(adata), counts=self.module.likelihood == "nb")
        if self.dose_key is not None:
            if self.dose_key not in setup.obs(adata, "dose_key").columns:
                raise KeyError(
                    f"Column {self.dose_key!r} (the model's dose_key) not found in adata.obs."
                )
        checks = [(self.treatment_key, "treatment_key", TREATMENT_KEY)]
        checks += [(key, "covariate_keys", key) for key in self.covariate_keys]
        for key, argument, registry_key in checks:
            where = setup.obs(adata, argument)
            if key not in where.columns:
                raise KeyError(f"Column {key!r} (used by the model) not found in adata.obs.")
            if registry_key == TREATMENT_KEY:
                known = self.get_state_registry(TREATMENT_KEY).categorical_mapping
            else:
                known = self.get_state_registry(COVARIATES_KEY).mappings[key]
            # to_numpy: numpy's look-up of array attributes on a Series hashes its index
            values = pd.Series(where[key].to_numpy(dtype=object))
            if values.isna().any():
                raise ValueError(f"obs[{key!r}] has {int(values.isna().sum())} missing values.")
            unseen = sorted(set(values.astype(str)) - {str(k) for k in known})
            if unseen:
                raise ValueError(
                    f"Category {unseen[0]!r} of obs[{key!r}] was not seen when the model was "
                    f"trained (known: {list(known)[:10]}). Predict only for known categories."
                )

    def _loader(self, adata, indices=None, batch_size: int | None = None) -> FCRDataLoader:
        if indices is not None and len(indices) == 0:
            raise ValueError("indices is empty: select at least one cell.")
        manager = self.get_anndata_manager(adata, required=True)
        return FCRDataLoader(
            manager, indices=indices, batch_size=batch_size or self._inference_batch_size()
        )

    def _inference_batch_size(self) -> int:
        """Default cells per inference minibatch (see ``INFERENCE_VALUES``)."""
        n_genes = max(int(self.summary_stats.n_vars), 1)
        return max(INFERENCE_BATCH_SIZE, INFERENCE_VALUES // n_genes)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 256,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        shrinkage: bool = True,
        **trainer_kwargs,
    ):
        """Train the model.

        At its end (on one device), the axes in which z_tx is reported are chosen
        (:meth:`align_interaction_axes`, minibatches of ``batch_size``, on at most 200,000
        cells drawn with the seed), then, with ``shrinkage``, how far predictions of
        unmeasured pairs shrink.

        Parameters
        ----------
        max_epochs
            Passes through the data. ``None``: scvi-tools' heuristic from the number of cells
            (400 for 20,000 cells or fewer, fewer for larger data).
        accelerator, devices
            Lightning accelerator and devices (``"auto"`` uses a GPU when there is one).
            For several devices pass ``strategy="ddp"`` too (see the multi-GPU page of the
            documentation): each process then reads its share of the cells, ``batch_size``
            cells per minibatch, and early stopping is off.
        train_size, validation_size
            Fractions of cells for training and validation (default 0.9 / 0.1).
        batch_size
            Cells per minibatch (each comes with its control partner).
        early_stopping
            Stop when ``early_stopping_monitor`` stops improving for
            ``early_stopping_patience`` epochs (default 45). The default monitor is
            ``"elbo_validation"``, the validation cells' own negative ELBO, not
            ``"validation_loss"`` (the whole objective, adversarial term included): see
            :class:`~fcr_tools.FCRTrainingPlan` for why and for every logged metric.
        plan_kwargs
            Arguments of :class:`~fcr_tools.FCRTrainingPlan`: learning rates and the weight of
            every term of the objective.
        datasplitter_kwargs
            Arguments of the data splitter, e.g. ``{"external_indexing": [train, val, test]}``.
        shrinkage
            Then choose how far predictions of (context, treatment) pairs never measured shrink
            towards the context-adjusted additive baseline (:meth:`fit_shrinkage`: a second
            training, on the data without some measured pairs, so training takes about twice
            as long). It is
            skipped, with a log message, where it cannot be chosen (data too small, every
            treatment measured in one context only, MuData, an on-disk store, the negative
            binomial, several devices); if the second training fails, a warning says why and
            the trained model is kept. It holds one more copy of the training data (without
            the held-out pairs) while it runs. ``False``: predictions are FCR's own.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning), e.g. ``strategy="ddp"``.

        Examples
        --------
        >>> model.train(max_epochs=100, plan_kwargs={"adversarial_weight": 0.5})  # doctest: +SKIP
        """
        self._validate_anndata()  # re-registers FCR's fields if another setup replaced them
        # the data may have been edited since setup; a store cannot be edited in memory and
        # _validate_anndata checked that its file is the one scanned at setup
        nb = self.module.likelihood == "nb"
        if not is_store(self.adata):
            check_expression(*self._registered_matrix(self.adata), counts=nb)
        strategy = trainer_kwargs.get("strategy")
        if isinstance(strategy, str) and strategy in _DDP_FIND_UNUSED:
            trainer_kwargs["strategy"] = _DDP_FIND_UNUSED[strategy]
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "elbo_validation")
        settings = dict(
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
        )
        result = super().train(
            max_epochs=max_epochs,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **settings,
            **trainer_kwargs,
        )
        release_fit_loaders(getattr(self, "trainer", None))  # arrays of every cell
        # what was chosen for the model before this training is stale
        self.shrinkage_ = None
        self.interaction_axes_ = None
        several_devices = strategy not in (None, "auto") or devices not in ("auto", 1, [0], "1")
        if several_devices:
            logger.info("z_tx is reported in the module's own axes: trained on several devices.")
        else:
            try:  # in minibatches of the training's size, which the user chose for memory
                self.align_interaction_axes(indices=self._alignment_cells(), batch_size=batch_size)
            except Exception as err:  # the model itself is trained: keep it, say what failed
                warnings.warn(
                    f"Aligning the axes of z_tx failed ({type(err).__name__}: {err}); z_tx is "
                    "reported in the module's own axes. model.align_interaction_axes() retries.",
                    UserWarning,
                    stacklevel=2,
                )
        if shrinkage:
            repeated = {k: v for k, v in trainer_kwargs.items() if k not in _NOT_REPEATED}
            try:
                if several_devices:
                    raise ShrinkageUnavailable("training on several devices (DDP).")
                self.fit_shrinkage(plan_kwargs=plan_kwargs, **settings, **repeated)
            except ShrinkageUnavailable as err:
                logger.info(f"Predictions of unmeasured pairs are FCR's own: {err}")
            except Exception as err:  # the model itself is trained: keep it, say what failed
                warnings.warn(
                    f"Choosing the shrinkage of unmeasured pairs failed ({type(err).__name__}: "
                    f"{err}); their predictions are FCR's own. model.fit_shrinkage() retries "
                    "it (train(shrinkage=False) skips it).",
                    UserWarning,
                    stacklevel=2,
                )
        return result

    def fit_shrinkage(
        self,
        max_epochs: int | None = None,
        seed: int | None = None,
        min_cells: int = SHRINKAGE_MIN_CELLS,
        plan_kwargs: dict | None = None,
        **train_kwargs,
    ) -> float:
        """Choose how far predictions of unmeasured pairs shrink towards a baseline.

        :meth:`train` calls this at its end (``shrinkage=True``, the default). Some measured
        (context, treatment) pairs of the training data are held out again: ``max(1, n // 5)``
        of the ``n`` treated pairs whose treatment (or each part of a combination ``"A+B"``)
        is measured in another pair, at most one per treatment, drawn with ``seed``. A second
        FCR with this model's settings is trained without them, and the weight ``w`` is the
        least-squares weight of ``w * FCR + (1 - w) * baseline`` on their group means (all
        genes, clipped to [0, 1]), the baseline being
        :class:`~fcr_tools.baselines.ContextAdjustedBaseline` of the training data (the
        additive baseline adjusted for where a context's controls start; for the held-out
        pairs, that of the training data without them). From then on
        :meth:`predict_counterfactual` and :meth:`predict_grid` return that blend for cells
        whose (context, target treatment, dose) was not measured in training, and FCR's own
        prediction for the rest. ``w`` near 1 says FCR's interactions transfer to unmeasured
        pairs; near 0, that composing the main effects additively predicts them better. The
        weight, the pairs, the baseline's kind (``"target"``) and slope, the weight's
        least-squares sums (``"sums"``; ``"sums_top_degs"``: the same on each held-out group's
        top 20 / 50 DEGs only, an alternative measured and not chosen, see the benchmarks
        page) and the training data's group means are kept in ``shrinkage_`` and saved with
        the model. Models saved before the context adjustment keep the plain additive
        baseline they chose their weight against.

        Parameters
        ----------
        max_epochs
            Epochs of the second training (``None``: as many as this model was trained for).
        seed
            Seed of the pair draw and the second training (``None``: ``scvi.settings.seed``).
        min_cells
            Smallest held-out (context, treatment, dose) group used to choose the weight.
        plan_kwargs, **train_kwargs
            Passed to :meth:`train` of the second model; give what this model was trained
            with.

        Returns
        -------
        The weight ``w``.

        Raises
        ------
        ValueError
            When it cannot be chosen (the message says why): the model is not trained; its
            training data are not an AnnData in memory; the likelihood is not Gaussian; no
            measured pair can be held out, or none has ``min_cells`` cells.

        Examples
        --------
        >>> w = model.fit_shrinkage(max_epochs=2, min_cells=5)
        >>> 0.0 <= w <= 1.0, model.shrinkage_["weight"] == w
        (True, True)
        """
        if not self.is_trained_:
            raise ValueError("Train the model first: model.train().")
        if max_epochs is None:
            max_epochs = len(self.history["train_loss"])
        record = fit_shrinkage(self, max_epochs, seed, min_cells, plan_kwargs, **train_kwargs)
        self.shrinkage_ = record
        logger.info(
            f"Predictions of unmeasured pairs: {record['weight']:.2f} x FCR + "
            f"{1 - record['weight']:.2f} x {target_name(record)} (chosen on held-out pairs "
            f"{record['pairs']})."
        )
        return record["weight"]

    def align_interaction_axes(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Choose the axes in which z_tx is reported: those its conditional prior says.

        FCR's prior gives z_tx a diagonal Gaussian law in each (covariate, treatment, dose)
        condition, with variances that change between conditions; in the true axes the
        cells of every condition have uncorrelated components. Training identifies z_tx only
        up to a rotation in practice (the likelihood that tells the axes apart is weak), so
        this finds the rotation ``R`` under which the cells' aggregate posterior in each
        condition is closest to diagonal (least total correlation, weighted by the
        conditions' cells), and from then on :meth:`get_latent_representation` and
        :meth:`write_latents` report z_tx as ``z_tx @ R.T``. :meth:`train` calls it at its
        end (on one device). A rotation keeps every distance, so neighbour graphs, UMAPs and
        clusters of z_tx, and every prediction, are unchanged: only what each column of z_tx
        means moves. :meth:`inference_batches`, :meth:`counterfactual_latents`,
        :meth:`decode` and :func:`fcr_tools.tl.latent_usage` keep the module's own axes.

        ``interaction_axes_`` holds ``"rotation"`` (``R``), ``"total_correlation"`` and
        ``"total_correlation_aligned"`` (nats per cell, before and after the rotation) and
        ``"n_conditions"``; it is saved with the model. Set it to ``None`` to report the
        module's own axes.

        Parameters
        ----------
        adata
            Cells whose conditions choose the axes (default: the training data).
        indices
            Cells to use (default all).
        seed
            Seed of the search's random starting points (``None``: ``scvi.settings.seed``).
        batch_size
            Cells per inference minibatch (default as in :meth:`get_latent_representation`).

        Returns
        -------
        The rotation ``R``, ``(n_latent_tx, n_latent_tx)``.

        Examples
        --------
        >>> R = model.align_interaction_axes()
        >>> bool(np.allclose(R @ R.T, np.eye(len(R))))
        True
        >>> record = model.interaction_axes_
        >>> record["total_correlation_aligned"] <= record["total_correlation"]
        True
        """
        means, variances, conditions = [], [], []
        # the encoder's samples draw from torch's generator: leave its state as it was, so
        # that what follows (the shrinkage's training) is the same with or without this
        device = self.module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for out in self.inference_batches(adata, indices, batch_size):
                posterior = out["qz_tx"]
                means.append(posterior.loc.double().cpu().numpy())
                variances.append((posterior.scale.double() ** 2).cpu().numpy())
                columns = [out["covs"], out["t_idx"], out["t_dose"]]
                conditions.append(
                    np.hstack([c.reshape(len(c), -1).double().cpu().numpy() for c in columns])
                )
        _, groups = np.unique(np.concatenate(conditions), axis=0, return_inverse=True)
        covs, counts = condition_covariances(
            np.concatenate(means), np.concatenate(variances), groups.reshape(-1)
        )
        rotation = fit_rotation(covs, counts, scvi.settings.seed if seed is None else seed)
        before = total_correlation(covs, counts)
        after = total_correlation(covs, counts, rotation)
        self.interaction_axes_ = {
            "rotation": rotation,
            "total_correlation": before,
            "total_correlation_aligned": after,
            "n_conditions": len(counts),
        }
        logger.info(
            f"z_tx is reported in its aligned axes: total correlation within conditions "
            f"{before:.3f} -> {after:.3f} nats per cell ({len(counts)} conditions)."
        )
        return rotation

    def _alignment_cells(self) -> np.ndarray | None:
        """All cells (``None``), or ``ALIGN_MAX_CELLS`` of them drawn with the seed, in order."""
        n_cells = self.adata.n_obs
        if n_cells <= ALIGN_MAX_CELLS:
            return None
        rng = np.random.default_rng(scvi.settings.seed)
        return np.sort(rng.choice(n_cells, ALIGN_MAX_CELLS, replace=False))

    def _reported(self, block: str, values: torch.Tensor) -> torch.Tensor:
        """A block's latents in the axes they are reported in (z_tx: its aligned axes)."""
        record = self.interaction_axes_
        if block != "tx" or record is None:
            return values
        rotation = torch.as_tensor(record["rotation"], dtype=values.dtype, device=values.device)
        return values @ rotation.T

    # ------------------------------------------------------------------ save / load
    def save(self, dir_path: str, prefix: str | None = None, overwrite: bool = False, **kwargs):
        """Save the model (weights, setup, init parameters, fcr_tools version) to ``dir_path``.

        Parameters
        ----------
        dir_path
            Directory to write (``model.pt``, and ``adata.h5ad`` with ``save_anndata=True``).
        prefix
            Prefix of the file names.
        overwrite
            Overwrite an existing directory.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save` (e.g. ``save_anndata``).

        Examples
        --------
        >>> import os
        >>> model.save("fcr_model", overwrite=True)
        >>> os.listdir("fcr_model")
        ['model.pt']
        """
        self.fcr_version_ = version_info()
        history = self.history_
        self.history_ = portable_history(history)  # readable under pandas 2 and 3
        try:
            super().save(dir_path, prefix=prefix, overwrite=overwrite, **kwargs)
        finally:
            self.history_ = history

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: ad.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        **kwargs,
    ):
        """Load a model saved with :meth:`save`.

        Fails with a message naming the path for a missing, truncated or corrupt directory or a
        model of another class, and naming the versions for a model saved in a newer format or
        in an older one this version cannot read.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            Data to load the model onto (set up from the saved setup; needs the model's genes
            and obs columns). ``None``: the data saved with the model, if any.
        accelerator, device
            Where to put the model.
        prefix
            Prefix of the file names.
        backup_url
            URL to download ``model.pt`` from when it is missing.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Examples
        --------
        >>> model.save("fcr_model", overwrite=True)
        >>> model = FCRModel.load("fcr_model", adata=adata)
        """
        info, saved = None, None
        if backup_url is None:
            names = [cls.__name__, *(kwargs.get("allowed_classes_names_list") or [])]
            saved = read_saved_model(dir_path, prefix, adata is None, names)
            info = saved["attr_dict"].get("fcr_version_")
        # a model of an older format is read with the arguments it predates, their values then,
        # among its saved __init__ arguments, from which __init__ builds its architecture; a
        # model downloaded by scvi-tools (backup_url) is read as it is
        if saved is None:
            source = nullcontext((dir_path, prefix, adata))
        else:
            source = loadable_save(dir_path, prefix, saved, adata)
        try:
            with source as (path, name, data):
                model = super().load(
                    path,
                    adata=data,
                    accelerator=accelerator,
                    device=device,
                    prefix=name,
                    backup_url=backup_url,
                    **kwargs,
                )
        except (RuntimeError, TypeError) as err:
            text = str(err)
            if "state_dict" not in text and "unexpected keyword argument" not in text:
                raise
            raise ValueError(
                f"The model at {os.fspath(dir_path)!r} was saved by {describe_version(info)} "
                f"and cannot be loaded by {describe_version(version_info())}: {text}"
            ) from err
        if backup_url is None and info is None:
            model.fcr_version_ = None  # saved before versions were recorded
        return model

    # ------------------------------------------------------------------ latents
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        block: Block | Sequence[str] = "all",
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent representation of each cell.

        Parameters
        ----------
        adata
            Data with the model's genes and columns (default: the training data).
        indices
            Cells to use (default all).
        block
            ``"x"`` (covariate), ``"t"`` (treatment), ``"tx"`` (interaction), ``"all"`` (the
            three concatenated in that order) or a list of blocks.
        give_mean
            Posterior means (default) or one sample.
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells: inference needs no small batches).

        Returns
        -------
        Array ``(n_cells, n_dims)``. z_tx is in its aligned axes (rotated by
        ``interaction_axes_["rotation"]``, see :meth:`align_interaction_axes`), z_x and z_t as
        the module gives them.

        Examples
        --------
        >>> z_tx = model.get_latent_representation(block="tx")
        >>> z_tx.shape == (adata.n_obs, model.module.n_latent["tx"])
        True
        """
        blocks = _selected_blocks(block)
        parts = []
        for out in self.inference_batches(adata, indices, batch_size):
            chosen = [
                self._reported(b, out[f"qz_{b}"].loc if give_mean else out[f"z_{b}"])
                for b in blocks
            ]
            parts.append(torch.cat(chosen, -1).cpu().numpy())
        return np.concatenate(parts)

    def _on_device(self, loader) -> Iterator[dict[str, torch.Tensor]]:
        """The loader's minibatches, moved to the model's device."""
        device = self.module.device
        for tensors in loader:
            yield {key: value.to(device) for key, value in tensors.items()}

    def _batches(
        self, adata, indices=None, batch_size: int | None = None, loader=None
    ) -> Iterator[dict]:
        """Inference outputs of each minibatch of already validated data, cells in order."""
        loader = self._loader(adata, indices, batch_size) if loader is None else loader
        start = 0
        for tensors in self._on_device(loader):
            inputs = self.module._get_inference_input(tensors)
            inputs.pop("n_primary")
            out = self.module.inference(**inputs)
            n = out["library"].shape[0]
            out["indices"] = loader.indices[start : start + n]
            start += n
            yield out

    @torch.inference_mode()
    def inference_batches(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> Iterator[dict]:
        """Run the encoder over cells, one minibatch at a time.

        The one way to reach the model's inference from outside: the data are checked once
        (as in :meth:`get_latent_representation`), then each minibatch's outputs are yielded,
        in the order of the cells.

        Parameters
        ----------
        adata
            Data with the model's genes and columns (default: the training data).
        indices
            Cells to use (default all).
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells).

        Yields
        ------
        dict
            The module's inference outputs for the minibatch (tensors on the model's device,
            created in inference mode): ``qz_x``, ``qz_t``, ``qz_tx`` (posteriors),
            ``pz_x``, ``pz_t``, ``pz_tx`` (conditional priors), ``z_*`` (one sample each),
            ``library``, ``covs`` (covariate codes), ``e_x`` and ``e_tx`` (context
            embeddings); and ``indices``, the positions of its cells in ``adata``. z_tx is
            in the module's own axes here (what :meth:`counterfactual_latents` and
            :meth:`decode` take); :meth:`get_latent_representation` reports it rotated into
            its aligned axes (:meth:`align_interaction_axes`).

        Examples
        --------
        >>> for out in model.inference_batches(adata, batch_size=100):
        ...     z_t = out["qz_t"].loc  # posterior means of z_t
        ...     blocks = model.counterfactual_latents(out, "drug_1", dose=0.3)
        ...     expression = model.decode(blocks, out)["mean"]
        ...     print(len(out["indices"]), tuple(expression.shape))
        100 (100, 30)
        92 (92, 30)
        """
        adata = self._validate_anndata(adata)
        self.module.eval()
        yield from self._batches(adata, indices, batch_size)

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        n_samples: int = 1,
        return_parts: bool = False,
    ) -> float | dict[str, float]:
        """The cells' negative ELBO per cell (as ``elbo_validation`` in the history).

        The reconstruction negative log-likelihood of each cell's own expression plus the KL
        divergence of its three blocks from their conditional priors, averaged over cells
        (scvi-tools' sign convention: lower is better). Each cell is evaluated on its own: no
        control partner and no auxiliary term of the training objective.

        Parameters
        ----------
        adata
            Data with the model's genes and columns (default: the training data).
        indices
            Cells to use (default all).
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells).
        n_samples
            Draws of the latents per cell to average over (the reconstruction term is a
            Monte Carlo estimate; set ``scvi.settings.seed`` to repeat it).
        return_parts
            Return ``{"elbo": ..., "reconstruction_loss": ..., "kl_local": ...}``.

        Returns
        -------
        The mean negative ELBO per cell, or its parts.

        Examples
        --------
        >>> parts = model.get_elbo(return_parts=True)
        >>> round(abs(parts["elbo"] - parts["reconstruction_loss"] - parts["kl_local"]), 6)
        0.0
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples!r}.")
        adata = self._validate_anndata(adata)
        self.module.eval()
        # the ELBO's terms only: every auxiliary term off (a term of weight 0 is not computed)
        elbo_only = {t.weight: 0.0 for t in LOSS_TERMS if t.weight != "reconstruction_weight"}
        elbo_only["kl_weight"] = 1.0
        nll = kl = 0.0
        n_cells = 0
        for tensors in self._on_device(self._loader(adata, indices, batch_size)):
            n_cells += tensors[X_KEY].shape[0]
            for _ in range(n_samples):
                _, _, loss = self.module(tensors, loss_kwargs=elbo_only)
                nll += loss.reconstruction_loss_sum.item() / n_samples
                kl += loss.kl_local_sum.item() / n_samples
        parts = {"reconstruction_loss": nll / n_cells, "kl_local": kl / n_cells}
        parts["elbo"] = parts["reconstruction_loss"] + parts["kl_local"]
        return parts if return_parts else parts["elbo"]

    @property
    def summary(self) -> str:
        """One paragraph describing the model (architecture, data, training state)."""
        state = "trained" if self.is_trained else "not trained"
        return f"{self._model_summary_string} ({state})"

    def _treatment_vector(self, treatment: str, dose=None) -> torch.Tensor:
        """Dense treatment vector ``(1, n_components)`` of a label and dose, checked."""
        return self._treatment_vectors([(treatment, dose)])[0]

    def _treatment_vectors(self, targets) -> list[torch.Tensor]:
        """:meth:`_treatment_vector` of each (label, dose) target, encoded together."""
        encoder = self.treatment_encoder
        idx = np.empty((len(targets), encoder.max_parts), dtype=np.int64)
        doses = np.empty((len(targets), encoder.max_parts), dtype=np.float32)
        # at most two encodings: targets without a dose (dose 1) and targets with one
        for given in (False, True):
            rows = [k for k, (_, d) in enumerate(targets) if (d is not None) == given]
            if rows:
                labels = [str(targets[k][0]) for k in rows]
                values = [targets[k][1] for k in rows] if given else None
                idx[rows], doses[rows] = encoder.encode(labels, values)
        device = self.module.device
        with torch.inference_mode():
            vectors = self.module.treatment_vector(
                torch.as_tensor(idx, device=device), torch.as_tensor(doses, device=device)
            )
        return list(vectors.split(1))

    @torch.inference_mode()
    def counterfactual_latents(
        self,
        outputs: dict,
        treatment: str,
        dose: float | str | None = None,
        mode: Literal["prior", "sample", "abduction"] = "abduction",
    ) -> dict[str, torch.Tensor]:
        """Latent blocks of a minibatch's cells had they received ``treatment`` at ``dose``.

        Parameters
        ----------
        outputs
            One minibatch from :meth:`inference_batches`.
        treatment, dose, mode
            As in :meth:`predict_counterfactual`.

        Returns
        -------
        ``{"x": ..., "t": ..., "tx": ...}``: z_x is each cell's posterior mean; z_t and z_tx
        follow ``mode``.
        """
        check_mode(mode)
        vector = self._treatment_vector(treatment, dose)
        n = outputs["library"].shape[0]
        return self.module.counterfactual_latents(outputs, vector.expand(n, -1), mode=mode)

    @torch.inference_mode()
    def decode(self, blocks: dict[str, torch.Tensor], outputs: dict) -> dict[str, torch.Tensor]:
        """Expected expression of latent blocks (the decoder), for a minibatch's cells.

        Parameters
        ----------
        blocks
            ``{"x": z_x, "t": z_t, "tx": z_tx}``, e.g. from :meth:`counterfactual_latents`
            or the posterior means of :meth:`inference_batches`.
        outputs
            The minibatch from :meth:`inference_batches` (for the cells' library sizes).

        Returns
        -------
        ``{"mean": ...}``, expected expression on the registered data's scale (cells x
        genes); for the negative binomial also ``"normalized"`` (counts per 10,000).
        """
        z = torch.cat([blocks[b] for b in LATENT_BLOCKS], -1)
        gen = self.module.expected_expression(z, outputs["library"])
        result = {"mean": gen["px_mean"]}
        if self.module.likelihood == "nb":
            result["normalized"] = gen["px_scale"] * NORMALIZED_SCALE
        return result

    def write_latents(
        self,
        adata: ad.AnnData | None = None,
        prefix: str = "X_fcr",
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> None:
        """Write the three blocks to ``adata.obsm[f"{prefix}_x"]``, ``_t`` and ``_tx``.

        Use them like any embedding, e.g. ``sc.pp.neighbors(adata, use_rep="X_fcr_x")``. z_tx is
        written in its aligned axes, as :meth:`get_latent_representation` gives it.

        Parameters
        ----------
        adata
            Data to embed and write into (default: the training data).
        prefix
            Prefix of the obsm keys.
        give_mean
            Posterior means (default) or one sample.
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells: inference needs no small batches).

        Notes
        -----
        For a store (an AnnData in backed mode, see :func:`fcr_tools.data.read_store`) the
        blocks are written into the store's file, minibatch by minibatch, so that memory does
        not grow with the number of cells; ``adata.obsm`` in memory is left as it is. Open the
        store again to read them (``read_store(path).obsm["X_fcr_x"]``).

        Examples
        --------
        >>> import scanpy as sc
        >>> model.write_latents()
        >>> sc.pp.neighbors(adata, use_rep="X_fcr_t")
        """
        target = self.adata if adata is None else adata
        if is_store(target):
            self._write_latents_to_store(target, prefix, give_mean, batch_size)
            return
        latent = self.get_latent_representation(
            target, block="all", give_mean=give_mean, batch_size=batch_size
        )
        sizes = [self.module.n_latent[b] for b in LATENT_BLOCKS]
        split = np.split(latent, np.cumsum(sizes)[:-1], axis=1)
        for block, values in zip(LATENT_BLOCKS, split, strict=True):
            target.obsm[f"{prefix}_{block}"] = values

    def _write_latents_to_store(self, store, prefix: str, give_mean: bool, batch_size) -> None:
        """write_latents into a backed AnnData's file, one minibatch at a time."""
        widths = {f"{prefix}_{b}": self.module.n_latent[b] for b in LATENT_BLOCKS}
        with writable(store) as h5file:  # reopened before the loader reads X from it
            arrays = create_obsm_arrays(h5file, store.n_obs, widths)
            for out in self.inference_batches(store, batch_size=batch_size):
                rows = out["indices"]  # consecutive cells, in order
                where = slice(int(rows[0]), int(rows[-1]) + 1)
                for block, key in zip(LATENT_BLOCKS, widths, strict=True):
                    values = out[f"qz_{block}"].loc if give_mean else out[f"z_{block}"]
                    arrays[key][where] = self._reported(block, values).cpu().numpy()

    # ------------------------------------------------------------------ counterfactuals
    @torch.inference_mode()
    def predict_counterfactual(
        self,
        adata: ad.AnnData | None = None,
        treatment: str | None = None,
        dose: float | str | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        mode: Literal["prior", "sample", "abduction"] = "abduction",
        shrinkage: bool = True,
    ) -> ad.AnnData:
        """Expected expression of cells had they received ``treatment`` at ``dose``.

        Usually called on control cells; works for any (covariate, treatment) pair whose
        covariate and treatment were each seen in training, measured together or not.

        Parameters
        ----------
        adata
            Cells to transform (default: the training data), with the model's genes.
        treatment
            Target treatment label (a known treatment, a ``"A+B"`` combination of known
            treatments, or the control label).
        dose
            Target dose (a number, or ``"d1+d2"`` for combinations). ``None``: 1.0.
        indices
            Cells to use (default all).
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells: inference needs no small batches).
        mode
            ``"abduction"`` (default): z_t and z_tx are the prior means of the target
            treatment plus each cell's own deviation from the prior means of its observed
            treatment (abduction, action, prediction: the cell keeps what is its own and
            only the treatment changes); ``"prior"``: the prior means alone (the population
            response of the cell's context); ``"sample"``: one draw of z_t and z_tx from the
            target's priors per cell, so the predicted cells spread like a treated
            population (random: set ``scvi.settings.seed`` to repeat it).
        shrinkage
            For a cell whose (context, target treatment, dose) was never measured in training,
            return ``w * FCR + (1 - w) * additive``, with the weight ``w`` that :meth:`train`
            chose (:meth:`fit_shrinkage`; recorded per cell in ``obs["shrinkage_weight"]``).
            ``False``, or a model without a chosen weight: FCR's own prediction.

        Returns
        -------
        AnnData with the cells' obs_names and the model's genes. ``.X`` is the expected
        expression on the registered data's scale: log-normalised for ``"gaussian"``; for
        ``"nb"``, expected counts at each cell's observed library size, with the normalised
        expression (counts per 10,000) in ``layers["normalized"]``. ``obs`` carries the target
        treatment and dose, the observed treatment in ``obs["source_<treatment_key>"]`` and,
        with shrinkage, FCR's weight in each row in ``obs["shrinkage_weight"]``.

        Examples
        --------
        >>> controls = adata[adata.obs["drug"] == "control"].copy()
        >>> pred = model.predict_counterfactual(controls, treatment="drug_1", dose=1.0)
        >>> pred.shape == controls.shape, pred.obs["drug"].unique().tolist()
        (True, ['drug_1'])
        """
        if treatment is None:
            raise ValueError("treatment is required: the target treatment label.")
        return self._predict(
            [(str(treatment), dose)], adata, indices, batch_size, mode, shrinkage=shrinkage
        )

    @torch.inference_mode()
    def predict_grid(
        self,
        adata: ad.AnnData | None = None,
        treatment: str | Sequence[str] | None = None,
        dose: float | str | Sequence[float | str] | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        mode: Literal["prior", "sample", "abduction"] = "abduction",
        aggregate: Literal["cells", "mean"] = "cells",
        groupby: str | Sequence[str] | None = None,
        shrinkage: bool = True,
    ) -> ad.AnnData:
        """Counterfactuals of the same cells for a grid of (treatment, dose) targets, in one pass.

        Every treatment at every dose (the control label once, without a dose). The data are
        checked and encoded once, and the encoder runs once per cell; only the priors and the
        decoder run per target, so a grid costs far less than one
        :meth:`predict_counterfactual` call per target.

        Parameters
        ----------
        adata
            Cells to transform (default: the training data), with the model's genes.
        treatment
            A target treatment label or a list of them (as in :meth:`predict_counterfactual`).
        dose
            A dose, a list of doses (each treatment is predicted at each), or ``None`` (1.0).
        indices
            Cells to use (default all).
        batch_size
            Cells per minibatch (default: about 4 million expression values' worth, at least
            1,024 cells).
        mode
            As in :meth:`predict_counterfactual`.
        aggregate
            ``"cells"`` (default): one row per cell and target, the targets one after the
            other (the rows of ``predict_counterfactual`` for each target, stacked). ``"mean"``:
            one row per (group of ``groupby``, target), the mean expected expression of the
            group's cells, computed without a row per cell.
        groupby
            obs column(s) that define the groups of ``aggregate="mean"`` (default: the
            model's covariates, i.e. one row per context and target).
        shrinkage
            As in :meth:`predict_counterfactual` (a group's ``shrinkage_weight`` is the mean
            of its cells').

        Returns
        -------
        AnnData with the model's genes. ``obs`` holds the target's treatment and dose (in the
        model's treatment and dose columns), ``target`` (its number in the grid) and: per cell,
        the cell's obs, ``source_<treatment_key>`` and ``source_cell`` (its obs name; obs names
        are ``"<cell>-<target>"``); per group, the ``groupby`` columns and ``n_cells``. ``X``
        and ``layers["normalized"]`` as in :meth:`predict_counterfactual`.

        Examples
        --------
        >>> controls = adata[adata.obs["drug"] == "control"]
        >>> grid = model.predict_grid(controls, treatment=["drug_1", "drug_2"], dose=[0.3, 1.0])
        >>> grid.n_obs == 4 * controls.n_obs
        True
        >>> means = model.predict_grid(
        ...     controls, treatment=["drug_1", "drug_2"], dose=[0.3, 1.0], aggregate="mean"
        ... )
        >>> means.obs[["cell_line", "drug", "dose", "n_cells"]]
                         cell_line    drug  dose  n_cells
        cell_line_0-0  cell_line_0  drug_1   0.3       24
        cell_line_1-0  cell_line_1  drug_1   0.3       24
        cell_line_0-1  cell_line_0  drug_1   1.0       24
        cell_line_1-1  cell_line_1  drug_1   1.0       24
        cell_line_0-2  cell_line_0  drug_2   0.3       24
        cell_line_1-2  cell_line_1  drug_2   0.3       24
        cell_line_0-3  cell_line_0  drug_2   1.0       24
        cell_line_1-3  cell_line_1  drug_2   1.0       24
        """
        if aggregate not in ("cells", "mean"):
            raise ValueError(f"aggregate must be 'cells' or 'mean', not {aggregate!r}.")
        if aggregate == "cells" and groupby is not None:
            raise ValueError("groupby is used with aggregate='mean' only.")
        targets = grid_targets(treatment, dose, self.treatment_encoder.control)
        return self._predict(
            targets,
            adata,
            indices,
            batch_size,
            mode,
            grid=True,
            aggregate=aggregate,
            groupby=groupby,
            shrinkage=shrinkage,
        )

    def _predict(
        self,
        targets,
        adata,
        indices,
        batch_size,
        mode,
        grid=False,
        aggregate="cells",
        groupby=None,
        shrinkage=True,
    ) -> ad.AnnData:
        """Counterfactuals of ``targets`` ((label, dose) pairs) as one AnnData."""
        check_mode(mode)
        vectors = self._treatment_vectors(targets)  # checks every target
        adata = self._validate_anndata(adata)
        self.module.eval()
        loader = self._loader(adata, indices, batch_size)
        rows = np.asarray(loader.indices)
        obs = self._setup.obs(adata, "treatment_key").iloc[rows]
        obs = obs.loc[:, [c for c in obs.columns if not str(c).startswith("_scvi")]]
        groups, values, keys = None, None, []
        blend = self._shrinkage_baseline() if shrinkage else None
        contexts = None if blend is None else self._context_labels(adata, rows)
        if aggregate == "mean":
            keys = self.covariate_keys if groupby is None else as_key_list(groupby)
            frame = self._group_columns(adata, keys).iloc[rows]
            groups, values = group_codes(frame)
        # with shrinkage, means are taken per (group, context) and blended per context first
        parts, part_values = groups, values
        if aggregate == "mean" and blend is not None:
            parts, part_values = group_codes(pd.DataFrame({"group": groups, "ctx": contexts}))
        batches = self._batches(adata, loader=loader)
        n_parts = 0 if part_values is None else len(part_values)
        means, scales = counterfactual_expression(
            self.module, batches, vectors, mode, len(rows), parts, n_parts
        )
        weights = None
        if blend is not None:
            additive, weight = blend
            where = contexts if aggregate == "cells" else [c for _, c in part_values]
            weights = shrink(additive, weight, means, where, targets)
            if aggregate == "mean":
                owner = np.array([int(g) for g, _ in part_values])
                sizes = np.bincount(parts, minlength=n_parts).astype(np.float64)
                means, weights = (_pool(a, owner, sizes, len(values)) for a in (means, weights))
        if aggregate == "mean":
            n_groups = len(values)
            counts = np.bincount(groups, minlength=n_groups)
            names = ["|".join(group) or "all" for group in values]
            # the groups' own treatment / dose columns become source_<column>, as per cell
            targets_columns = (self.treatment_key, self.dose_key)
            columns = [f"source_{k}" if k in targets_columns else k for k in keys]
            obs = pd.DataFrame(values, columns=columns, index=names).astype("category")
            obs["n_cells"] = counts
        per_cell = aggregate == "cells"
        obs = self._target_obs(obs, targets, grid, per_cell)
        labels = list(dict.fromkeys(t for t, _ in targets))
        obs[self.treatment_key] = pd.Categorical(obs[self.treatment_key], categories=labels)
        result = ad.AnnData(
            X=means.reshape(-1, means.shape[-1]),
            obs=obs,
            var=pd.DataFrame(index=self._setup.expression_data(adata).var_names.copy()),
        )
        if scales is not None:  # counts per 10,000
            result.layers["normalized"] = scales.reshape(-1, scales.shape[-1])
        if weights is not None:  # FCR's share of each row (1: FCR's own prediction)
            result.obs["shrinkage_weight"] = weights.reshape(-1)
        if grid:
            described = {"targets": [[t, str(self._dose_of(t, d))] for t, d in targets]}
            described["aggregate"] = aggregate
        else:
            treatment, dose = targets[0]
            described = {"treatment": treatment, "dose": str(self._dose_of(treatment, dose))}
        described.update(mode=mode, likelihood=self.module.likelihood)
        result.uns["fcr_counterfactual"] = described
        return result

    def _shrinkage_baseline(self):
        """``(baseline, weight)`` of the chosen shrinkage, or ``None``."""
        record = self.shrinkage_
        if not record:
            return None
        cached = getattr(self, "_shrinkage_cache", None)
        if cached is None or cached[0] is not record:
            cached = (record, saved_target(record, self._setup, self.get_var_names()))
            self._shrinkage_cache = cached
        return cached[1], float(record["weight"])

    def _context_labels(self, adata, rows) -> np.ndarray:
        """Each row's covariate values joined by ``"|"`` (``"all"`` without covariates), as
        :class:`~fcr_tools.baselines.AdditiveBaseline` names contexts."""
        if not self.covariate_keys:
            return np.full(len(rows), "all", dtype=object)
        frame = self._group_columns(adata, self.covariate_keys).iloc[rows]
        labels = None
        for key in frame.columns:
            values = frame[key].astype(str).to_numpy(dtype=object)
            labels = values if labels is None else labels + "|" + values
        return labels

    def _dose_of(self, treatment: str, dose):
        """The dose recorded for a target: 0 for the control, 1.0 when not given."""
        if dose is None:
            return 0.0 if treatment == self.treatment_encoder.control else 1.0
        return dose

    def _target_obs(self, obs: pd.DataFrame, targets, grid: bool, per_cell: bool):
        """obs of the result: the source rows' obs once per target (target after target),
        with the target's treatment and dose and where each row came from."""
        n, n_targets = len(obs), len(targets)
        obs = obs.set_axis(plain_names(obs.index))  # the cells' names as Python strings
        index = obs.index.astype(str)
        obs = obs.iloc[np.tile(np.arange(n), n_targets)].copy()
        if per_cell:
            obs[f"source_{self.treatment_key}"] = obs.get(self.treatment_key)
        obs[self.treatment_key] = np.repeat(np.array([str(t) for t, _ in targets]), n)
        if self.dose_key is not None:
            doses = pd.Series([self._dose_of(t, d) for t, d in targets])  # dtype as given
            obs[self.dose_key] = doses.repeat(n).to_numpy()
        if grid:
            obs["target"] = np.repeat(np.arange(n_targets), n)
            if per_cell:
                obs["source_cell"] = np.tile(index.to_numpy(), n_targets)
            suffixes = np.repeat(np.array([f"-{k}" for k in range(n_targets)]), n)
            obs.index = pd.Index(
                np.char.add(np.tile(index.to_numpy().astype(str), n_targets), suffixes)
            )
        return obs

    def _group_columns(self, adata, keys: list[str]) -> pd.DataFrame:
        """The obs columns ``keys`` of (validated) ``adata``, for grouping."""
        setup = self._setup
        columns = {}
        for key in keys:
            argument = "covariate_keys" if key in self.covariate_keys else "treatment_key"
            where = setup.obs(adata, argument)
            if key not in where.columns:
                raise KeyError(f"Column {key!r} (groupby) not found in adata.obs.")
            columns[key] = where[key].to_numpy(dtype=object)  # see _check_new_data
        return pd.DataFrame(columns, index=setup.obs(adata, "treatment_key").index)


def _pool(values: np.ndarray, owner: np.ndarray, sizes: np.ndarray, n_groups: int):
    """Count-weighted means over parts (axis 1 of ``values``) of the groups ``owner`` names."""
    totals = np.zeros((values.shape[0], n_groups, *values.shape[2:]), dtype=np.float64)
    weighted = values * sizes.reshape(1, -1, *([1] * (values.ndim - 2)))
    np.add.at(totals, (slice(None), owner), weighted)
    counts = np.bincount(owner, weights=sizes, minlength=n_groups)
    return (totals / counts.reshape(1, -1, *([1] * (values.ndim - 2)))).astype(np.float32)
