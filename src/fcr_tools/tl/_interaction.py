"""Interaction strength per (context, treatment): how much of a response is context-specific."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from .._constants import COVARIATES_KEY, TREATMENT_KEY
from .._registration import RegisteredSetup

if TYPE_CHECKING:
    import anndata as ad

    from .._model import FCRModel

_NB_SCALE = 1e4


def _expression(module, blocks: list[torch.Tensor], library: torch.Tensor) -> torch.Tensor:
    """Decoded expression of the blocks [z_x, z_t, z_tx] on a log-normalised scale."""
    gen = module.generative(torch.cat(blocks, -1), library)
    if module.likelihood == "nb":
        return torch.log1p(gen["px_scale"] * _NB_SCALE)
    return gen["px_mean"]


def _contexts(model: FCRModel, adata) -> tuple[list[str], pd.DataFrame, np.ndarray, list]:
    """Covariate keys, the values and codes of each context, and each context's controls.

    Read from obs alone (the model checks the data when it encodes the cells).
    """
    data = model.adata if adata is None else adata
    setup = RegisteredSetup.from_registry(model.registry_)
    control = model.treatment_encoder.control
    treatments = np.asarray(setup.column(data, "treatment_key"), dtype=object).ravel()
    treatments = treatments.astype(str)
    controls = np.flatnonzero(treatments == control)
    if controls.size == 0:
        raise ValueError(
            "adata has no control cells: interaction_effects represents each context by its "
            f"control cells ({control!r})."
        )
    keys = list(model.covariate_keys)
    if not keys:
        return [], pd.DataFrame(index=[0]), np.zeros((1, 0), dtype=np.int64), [controls]
    mappings = model.get_state_registry(COVARIATES_KEY).mappings
    codes = np.empty((controls.size, len(keys)), dtype=np.int64)
    for j, key in enumerate(keys):
        known = {str(category): code for code, category in enumerate(mappings[key])}
        values = np.asarray(setup.column(data, "covariate_keys", key), dtype=object).ravel()
        values = values[controls]
        unseen = sorted(set(map(str, values)) - set(known))
        if unseen:
            raise ValueError(
                f"Category {unseen[0]!r} of obs[{key!r}] was not seen when the model was "
                f"trained (known: {list(known)[:10]}). Predict only for known categories."
            )
        codes[:, j] = [known[str(v)] for v in values]
    groups, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    members = [controls[inverse == g] for g in range(len(groups))]
    table = pd.DataFrame(
        {key: [str(mappings[key][c]) for c in groups[:, j]] for j, key in enumerate(keys)}
    )
    return keys, table, groups, members


def interaction_effects(
    model: FCRModel,
    adata: ad.AnnData | None = None,
    treatments: str | Sequence[str] | None = None,
    dose: float | str | None = None,
    n_top_genes: int = 10,
    max_cells_per_context: int | None = 500,
    mode: Literal["prior", "abduction"] = "abduction",
    batch_size: int | None = None,
    return_gene_effects: bool = False,
    seed: int = 0,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Strength of the interaction (z_tx) part of each treatment's response, per context.

    A context is a covariate group (e.g. a cell line) with control cells in ``adata``; its
    control cells represent it. For every context ``x`` and treatment ``t`` (at ``dose``),
    each control cell is decoded with its own z_x (posterior mean) and:

    (a) z_t and z_tx at the prior means of p(z_t | t) and p(z_tx | x, t) (plus, in the
        default ``"abduction"`` mode, the cell's own deviation from the prior means of its
        observed treatment): the counterfactual of
        :meth:`~fcr_tools.FCRModel.predict_counterfactual`;
    (b) the same with z_tx at the prior mean of p(z_tx | x, t=0), the interaction block of
        untreated cells (shared by all contexts): no interaction;
    (c) the same with z_tx at the mean over the scored contexts x' of the prior means of
        p(z_tx | x', t) (plus the cell's own deviation in ``"abduction"`` mode): the
        interaction every context shares;
    (d) z_t and z_tx at their t=0 prior means: the control.

    Per (context, treatment), averaged over the context's cells, with differences taken as
    the root mean square (RMS) over genes:

    - ``strength``: RMS of (a) - (b), how far the interaction block moves the predicted
      expression;
    - ``specificity``: RMS of (a) - (c), the part of that movement that differs between
      contexts (0 with one context). The FCR objective does not stop z_tx from also
      carrying a response shared by all contexts; ``specificity`` discounts it;
    - ``effect``: RMS of (a) - (d), the whole predicted response, and
      ``fraction = strength / effect``;
    - ``latent_strength``: ``||E[z_tx | x, t] - E[z_tx | x, 0]||`` in the latent space;
    - ``top_genes``: the genes with the largest mean ``|a - b|``.

    Expression is compared on the log-normalised scale: the model's output for
    ``likelihood="gaussian"``; ``log1p(1e4 * normalised expression)`` for ``"nb"``.

    Parameters
    ----------
    model
        A trained :class:`~fcr_tools.FCRModel`.
    adata
        Cells whose control cells represent the contexts (default: the training data).
    treatments
        Treatment label(s) to score (combinations ``"A+B"`` allowed); default: every
        non-control label registered with the model.
    dose
        Dose of every treatment (a number, or ``"d1+d2"`` for combinations); ``None``: 1.0.
    n_top_genes
        Genes listed in ``top_genes`` per row.
    max_cells_per_context
        Control cells used per context (a random subset when there are more; ``None``: all).
    mode
        ``"abduction"`` (default: each cell keeps its own deviation of z_t and z_tx) or
        ``"prior"`` (population response), as in
        :meth:`~fcr_tools.FCRModel.predict_counterfactual`.
    batch_size
        Cells per minibatch.
    return_gene_effects
        Also return the mean signed difference (a) - (b) of every gene.
    seed
        Seed of the subsampling of control cells.

    Returns
    -------
    A DataFrame with one row per (context, treatment): the covariate columns, ``context``
    (their values joined by ``"|"``), ``treatment``, ``dose``, ``n_cells``, ``strength``,
    ``specificity``, ``effect``, ``fraction``, ``latent_strength`` and ``top_genes`` (tuple
    of gene names, strongest first). With ``return_gene_effects=True``, also a DataFrame
    (index: context and treatment; one column per gene) of the mean of (a) - (b).

    Examples
    --------
    >>> import fcr_tools
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cell_lines=2, n_treatments=2, n_cells_per_condition=10)
    >>> FCRModel.setup_anndata(
    ...     adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    ... )
    >>> model = FCRModel(adata, n_latent_x=2, n_latent_t=2, n_latent_tx=2, n_hidden=16)
    >>> model.train(max_epochs=5, enable_progress_bar=False)
    >>> effects = fcr_tools.tl.interaction_effects(model, n_top_genes=3)
    >>> effects[["context", "treatment", "strength"]].shape
    (4, 3)
    >>> strongest = effects.sort_values("strength", ascending=False).iloc[0]
    >>> strongest["treatment"] in {"drug_0", "drug_1"}, len(strongest["top_genes"])
    (True, 3)
    """
    if n_top_genes < 0:
        raise ValueError(f"n_top_genes must be >= 0, got {n_top_genes}.")
    if max_cells_per_context is not None and max_cells_per_context < 1:
        raise ValueError(f"max_cells_per_context must be >= 1, got {max_cells_per_context}.")
    encoder = model.treatment_encoder
    if treatments is None:
        labels = model.get_state_registry(TREATMENT_KEY).categorical_mapping
        treatments = [str(t) for t in labels if str(t) != encoder.control]
    elif isinstance(treatments, str):
        treatments = [treatments]
    treatments = list(dict.fromkeys(str(t) for t in treatments))
    if not treatments:
        raise ValueError("No treatment to score.")
    if encoder.control in treatments:
        raise ValueError(f"The control {encoder.control!r} has no interaction; drop it.")
    if mode not in ("prior", "abduction"):
        raise ValueError(
            f"mode must be 'prior' or 'abduction', not {mode!r} (interaction effects compare "
            "deterministic responses)."
        )
    encoded = [encoder.encode_one(t, dose) for t in treatments]  # validates labels and doses

    keys, contexts, codes, members = _contexts(model, adata)
    genes = _gene_names(model)
    rng = np.random.default_rng(seed)
    module = model.module
    module.eval()
    device = module.device
    n_treat, n_genes, n_contexts = len(treatments), len(genes), len(members)

    with torch.inference_mode():
        vectors = [
            module.treatment_vector(
                torch.as_tensor(idx, device=device), torch.as_tensor(d, device=device).float()
            )
            for idx, d in encoded
        ]
        # the interaction every scored context shares: mean over contexts of E[z_tx | x', t]
        codes_t = torch.as_tensor(codes, device=device)
        e_all = module.covariate_embedding(codes_t)
        e_tx_all = module.interaction_context_embedding(codes_t, e_all)
        shared_tx = [
            module.prior(e_all, t.expand(len(codes), -1), e_tx_all)["tx"][0].mean(0)
            for t in vectors
        ]

    # each context's control cells (subsampled), encoded in one pass over all of them
    chosen = []
    for cells in members:
        if max_cells_per_context is not None and cells.size > max_cells_per_context:
            cells = np.sort(rng.choice(cells, max_cells_per_context, replace=False))
        chosen.append(cells)
    cells = np.concatenate(chosen)
    owner = np.concatenate([np.full(c.size, i) for i, c in enumerate(chosen)])
    order = np.argsort(cells, kind="stable")
    cells, owner = cells[order], owner[order]
    sums = {
        key: torch.zeros(n_contexts, n_treat, dtype=torch.float64, device=device)
        for key in ("strength", "specificity", "effect", "latent")
    }
    abs_diff = torch.zeros(n_contexts, n_treat, n_genes, dtype=torch.float64, device=device)
    signed_diff = torch.zeros_like(abs_diff)
    with torch.inference_mode():
        for out in model.inference_batches(adata, cells, batch_size):
            ctx = torch.as_tensor(owner[np.searchsorted(cells, out["indices"])], device=device)
            e_x, library = out["e_x"], out["library"]
            n = e_x.shape[0]
            zero = torch.zeros(n, module.n_treatment_components, device=device)
            ctrl = module.counterfactual_latents(out, zero, mode=mode)
            y_ctrl = _expression(module, [ctrl["x"], ctrl["t"], ctrl["tx"]], library)
            for i, t in enumerate(vectors):
                t = t.expand(n, -1)
                full = module.counterfactual_latents(out, t, mode=mode)
                y_a = _expression(module, [full["x"], full["t"], full["tx"]], library)
                y_b = _expression(module, [full["x"], full["t"], ctrl["tx"]], library)
                target_tx = module.prior(e_x, t, out["e_tx"])["tx"][0]
                # the shared interaction, with the cell's own deviation kept (abduction)
                shared = shared_tx[i].expand(n, -1) + full["tx"] - target_tx
                y_c = _expression(module, [full["x"], full["t"], shared], library)
                diff = y_a - y_b
                moved = target_tx - module.prior(e_x, zero, out["e_tx"])["tx"][0]
                per_cell = {
                    "strength": _rms(diff),
                    "specificity": _rms(y_a - y_c),
                    "effect": _rms(y_a - y_ctrl),
                    "latent": torch.linalg.vector_norm(moved, dim=-1),
                }
                for key, value in per_cell.items():
                    sums[key][:, i].index_add_(0, ctx, value.double())
                abs_diff[:, i].index_add_(0, ctx, diff.abs().double())
                signed_diff[:, i].index_add_(0, ctx, diff.double())
    sums = {key: value.cpu().numpy() for key, value in sums.items()}
    abs_diff, signed_diff = abs_diff.cpu().numpy(), signed_diff.cpu().numpy()

    rows, gene_rows = [], []
    for ctx_index, cells in enumerate(chosen):
        n_cells = cells.size
        values = contexts.iloc[ctx_index].to_dict() if keys else {}
        for i, treatment in enumerate(treatments):
            order = np.argsort(-abs_diff[ctx_index, i], kind="stable")[:n_top_genes]
            effect = sums["effect"][ctx_index, i] / n_cells
            strength = sums["strength"][ctx_index, i] / n_cells
            rows.append(
                {
                    **values,
                    "context": "|".join(values.values()) if keys else "all",
                    "treatment": treatment,
                    "dose": 1.0 if dose is None else dose,
                    "n_cells": int(n_cells),
                    "strength": strength,
                    "specificity": sums["specificity"][ctx_index, i] / n_cells,
                    "effect": effect,
                    "fraction": strength / effect if effect > 0 else np.nan,
                    "latent_strength": sums["latent"][ctx_index, i] / n_cells,
                    "top_genes": tuple(str(g) for g in genes[order]),
                }
            )
            gene_rows.append(signed_diff[ctx_index, i] / n_cells)
    table = pd.DataFrame(rows)
    if not return_gene_effects:
        return table
    gene_effects = pd.DataFrame(
        np.stack(gene_rows),
        index=pd.MultiIndex.from_frame(table[["context", "treatment"]]),
        columns=pd.Index(genes, name="gene"),
    )
    return table, gene_effects


def _rms(diff: torch.Tensor) -> torch.Tensor:
    """Root mean square over genes of each cell's difference."""
    return diff.square().mean(-1).sqrt()


def _gene_names(model: FCRModel) -> np.ndarray:
    # for a MuData, the genes of the expression modality
    names = RegisteredSetup.from_registry(model.registry_).genes(model.get_var_names())
    return np.asarray(names, dtype=object)
