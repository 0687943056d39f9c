"""FCR's predictions of unmeasured pairs shrunk towards the additive baseline, by a weight
validated on measured pairs held out inside the training data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scvi

from .._backed import is_store
from .._registration import RegisteredSetup
from ..baselines import AdditiveBaseline, _dose_label
from ..metrics._response import _dense

__all__ = ["AdditiveShrinkage", "fit_additive_shrinkage"]


class AdditiveShrinkage:
    """Counterfactuals ``w * FCR + (1 - w) * additive`` for pairs never measured.

    For a (context, treatment, dose) that was measured in the training data the prediction is
    FCR's own. For one that was not, it is FCR's counterfactual shrunk towards the additive
    baseline (the context's control mean plus the treatment's mean shift in other contexts,
    :class:`~fcr_tools.baselines.AdditiveBaseline`): with ``w = 1`` FCR's, with ``w = 0`` the
    additive composition of the main effects. Build it with :func:`fit_additive_shrinkage`,
    which chooses ``w`` on pairs held out inside the training data.

    Parameters
    ----------
    model
        A trained :class:`~fcr_tools.FCRModel`.
    additive
        The additive baseline fitted on the model's training cells.
    weight
        ``w`` in [0, 1].
    internal_pairs
        The (context, treatment) pairs the weight was chosen on (for the record).
    """

    def __init__(self, model, additive: AdditiveBaseline, weight: float, internal_pairs=()):
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"weight must lie in [0, 1], got {weight!r}.")
        self.model = model
        self.additive = additive
        self.weight_ = float(weight)
        self.internal_pairs_ = sorted(internal_pairs)

    def __repr__(self) -> str:
        return (
            f"AdditiveShrinkage(weight={self.weight_:.3f}, chosen on "
            f"{len(self.internal_pairs_)} held-out measured pairs)"
        )

    def is_measured(self, adata: ad.AnnData, treatment: str, dose=None) -> np.ndarray:
        """Whether each cell's (context, ``treatment``, ``dose``) was measured in training."""
        means = self.additive._means
        context = means.context_labels(adata)
        label = "control" if treatment == means.control else _dose_label(dose)
        return np.array([(c, str(treatment), label) in means.means for c in context])

    def predict_counterfactual(self, adata: ad.AnnData, treatment: str, dose=None, **kwargs):
        """FCR's counterfactuals, shrunk towards the additive baseline where unmeasured.

        Parameters
        ----------
        adata
            Source cells (e.g. controls), with the model's genes and obs columns.
        treatment, dose
            The target, as for :meth:`fcr_tools.FCRModel.predict_counterfactual`.
        **kwargs
            Passed to :meth:`fcr_tools.FCRModel.predict_counterfactual` (e.g. ``mode``).

        Returns
        -------
        FCR's result, with ``X`` replaced by the shrunk prediction where the target was not
        measured for a cell's context, and the weight used per cell in
        ``obs["shrinkage_weight"]``.
        """
        pred = self.model.predict_counterfactual(adata, treatment=treatment, dose=dose, **kwargs)
        weight = np.where(self.is_measured(adata, treatment, dose), 1.0, self.weight_)
        if (weight < 1.0).any():
            other = self.additive.predict_counterfactual(adata, treatment=treatment, dose=dose)
            x = _dense(pred.X)
            pred.X = (weight[:, None] * x + (1 - weight[:, None]) * _dense(other.X)).astype(
                np.float32
            )
        pred.obs["shrinkage_weight"] = weight
        return pred


def _internal_pairs(contexts, treatments, control: str, rng) -> list[tuple[str, str]]:
    """Measured treated pairs whose treatment (each part of an ``"A+B"``) is measured
    elsewhere: ``max(1, n // 5)`` of the ``n`` such pairs, at most one per treatment."""
    treated = treatments != control
    candidates = []
    pairs = set(zip(contexts[treated], treatments[treated], strict=True))
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


def _group_means(model, additive, adata, held, setup, min_cells):
    """True and predicted (FCR, additive) mean of each held-out treated group."""
    tk, dk, control = setup.treatment_key, setup.dose_key, setup.control_treatment
    obs = adata.obs
    contexts = additive._means.context_labels(adata)
    is_control = (obs[tk].astype(str) == control).to_numpy()
    doses = obs[dk].to_numpy() if dk else np.full(adata.n_obs, None)
    labels = np.array([_dose_label(d) for d in doses], dtype=object)
    groups = []
    treatments = obs[tk].astype(str)
    keys = np.array(
        [f"{c}\t{t}\t{d}" for c, t, d in zip(contexts, treatments, labels, strict=True)]
    )
    for key in np.unique(keys[held]):
        rows = np.flatnonzero(keys == key)
        context, treatment, _ = key.split("\t")
        if len(rows) < min_cells:
            continue
        controls = adata[(contexts == context) & is_control & ~held]
        dose = doses[rows[0]]
        truth = _dense(adata[rows].X if setup.layer is None else adata[rows].layers[setup.layer])
        preds = [
            _dense(p.predict_counterfactual(controls, treatment=treatment, dose=dose).X).mean(0)
            for p in (model, additive)
        ]
        groups.append((truth.mean(0), preds))
    return groups


def _least_squares_weight(groups) -> float:
    num = sum(float(((y - b) * (a - b)).sum()) for y, (a, b) in groups)
    den = sum(float(((a - b) ** 2).sum()) for _, (a, b) in groups)
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 1.0


def fit_additive_shrinkage(
    model,
    max_epochs: int | None = None,
    seed: int | None = None,
    min_cells: int = 10,
    plan_kwargs: dict | None = None,
    **train_kwargs,
) -> AdditiveShrinkage:
    """Choose how far FCR's predictions of unmeasured pairs shrink towards the additive baseline.

    Some measured (context, treatment) pairs of the model's training data are held out again,
    a second FCR with the model's settings is trained without them, and the weight ``w`` is
    the least-squares weight of its and the additive baseline's predicted means of those
    pairs (all genes, clipped to [0, 1]). ``w`` near 1 says FCR's interactions transfer to
    unmeasured pairs; near 0, that the additive composition of the main effects predicts them
    better. The held-out pairs are ``max(1, n // 5)`` of the ``n`` treated pairs whose
    treatment (or each part of a combination ``"A+B"``) is measured in another pair, at most
    one per treatment, drawn with ``seed``. This costs one more training.

    Parameters
    ----------
    model
        A trained :class:`~fcr_tools.FCRModel`, with its training AnnData in memory.
    max_epochs
        Epochs of the second training (``None``: as many as ``model`` was trained for).
    seed
        Seed of the pair draw and the second training (``None``: ``scvi.settings.seed``).
    min_cells
        Smallest held-out group used to choose the weight.
    plan_kwargs, **train_kwargs
        Passed to :meth:`fcr_tools.FCRModel.train` of the second model; give what ``model``
        was trained with.

    Returns
    -------
    An :class:`AdditiveShrinkage`, with ``predict_counterfactual`` and the weight in
    ``weight_``.

    Examples
    --------
    >>> from fcr_tools.tl import fit_additive_shrinkage
    >>> shrunk = fit_additive_shrinkage(model, max_epochs=2)
    >>> 0.0 <= shrunk.weight_ <= 1.0
    True
    >>> controls = adata[adata.obs["drug"] == "control"]
    >>> pred = shrunk.predict_counterfactual(controls, treatment="drug_0", dose=1.0)
    >>> pred.obs["shrinkage_weight"].unique().tolist()  # every pair here was measured
    [1.0]
    """
    if not model.is_trained_:
        raise ValueError("Train the model first: model.train().")
    adata = model.adata
    if adata is None or hasattr(adata, "mod") or is_store(adata):
        raise ValueError(
            "fit_additive_shrinkage needs the model's training AnnData in memory (not a "
            "MuData, an on-disk store, or a model loaded without data)."
        )
    setup = RegisteredSetup.from_registry(model.registry_)
    args = {k: v for k, v in setup.args.items() if k != "modalities"}
    seed = scvi.settings.seed if seed is None else seed
    rng = np.random.default_rng(0 if seed is None else seed)
    additive = _additive(adata, setup)
    contexts = additive._means.context_labels(adata)
    treatments = adata.obs[setup.treatment_key].astype(str).to_numpy()
    pairs = _internal_pairs(contexts, treatments, setup.control_treatment, rng)
    if not pairs:
        raise ValueError(
            "No measured (context, treatment) pair can be held out: every treatment is "
            "measured in one context only, so there is nothing to choose the weight on."
        )
    held = np.zeros(adata.n_obs, dtype=bool)
    for context, treatment in pairs:
        held |= (contexts == context) & (treatments == treatment)
    inner = _plain_copy(adata[~held])
    cls = type(model)
    cls.setup_anndata(inner, **args)
    if seed is not None:
        scvi.settings.seed = seed  # before the second model's weights are drawn
    params = model.init_params_
    second = cls(inner, **params["non_kwargs"], **params["kwargs"])
    if max_epochs is None:
        max_epochs = len(model.history["train_loss"])
    second.train(
        max_epochs=max_epochs,
        plan_kwargs=plan_kwargs,
        **{"enable_progress_bar": False, **train_kwargs},
    )
    whole = _plain_copy(adata)
    second_additive = _additive(inner, setup)
    groups = _group_means(second, second_additive, whole, held, setup, min_cells)
    if not groups:
        raise ValueError(
            f"The held-out pairs {pairs} have fewer than min_cells={min_cells} cells each."
        )
    return AdditiveShrinkage(model, additive, _least_squares_weight(groups), pairs)


def _additive(adata: ad.AnnData, setup: RegisteredSetup) -> AdditiveBaseline:
    """The additive baseline of ``adata`` with the model's registered columns."""
    return AdditiveBaseline(
        adata,
        setup.treatment_key,
        setup.covariate_keys or None,
        dose_key=setup.dose_key,
        control_treatment=setup.control_treatment,
        layer=setup.layer,
    )


def _plain_copy(adata: ad.AnnData) -> ad.AnnData:
    """A copy without scvi-tools' registration (obs columns and uns entries)."""
    copy = adata.copy()
    copy.obs = copy.obs.loc[:, [c for c in copy.obs.columns if not str(c).startswith("_scvi")]]
    for key in [k for k in copy.uns if str(k).startswith("_scvi")]:
        del copy.uns[key]
    return copy
