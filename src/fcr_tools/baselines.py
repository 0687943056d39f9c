"""Baselines for response prediction, with the same interface as FCRModel's counterfactuals.

All are fitted on training cells and answer ``predict_counterfactual(adata, treatment=...,
dose=...)`` with an AnnData of predicted expression, so :mod:`fcr_tools.metrics` scores them
exactly like an :class:`~fcr_tools.FCRModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ._validation import as_key_list, require_column

__all__ = ["AdditiveBaseline", "ContextAdjustedBaseline", "ControlMeanBaseline"]


def _dose_label(dose) -> str:
    """Canonical dose label: numbers compare by value, strings ("d1+d2") as written."""
    if dose is None:
        return "1.0"
    try:
        return repr(float(dose))
    except (TypeError, ValueError):
        return str(dose)


class _GroupMeans:
    """Mean expression per (covariate group, treatment, dose) of a training AnnData."""

    def __init__(
        self,
        adata: ad.AnnData,
        treatment_key: str,
        covariate_keys: str | Sequence[str] | None,
        dose_key: str | None,
        control_treatment: str,
        layer: str | None,
    ):
        self._columns(treatment_key, covariate_keys, dose_key, control_treatment, layer)
        for key in [treatment_key, *self.covariate_keys] + ([dose_key] if dose_key else []):
            require_column(list(adata.obs.columns), key, "column")
        self.var_names = adata.var_names.copy()
        matrix = adata.layers[layer] if layer else adata.X
        context = self.context_labels(adata)
        treatment = adata.obs[treatment_key].astype(str).to_numpy()
        dose = self._doses(adata)
        keys = pd.MultiIndex.from_arrays([context, treatment, dose])
        codes, uniques = pd.factorize(keys)
        indicator = sparse.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))),
            shape=(len(uniques), len(codes)),
        )
        sums = indicator @ matrix
        counts = np.asarray(indicator.sum(1)).ravel()
        means = np.asarray(sums.toarray() if sparse.issparse(sums) else sums) / counts[:, None]
        self.means = {uniques[i]: means[i] for i in range(len(uniques))}
        if not any(t == self.control for _, t, _ in self.means):
            raise ValueError(f"No control cells ({control_treatment!r}) in the training data.")

    @classmethod
    def from_means(
        cls,
        means: dict,
        var_names,
        treatment_key: str,
        covariate_keys: str | Sequence[str] | None,
        dose_key: str | None,
        control_treatment: str,
        layer: str | None,
    ) -> _GroupMeans:
        """Group means computed before: ``{(context, treatment, dose label): mean}``."""
        self = cls.__new__(cls)
        self._columns(treatment_key, covariate_keys, dose_key, control_treatment, layer)
        self.var_names = pd.Index(var_names)
        self.means = dict(means)
        return self

    def _columns(self, treatment_key, covariate_keys, dose_key, control_treatment, layer):
        self.treatment_key = treatment_key
        self.covariate_keys = as_key_list(covariate_keys)
        self.dose_key = dose_key
        self.control = control_treatment
        self.layer = layer

    def context_labels(self, adata: ad.AnnData) -> np.ndarray:
        if not self.covariate_keys:
            return np.full(adata.n_obs, "all", dtype=object)
        cols = [adata.obs[c].astype(str).to_numpy() for c in self.covariate_keys]
        return np.array(["|".join(parts) for parts in zip(*cols, strict=True)], dtype=object)

    def _doses(self, adata: ad.AnnData) -> np.ndarray:
        treatment = adata.obs[self.treatment_key].astype(str).to_numpy()
        if self.dose_key is None:
            dose = np.full(adata.n_obs, _dose_label(None), dtype=object)
        else:
            dose = np.array([_dose_label(d) for d in adata.obs[self.dose_key]], dtype=object)
        dose[treatment == self.control] = "control"
        return dose

    def control_mean(self, context: str) -> np.ndarray:
        key = (context, self.control, "control")
        if key not in self.means:
            raise ValueError(f"No training control cells for covariate group {context!r}.")
        return self.means[key]

    def predict(self, adata: ad.AnnData, treatment: str, dose, shift_fn) -> ad.AnnData:
        genes = pd.Index(adata.var_names)
        if not genes.equals(self.var_names):
            raise ValueError("adata's genes differ from the training data's genes.")
        context = self.context_labels(adata)
        shift = shift_fn(str(treatment), _dose_label(dose), context)
        unique, inverse = np.unique(context, return_inverse=True)
        base = np.stack([self.control_mean(c) for c in unique])[inverse]
        obs = adata.obs.copy()
        obs[self.treatment_key] = str(treatment)
        if self.dose_key is not None:
            obs[self.dose_key] = 1.0 if dose is None else dose
        return ad.AnnData(
            X=(base + shift).astype(np.float32),
            obs=obs,
            var=pd.DataFrame(index=self.var_names.copy()),
        )


class ControlMeanBaseline:
    """Predicts every response as the mean of the training controls of the cell's context.

    Parameters
    ----------
    adata
        Training cells.
    treatment_key, covariate_keys, dose_key, control_treatment
        The obs columns and control label.
    layer
        Layer with the expression (``None``: ``X``); use the scale the predictions are
        scored on.

    Examples
    --------
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
    >>> base = ControlMeanBaseline(adata, "drug", "cell_line", dose_key="dose")
    >>> base.predict_counterfactual(adata[:3], treatment="drug_0", dose=1.0).shape
    (3, 20)
    """

    def __init__(
        self,
        adata: ad.AnnData,
        treatment_key: str,
        covariate_keys: str | Sequence[str] | None = None,
        dose_key: str | None = None,
        control_treatment: str = "control",
        layer: str | None = None,
    ):
        self._means = _GroupMeans(
            adata, treatment_key, covariate_keys, dose_key, control_treatment, layer
        )

    def predict_counterfactual(
        self, adata: ad.AnnData, treatment: str, dose=None, **kwargs
    ) -> ad.AnnData:
        """Each cell's context control mean (the treatment is ignored).

        Examples
        --------
        >>> from fcr_tools.data import simulate_screen
        >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
        >>> base = ControlMeanBaseline(adata, "drug", "cell_line", dose_key="dose")
        >>> controls = adata[adata.obs["drug"] == "control"]
        >>> base.predict_counterfactual(controls, treatment="drug_1", dose=0.3).n_vars
        20
        """
        return self._means.predict(adata, treatment, dose, lambda t, d, ctx: 0.0)


class AdditiveBaseline:
    """Context control mean plus the treatment's mean shift measured in other contexts.

    The shift of (treatment, dose) is the average over training contexts of (mean of the
    treated cells - mean of that context's controls). For a context where the pair was
    measured, that context is left out of the average, so the prediction never copies the
    answer; with no other context measured, the context's own shift is used. A combination
    ``"A+B"`` never measured gets the sum of the shifts of its parts (each at its own dose
    when the dose is written ``"d1+d2"``). :class:`ContextAdjustedBaseline` also adjusts the
    shift for where the context's controls start.

    Parameters
    ----------
    adata
        Training cells.
    treatment_key, covariate_keys, dose_key, control_treatment
        The obs columns and control label.
    layer
        Layer with the expression (``None``: ``X``).

    Examples
    --------
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
    >>> add = AdditiveBaseline(adata, "drug", "cell_line", dose_key="dose")
    >>> add.predict_counterfactual(adata[:3], treatment="drug_0", dose=1.0).shape
    (3, 20)
    """

    def __init__(
        self,
        adata: ad.AnnData,
        treatment_key: str,
        covariate_keys: str | Sequence[str] | None = None,
        dose_key: str | None = None,
        control_treatment: str = "control",
        layer: str | None = None,
    ):
        self._means = _GroupMeans(
            adata, treatment_key, covariate_keys, dose_key, control_treatment, layer
        )

    @classmethod
    def from_group_means(cls, means: _GroupMeans) -> AdditiveBaseline:
        """The baseline of group means computed before (e.g. saved with a model)."""
        self = cls.__new__(cls)
        self._means = means
        return self

    def _shifts(self, treatment: str, dose: str) -> dict[str, np.ndarray]:
        m = self._means
        return {
            context: mean - m.control_mean(context)
            for (context, t, d), mean in m.means.items()
            if t == treatment and d == dose and (context, m.control, "control") in m.means
        }

    def _measured_shift(
        self, treatment: str, dose: str, context: str, shifts: dict[str, np.ndarray]
    ) -> np.ndarray:
        """The shift of a measured (treatment, dose) for ``context``: the mean over the other
        contexts (the context's own when none other was measured)."""
        others = [v for c, v in shifts.items() if c != context] or [shifts[context]]
        return np.mean(others, axis=0)

    def _shift(self, treatment: str, dose: str, context: str) -> np.ndarray:
        """The shift of (treatment, dose) for one context: measured, or summed over parts."""
        shifts = self._shifts(treatment, dose)
        if shifts:
            return self._measured_shift(treatment, dose, context, shifts)
        parts = treatment.split("+")
        if len(parts) > 1:
            doses = dose.split("+") if "+" in dose else [dose] * len(parts)
            missing = [
                part
                for part, d in zip(parts, doses, strict=False)
                if not self._shifts(part, _dose_label(d))
            ]
            if missing:
                raise ValueError(
                    f"Combination {treatment!r}: part {missing[0]!r} was not measured in any "
                    "training context with controls; the additive baseline cannot predict it."
                )
            if len(doses) == len(parts):
                return sum(
                    self._shift(part, _dose_label(d), context)
                    for part, d in zip(parts, doses, strict=True)
                )
        raise ValueError(
            f"Treatment {treatment!r} at dose {dose} was not measured in any training "
            "context with controls (nor, for a combination, each of its parts); the additive "
            "baseline cannot predict it."
        )

    def predict_counterfactual(
        self, adata: ad.AnnData, treatment: str, dose=None, **kwargs
    ) -> ad.AnnData:
        """Context control mean + the treatment's average shift in the other contexts.

        A combination ``"A+B"`` that was never measured gets the sum of its parts' shifts.

        Examples
        --------
        >>> from fcr_tools.data import simulate_screen
        >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
        >>> add = AdditiveBaseline(adata, "drug", "cell_line", dose_key="dose")
        >>> controls = adata[adata.obs["drug"] == "control"]
        >>> add.predict_counterfactual(controls, treatment="drug_1", dose=0.3).n_vars
        20
        """

        def shift_fn(t, d, contexts):
            if t == self._means.control:
                return 0.0
            unique = np.unique(contexts)
            out = {context: self._shift(t, d, context) for context in unique}
            return np.stack([out[c] for c in contexts])

        return self._means.predict(adata, treatment, dose, shift_fn)


class ContextAdjustedBaseline(AdditiveBaseline):
    """The additive baseline, adjusted for where the context's controls start.

    A treatment often moves cells towards a common state, so a context whose controls express
    a gene above the other contexts' may see it fall further (or, the other way, rise less).
    For a context ``c`` the shift of a measured (treatment, dose) is the additive baseline's,
    the mean shift of the other contexts ``O`` where it was measured, plus ``b * (control_c -
    mean over O of control)``. One slope ``b`` serves every treatment, dose, gene and context;
    it is fitted on the training data alone, leaving one context out at a time: each measured
    pair's shift is predicted by the mean shift of the other contexts of its treatment and
    dose, and ``b`` is the least-squares slope of those misses on the same contexts' control
    differences, clipped to [-1, 1] (-1: the treatment erases the contexts' differences). With
    no treatment measured in two contexts, ``b`` is 0 and this is the additive baseline. A
    combination never measured gets the sum of its parts' adjusted shifts; a shift measured in
    the context alone is used as it is.

    Parameters
    ----------
    adata
        Training cells.
    treatment_key, covariate_keys, dose_key, control_treatment
        The obs columns and control label.
    layer
        Layer with the expression (``None``: ``X``).

    Examples
    --------
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cells_per_condition=5, n_genes=20)
    >>> adjusted = ContextAdjustedBaseline(adata, "drug", "cell_line", dose_key="dose")
    >>> -1.0 <= adjusted.slope <= 1.0
    True
    >>> adjusted.predict_counterfactual(adata[:3], treatment="drug_0", dose=1.0).shape
    (3, 20)
    """

    @property
    def slope(self) -> float:
        """The slope ``b`` of a context's shift on its controls' difference from the others'."""
        if getattr(self, "_slope", None) is None:
            self._slope = self._fit_slope()
        return self._slope

    def _fit_slope(self) -> float:
        m = self._means
        members: dict[tuple[str, str], list] = {}
        for (context, treatment, dose), mean in m.means.items():
            if treatment != m.control and (context, m.control, "control") in m.means:
                control = m.control_mean(context)
                members.setdefault((treatment, dose), []).append((mean - control, control))
        num = den = 0.0
        for group in members.values():
            if len(group) < 2:
                continue
            shifts = np.stack([shift for shift, _ in group])
            controls = np.stack([control for _, control in group])
            n = len(group)  # each context against the mean of the n - 1 others
            miss = shifts - (shifts.sum(0) - shifts) / (n - 1)
            gap = controls - (controls.sum(0) - controls) / (n - 1)
            num += float((miss * gap).sum())
            den += float((gap**2).sum())
        return float(np.clip(num / den, -1.0, 1.0)) if den > 0 else 0.0

    def _measured_shift(
        self, treatment: str, dose: str, context: str, shifts: dict[str, np.ndarray]
    ) -> np.ndarray:
        shift = super()._measured_shift(treatment, dose, context, shifts)
        others = [c for c in shifts if c != context]
        if not others or self.slope == 0.0:
            return shift
        m = self._means
        gap = m.control_mean(context) - np.mean([m.control_mean(c) for c in others], axis=0)
        return shift + self.slope * gap
