"""One documented preprocessing recipe that turns a perturbation screen into FCR-ready data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

from .._validation import as_key_list, check_expression, layer_names, require_column

CONTROL_LABELS = ("control", "Vehicle", "vehicle", "DMSO", "dmso", "ctrl", "untreated")
"""Treatment labels that :func:`prepare_screen` treats as controls by default."""

CONTEXT_SEP = "|"


def _context_labels(obs: pd.DataFrame, covariate_keys: list[str]) -> np.ndarray:
    if not covariate_keys:
        return np.full(len(obs), "all", dtype=object)
    columns = [obs[key].astype(str).to_numpy() for key in covariate_keys]
    return np.array([CONTEXT_SEP.join(v) for v in zip(*columns, strict=True)], dtype=object)


def _scale_doses(raw: np.ndarray, is_control: np.ndarray, how: str) -> np.ndarray:
    treated = raw[~is_control]
    if treated.size == 0:
        return np.zeros_like(raw)
    top = treated.max()
    if how == "none":
        scaled = raw.copy()
    elif top <= 0:
        raise ValueError("Every treated cell has dose 0; give positive doses or dose_key=None.")
    elif how == "log":
        scaled = np.log10(1 + raw) / np.log10(1 + top)
    elif how == "max":
        scaled = raw / top
    else:
        raise ValueError(f"dose_scaling must be 'log', 'max' or 'none', not {how!r}.")
    scaled[is_control] = 0.0
    return scaled


def _holdout(
    contexts: np.ndarray,
    treatments: np.ndarray,
    is_control: np.ndarray,
    pairs: Sequence | None,
    n_pairs: int,
    seed: int,
) -> list[tuple[str, str]]:
    """The (context, treatment) pairs to hold out, checked or drawn at random."""
    measured = sorted(set(zip(contexts[~is_control], treatments[~is_control], strict=True)))
    if pairs is not None:
        chosen = []
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"Hold-out pair {pair!r} is not a (context, treatment) pair.")
            context, treatment = pair
            if not isinstance(context, str):
                context = CONTEXT_SEP.join(str(v) for v in context)
            if (context, str(treatment)) not in measured:
                raise ValueError(
                    f"Hold-out pair ({context!r}, {treatment!r}) has no treated cells "
                    f"(contexts are written {CONTEXT_SEP!r}-joined covariate values, e.g. "
                    f"{measured[0][0]!r})."
                )
            chosen.append((context, str(treatment)))
        return list(dict.fromkeys(chosen))
    if n_pairs < 0:
        raise ValueError(f"n_holdout_pairs must be >= 0, got {n_pairs}.")
    if n_pairs == 0:
        return []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(measured))
    per_context = pd.Series([c for c, _ in measured]).value_counts().to_dict()
    per_treatment = pd.Series([t for _, t in measured]).value_counts().to_dict()
    chosen = []
    for i in order:
        context, treatment = measured[i]
        # every context keeps a treated pair, every treatment a context, in training
        if per_context[context] > 1 and per_treatment[treatment] > 1:
            chosen.append((context, treatment))
            per_context[context] -= 1
            per_treatment[treatment] -= 1
            if len(chosen) == n_pairs:
                return sorted(chosen)
    raise ValueError(
        f"Cannot hold out {n_pairs} (context, treatment) pairs while every context and every "
        f"treatment keeps treated cells in training; at most {len(chosen)} can be held out."
    )


def prepare_screen(
    adata: ad.AnnData,
    treatment_key: str,
    covariate_keys: str | Sequence[str] | None,
    dose_key: str | None = None,
    control_labels: Sequence[str] = CONTROL_LABELS,
    control: str = "control",
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    n_top_genes: int | None = 2000,
    hvg_flavor: Literal["cell_ranger", "seurat", "seurat_v3"] = "cell_ranger",
    dose_scaling: Literal["log", "max", "none"] = "log",
    holdout_pairs: Sequence[tuple] | None = None,
    n_holdout_pairs: int = 0,
    split_key: str = "split",
    seed: int = 0,
    inplace: bool = False,
) -> ad.AnnData | None:
    r"""Prepare a perturbation screen for FCR: fcr_tools' one preprocessing recipe.

    Steps, in order:

    1. **Controls.** Treatment labels in ``control_labels`` (vehicle, DMSO, ...) become
       ``control`` in ``obs[treatment_key]`` (a categorical).
    2. **Doses** (with ``dose_key``). The raw doses move to ``obs[f"{dose_key}_raw"]``;
       ``obs[dose_key]`` holds the scaled dose: ``"log"``:
       :math:`\log_{10}(1 + d) / \log_{10}(1 + d_{max})`, ``"max"``: :math:`d / d_{max}`
       (:math:`d_{max}` the largest dose of a treated cell), ``"none"``: unchanged. Controls
       get dose 0 (a missing dose is allowed for controls only).
    3. **Counts.** The raw counts (``X`` or ``counts_layer``; non-negative integers) are kept
       in ``layers["counts"]``; ``X`` becomes ``log1p`` of counts normalised to
       ``target_sum`` per cell (``sc.pp.normalize_total`` + ``sc.pp.log1p``).
    4. **Genes.** Genes without counts are dropped; with ``n_top_genes``, the genes are
       subset to the highly variable ones (``sc.pp.highly_variable_genes`` with
       ``hvg_flavor``: ``"cell_ranger"`` or ``"seurat"`` on the log-normalised data,
       ``"seurat_v3"`` on the counts, which needs the ``scikit-misc`` package).
    5. **Split.** ``obs[split_key]`` is ``"holdout"`` for the cells of the held-out
       (context, treatment) pairs (all doses) and ``"train"`` otherwise; a context is the
       cell's covariate values joined by ``"|"``. Give the pairs, or a number of random
       pairs to draw such that every context and every treatment keeps treated cells in
       training.

    The recipe's arguments and the held-out pairs are recorded in ``uns["fcr_prepare"]``.
    Register the result with ``FCRModel.setup_anndata(train, treatment_key, control,
    covariate_keys, dose_key)`` for a Gaussian model on ``X``, or with ``layer="counts"``
    for ``likelihood="nb"``.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` or ``layers[counts_layer]``.
    treatment_key
        Obs column with the treatment of each cell.
    covariate_keys
        Obs column(s) describing the context (cell line, donor, ...); ``None`` for none.
    dose_key
        Numeric obs column of doses, or ``None``.
    control_labels
        Labels of control cells, mapped to ``control``.
    control
        The control label written to ``obs[treatment_key]``.
    counts_layer
        Layer with the raw counts; ``None``: ``X``.
    target_sum
        Counts per cell after normalisation.
    n_top_genes
        Number of highly variable genes to keep; ``None`` keeps every gene with counts.
    hvg_flavor
        Flavor of :func:`scanpy.pp.highly_variable_genes`.
    dose_scaling
        ``"log"``, ``"max"`` or ``"none"`` (see step 2).
    holdout_pairs
        (context, treatment) pairs to hold out, e.g. ``[("A549", "Dex")]``; with several
        covariates the context is a tuple of values or a ``"|"``-joined string.
    n_holdout_pairs
        Number of random pairs to hold out when ``holdout_pairs`` is ``None``.
    split_key
        Obs column of the split.
    seed
        Seed of the random hold-out pairs.
    inplace
        Modify ``adata`` in place and return ``None``. By default ``adata`` is left untouched
        and a new AnnData is returned.

    Returns
    -------
    The prepared AnnData, or ``None`` with ``inplace=True``.

    Examples
    --------
    >>> import numpy as np
    >>> import anndata as ad
    >>> import pandas as pd
    >>> from fcr_tools.pp import prepare_screen
    >>> rng = np.random.default_rng(0)
    >>> obs = pd.DataFrame(
    ...     {
    ...         "cell_line": np.repeat(["A549", "K562"], 60),
    ...         "drug": np.tile(np.repeat(["DMSO", "drugA", "drugB"], 20), 2),
    ...         "dose": np.tile(np.repeat([0.0, 100.0, 1000.0], 20), 2),
    ...     },
    ...     index=[f"c{i}" for i in range(120)],
    ... )
    >>> counts = rng.poisson(2.0, size=(120, 50)).astype(np.float32)
    >>> raw = ad.AnnData(counts, obs=obs)
    >>> prepared = prepare_screen(
    ...     raw, "drug", "cell_line", dose_key="dose", n_top_genes=20, n_holdout_pairs=1
    ... )
    >>> prepared.shape, sorted(prepared.obs["drug"].cat.categories)
    ((120, 20), ['control', 'drugA', 'drugB'])
    >>> float(prepared.obs["dose"].max()), "counts" in prepared.layers
    (1.0, True)
    >>> prepared.uns["fcr_prepare"]["holdout_pairs"]
    ['K562|drugA']
    """
    covariates = as_key_list(covariate_keys)
    columns = list(adata.obs.columns)
    require_column(columns, treatment_key, "treatment_key")
    for key in covariates:
        require_column(columns, key, "covariate_keys")
    if dose_key is not None:
        require_column(columns, dose_key, "dose_key")
    if counts_layer is not None and counts_layer not in adata.layers:
        raise KeyError(
            f"counts_layer={counts_layer!r} not found in adata.layers ({layer_names(adata)})."
        )
    if dose_scaling not in ("log", "max", "none"):
        raise ValueError(f"dose_scaling must be 'log', 'max' or 'none', not {dose_scaling!r}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata has shape {adata.shape}: no cells or no genes.")
    counts = adata.layers[counts_layer] if counts_layer else adata.X
    where = f"adata.layers[{counts_layer!r}]" if counts_layer else "adata.X"
    check_expression(counts, where, counts=True)

    # 1. controls (on the obs values, before anything is copied)
    treatments = adata.obs[treatment_key].astype(object)
    if treatments.isna().any():
        raise ValueError(
            f"obs[{treatment_key!r}] has {int(treatments.isna().sum())} missing values."
        )
    treatments = treatments.astype(str).to_numpy()
    is_control = np.isin(treatments, [*control_labels, control])
    if not is_control.any():
        shown = sorted(set(treatments))[:10]
        raise ValueError(
            f"No control cells: none of {[*control_labels, control]} is in "
            f"obs[{treatment_key!r}] (labels include {shown}); pass control_labels=[...]."
        )
    if is_control.all():
        raise ValueError(f"obs[{treatment_key!r}] holds only controls: no treated cells.")
    treatments = np.where(is_control, control, treatments)
    for key in covariates:
        if adata.obs[key].isna().any():
            raise ValueError(f"Covariate obs[{key!r}] has missing values.")

    # 2. doses
    if dose_key is not None:
        raw_dose = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=float)
        bad = ~is_control & ~np.isfinite(raw_dose)
        if bad.any():
            example = adata.obs[dose_key].iloc[np.flatnonzero(bad)[0]]
            raise ValueError(
                f"obs[{dose_key!r}] has {int(bad.sum())} treated cells without a numeric dose "
                f"(e.g. {example!r})."
            )
        if (raw_dose[~is_control] < 0).any():
            raise ValueError(f"obs[{dose_key!r}] has negative doses.")
        raw_dose = np.where(is_control, 0.0, raw_dose)
        scaled = _scale_doses(raw_dose, is_control, dose_scaling)

    # 5. split (before the copy, so that bad pairs fail fast)
    contexts = _context_labels(adata.obs, covariates)
    held = _holdout(contexts, treatments, is_control, holdout_pairs, n_holdout_pairs, seed)
    held_set = set(held)
    in_holdout = np.array(
        [(c, t) in held_set for c, t in zip(contexts, treatments, strict=True)], dtype=bool
    )

    out = adata if inplace else adata.copy()
    labels = list(dict.fromkeys([control, *sorted(set(treatments) - {control})]))
    out.obs[treatment_key] = pd.Categorical(treatments, categories=labels)
    if dose_key is not None:
        out.obs[f"{dose_key}_raw"] = raw_dose
        out.obs[dose_key] = scaled
    out.obs[split_key] = pd.Categorical(
        np.where(in_holdout, "holdout", "train"), categories=["train", "holdout"]
    )

    # 3. counts and normalisation
    counts = out.layers[counts_layer] if counts_layer else out.X
    counts = counts.copy() if counts_layer is None else counts
    out.layers["counts"] = counts
    out.X = counts.astype(np.float32, copy=True)
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)

    # 4. genes
    totals = np.asarray(out.layers["counts"].sum(0)).ravel()
    if (totals == 0).any():
        out._inplace_subset_var(totals > 0)
    if n_top_genes is not None and n_top_genes < out.n_vars:
        hvg_kwargs = {"layer": "counts"} if hvg_flavor == "seurat_v3" else {}
        sc.pp.highly_variable_genes(
            out, n_top_genes=n_top_genes, flavor=hvg_flavor, subset=True, **hvg_kwargs
        )
    if sparse.issparse(out.X) and not sparse.isspmatrix_csr(out.X):
        out.X = sparse.csr_matrix(out.X)

    out.uns["fcr_prepare"] = {
        "treatment_key": treatment_key,
        "covariate_keys": covariates,
        "dose_key": dose_key or "",
        "control": control,
        "control_labels": [str(c) for c in control_labels],
        "target_sum": float(target_sum),
        "n_top_genes": -1 if n_top_genes is None else int(n_top_genes),
        "hvg_flavor": hvg_flavor,
        "dose_scaling": dose_scaling,
        "split_key": split_key,
        "holdout_pairs": [f"{c}{CONTEXT_SEP}{t}" for c, t in held],
        "seed": int(seed),
    }
    return None if inplace else out
