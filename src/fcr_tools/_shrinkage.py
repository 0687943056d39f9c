"""Predictions of unmeasured (context, treatment) pairs shrunk towards a baseline.

FCR predicts a pair never measured from its latent interaction; the baseline, the
context-adjusted additive one (:class:`~fcr_tools.baselines.ContextAdjustedBaseline`),
composes the context's control mean with the treatment's mean shift in other contexts,
adjusted for where the context's controls start. Which transfers better differs between
screens, so the model chooses, from its training data alone, the weight ``w`` of ``w * FCR +
(1 - w) * baseline``: some measured pairs are held out again, a second FCR with the same
settings is trained without them, and ``w`` is the least-squares weight of its and the
baseline's predicted means of those pairs. The record (``FCRModel.shrinkage_``) is a plain
dict, saved with the model: the weight, the pairs it was chosen on, the baseline's kind and
the training data's group means that the baseline needs. Records saved before the context
adjustment (model format 1.3) chose the weight against the plain additive baseline
(:class:`~fcr_tools.baselines.AdditiveBaseline`) and keep it.
"""

from __future__ import annotations

from typing import NamedTuple

import anndata as ad
import numpy as np
import scvi
from scvi import settings

from ._backed import is_store
from ._registration import RegisteredSetup
from .baselines import AdditiveBaseline, ContextAdjustedBaseline, _dose_label, _GroupMeans
from .metrics._response import _dense, top_degs

MIN_CELLS = 10  # smallest held-out group the weight is chosen on
N_RANKED_DEGS = 50  # genes ranked per held-out group (criteria on its top DEGs)
TOP_DEG_CRITERIA = (20, 50)  # the top-DEG weights recorded next to the default's
TARGETS = {"additive": AdditiveBaseline, "context_adjusted": ContextAdjustedBaseline}
TARGET = "context_adjusted"  # the baseline new records shrink towards
TARGET_NAMES = {"additive": "additive baseline", "context_adjusted": "context-adjusted baseline"}


def target_name(record: dict) -> str:
    """Words for the baseline a ``shrinkage_`` record shrinks towards."""
    return TARGET_NAMES[record.get("target", "additive")]


class HeldOutGroup(NamedTuple):
    """One held-out (context, treatment, dose) group: true and predicted mean expression
    (FCR's and the baseline's it shrinks towards)."""

    truth: np.ndarray
    fcr: np.ndarray
    baseline: np.ndarray
    degs: np.ndarray | None = None  # its genes ranked by |Welch t| against the controls


class ShrinkageUnavailable(ValueError):
    """The weight cannot be chosen on this model or data (the message says why)."""


def internal_pairs(contexts, treatments, control: str, rng, exclude=()) -> list[tuple[str, str]]:
    """Measured treated pairs whose treatment (each part of an ``"A+B"``) is measured
    elsewhere: ``max(1, n // 5)`` of the ``n`` such pairs, at most one per treatment (none of
    ``exclude``, e.g. pairs another fold held out)."""
    treated = treatments != control
    candidates = []
    pairs = set(zip(contexts[treated], treatments[treated], strict=True))
    pairs -= {tuple(p) for p in exclude}
    for context, treatment in sorted(pairs):
        elsewhere = set(treatments[~((contexts == context) & (treatments == treatment))])
        if all(part in elsewhere for part in treatment.split("+")):
            candidates.append((context, treatment))
    chosen, used = [], set()
    for i in rng.permutation(len(candidates)):
        context, treatment = candidates[i]
        if treatment not in used:
            chosen.append((context, treatment))
            used.add(treatment)
        if len(chosen) == max(1, len(candidates) // 5):
            break
    return chosen


def _group_keys(adata, baseline: AdditiveBaseline, setup: RegisteredSetup):
    """Each cell's ``"context\\ttreatment\\tdose"`` key, context and dose."""
    obs = adata.obs
    contexts = baseline._means.context_labels(adata)
    doses = obs[setup.dose_key].to_numpy() if setup.dose_key else np.full(adata.n_obs, None)
    labels = np.array([_dose_label(d) for d in doses], dtype=object)
    treatments = obs[setup.treatment_key].astype(str)
    keys = np.array(
        [f"{c}\t{t}\t{d}" for c, t, d in zip(contexts, treatments, labels, strict=True)]
    )
    return keys, contexts, doses


def group_means(model, baseline, adata, held, setup: RegisteredSetup, min_cells: int):
    """True and predicted (FCR, ``baseline``) mean of each held-out treated group of at least
    ``min_cells`` cells."""
    keys, contexts, doses = _group_keys(adata, baseline, setup)
    is_control = (adata.obs[setup.treatment_key].astype(str) == setup.control_treatment).to_numpy()
    groups = []
    for key in np.unique(keys[held]):
        rows = np.flatnonzero(keys == key)
        context, treatment, _ = key.split("\t")
        if len(rows) < min_cells:
            continue
        controls = adata[(contexts == context) & is_control & ~held]
        dose = doses[rows[0]]
        truth = _expression(adata[rows], setup)
        degs = top_degs(truth, _expression(controls, setup), N_RANKED_DEGS)
        fcr, base = (
            _dense(p.predict_counterfactual(controls, treatment=treatment, dose=dose).X).mean(0)
            for p in (model, baseline)
        )
        groups.append(HeldOutGroup(truth.mean(0), fcr, base, degs))
    return groups


def _expression(adata, setup: RegisteredSetup) -> np.ndarray:
    return _dense(adata.X if setup.layer is None else adata.layers[setup.layer])


def least_squares_sums(groups, n_degs: int | None = None) -> tuple[float, float]:
    """Numerator and denominator of the least-squares weight of ``groups`` (all genes, or
    each group's top ``n_degs`` DEGs)."""
    num = den = 0.0
    for group in groups:
        genes = slice(None) if n_degs is None else group.degs[:n_degs]
        y, a, b = group.truth[genes], group.fcr[genes], group.baseline[genes]
        num += float(((y - b) * (a - b)).sum())
        den += float(((a - b) ** 2).sum())
    return num, den


def least_squares_weight(groups=None, sums=None, n_degs: int | None = None) -> float:
    """The ``w`` in [0, 1] minimising the squared error of ``w * FCR + (1 - w) * baseline``
    over ``groups`` (or from their :func:`least_squares_sums`, e.g. pooled over folds)."""
    num, den = least_squares_sums(groups, n_degs) if sums is None else sums
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 1.0


def shrinkage_target(
    adata: ad.AnnData, setup: RegisteredSetup, cls: type[AdditiveBaseline] = TARGETS[TARGET]
) -> AdditiveBaseline:
    """The baseline (of class ``cls``) of ``adata`` that predictions shrink towards, with the
    model's registered columns."""
    return cls(
        adata,
        setup.treatment_key,
        setup.covariate_keys or None,
        dose_key=setup.dose_key,
        control_treatment=setup.control_treatment,
        layer=setup.layer,
    )


def plain_copy(adata: ad.AnnData) -> ad.AnnData:
    """A copy without scvi-tools' registration (obs columns and uns entries)."""
    copy = adata.copy()
    copy.obs = copy.obs.loc[:, [c for c in copy.obs.columns if not str(c).startswith("_scvi")]]
    for key in [k for k in copy.uns if str(k).startswith("_scvi")]:
        del copy.uns[key]
    return copy


def check_available(model) -> None:
    """Fail with the reason when the weight cannot be chosen for ``model``."""
    adata = model.adata
    if adata is None or hasattr(adata, "mod") or is_store(adata):
        raise ShrinkageUnavailable(
            "choosing the shrinkage weight needs the model's training AnnData in memory (not a "
            "MuData, an on-disk store, or a model loaded without data)."
        )
    if model.module.likelihood != "gaussian":
        raise ShrinkageUnavailable(
            "shrinkage towards the baseline is implemented for the Gaussian "
            f"likelihood only, not {model.module.likelihood!r}."
        )


def fit_shrinkage(
    model,
    max_epochs: int,
    seed: int | None = None,
    min_cells: int = MIN_CELLS,
    plan_kwargs: dict | None = None,
    **train_kwargs,
) -> dict:
    """Choose the weight for trained ``model``; returns the record kept as ``shrinkage_``.

    Raises :class:`ShrinkageUnavailable` (before any training) when no measured pair can be
    held out, none has ``min_cells`` cells, or the model / data cannot be used.
    """
    check_available(model)
    adata = model.adata
    setup = RegisteredSetup.from_registry(model.registry_)
    seed = settings.seed if seed is None else seed
    rng = np.random.default_rng(0 if seed is None else seed)
    baseline = shrinkage_target(adata, setup)
    contexts = baseline._means.context_labels(adata)
    treatments = adata.obs[setup.treatment_key].astype(str).to_numpy()
    pairs = internal_pairs(contexts, treatments, setup.control_treatment, rng)
    if not pairs:
        raise ShrinkageUnavailable(
            "no measured (context, treatment) pair can be held out: every treatment is "
            "measured in one context only, so there is nothing to choose the weight on."
        )
    groups = held_out_groups(
        model, pairs, max_epochs, seed, min_cells, plan_kwargs, baseline=baseline, **train_kwargs
    )
    means = baseline._means
    # the weight's least-squares sums (numerator, denominator): pooling other folds
    sums = least_squares_sums(groups)
    return {
        "weight": least_squares_weight(sums=sums),
        "pairs": [list(p) for p in sorted(pairs)],
        "n_groups": len(groups),
        "sums": list(sums),
        # experiment: the sums on each held-out group's top DEGs only
        "sums_top_degs": {k: list(least_squares_sums(groups, k)) for k in TOP_DEG_CRITERIA},
        "epochs": int(max_epochs),
        "target": TARGET,
        "slope": float(baseline.slope),  # the context adjustment's (for the record)
        "means_keys": [list(k) for k in means.means],
        "means": np.stack(list(means.means.values())).astype(np.float32),
    }


def held_out_groups(
    model,
    pairs,
    max_epochs: int,
    seed: int | None,
    min_cells: int = MIN_CELLS,
    plan_kwargs: dict | None = None,
    *,
    baseline: AdditiveBaseline | None = None,
    **train_kwargs,
) -> list:
    """Train a second FCR without ``pairs`` and return :func:`group_means` of their groups.

    ``baseline``: the :func:`shrinkage_target` of the model's training data, when already
    built (the second model's is of its class).
    Raises :class:`ShrinkageUnavailable` (before training) when no group of ``pairs`` has
    ``min_cells`` cells.
    """
    adata = model.adata
    setup = RegisteredSetup.from_registry(model.registry_)
    if baseline is None:
        baseline = shrinkage_target(adata, setup)
    keys, contexts, _ = _group_keys(adata, baseline, setup)
    treatments = adata.obs[setup.treatment_key].astype(str).to_numpy()
    held = np.zeros(adata.n_obs, dtype=bool)
    for context, treatment in pairs:
        held |= (contexts == context) & (treatments == treatment)
    sizes = np.unique(keys[held], return_counts=True)[1]
    if not len(sizes) or sizes.max() < min_cells:
        raise ShrinkageUnavailable(
            f"the measured pairs that can be held out ({pairs}) have fewer than "
            f"min_cells={min_cells} cells per (context, treatment, dose) group."
        )
    inner = plain_copy(adata[~held])
    cls = type(model)
    cls.setup_anndata(inner, **{k: v for k, v in setup.args.items() if k != "modalities"})
    if seed is not None:
        scvi.settings.seed = seed  # before the second model's weights are drawn
    params = model.init_params_
    second = cls(inner, **params["non_kwargs"], **params["kwargs"])
    second.train(
        max_epochs=max_epochs,
        plan_kwargs=plan_kwargs,
        shrinkage=False,
        **{"enable_progress_bar": False, **train_kwargs},
    )
    # the held-out cells and the controls of their contexts are all the scoring needs
    is_control = treatments == setup.control_treatment
    keep = held | (is_control & np.isin(contexts, [context for context, _ in pairs]))
    scored = plain_copy(adata[keep])
    inner_baseline = shrinkage_target(inner, setup, type(baseline))
    return group_means(second, inner_baseline, scored, held[keep], setup, min_cells)


def saved_target(record: dict, setup: RegisteredSetup, var_names) -> AdditiveBaseline:
    """The baseline of the training data that a ``shrinkage_`` record shrinks towards,
    rebuilt from its group means (the plain additive baseline for records without
    ``"target"``, saved before the context-adjusted one)."""
    means = dict(zip(map(tuple, record["means_keys"]), record["means"], strict=True))
    return TARGETS[record.get("target", "additive")].from_group_means(
        _GroupMeans.from_means(
            means,
            setup.genes(var_names),
            setup.treatment_key,
            setup.covariate_keys or None,
            setup.dose_key,
            setup.control_treatment,
            setup.layer,
        )
    )


def shrink(baseline: AdditiveBaseline, weight: float, values, contexts, targets) -> np.ndarray:
    """Blend ``values`` (targets x rows x genes, FCR's) in place towards ``baseline``.

    Rows whose (context, target treatment, dose) was measured in training, targets at the
    control label, and targets the baseline cannot predict (a treatment or dose never
    measured with controls) keep FCR's prediction. Returns the weight of FCR per target and
    row (1.0 where unchanged).
    """
    means = baseline._means
    unique, inverse = np.unique(np.asarray(contexts, dtype=object), return_inverse=True)
    weights = np.ones((len(targets), len(inverse)), dtype=np.float32)
    for k, (treatment, dose) in enumerate(targets):
        if treatment == means.control:
            continue
        label = _dose_label(dose)
        for i, context in enumerate(unique):
            if (context, treatment, label) in means.means:
                continue
            try:
                target = means.control_mean(context) + baseline._shift(treatment, label, context)
            except ValueError:  # no controls in this context, or nothing to compose
                continue
            rows = np.flatnonzero(inverse == i)
            shift = ((1 - weight) * target).astype(values.dtype)
            if rows[-1] - rows[0] == len(rows) - 1:  # consecutive rows: blend in place
                block = values[k, rows[0] : rows[-1] + 1]
                block *= weight
                block += shift
            else:
                values[k, rows] = values[k, rows] * weight + shift
            weights[k, rows] = weight
    return weights
