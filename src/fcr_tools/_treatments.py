"""The one place where treatment labels and doses become treatment vectors.

A treatment label is a category of the registered treatment column. The control category
means "no treatment". Any other label is one treatment (``"drugA"``) or a combination of
treatments joined by ``"+"`` (``"drugA+drugB"``). The doses of a combination are either one
number shared by all parts or a string with one number per part (``"0.1+1.0"``).

FCR's treatment vector ``t`` is a dose-scaled multi-hot vector over the single treatments
(the *components*); controls are all zeros. Storing that dense vector for every cell would
cost ``n_cells x n_components`` floats, so cells carry a padded sparse form instead: the
component indices ``(n_cells, max_parts)`` and their doses ``(n_cells, max_parts)``, with
padding index ``n_components`` and dose 0. :func:`dense_treatment` turns it into ``t`` inside
the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

COMBINATION_SEP = "+"


def split_treatment(label: str) -> list[str]:
    """Split a treatment label into its parts (``"A+B"`` -> ``["A", "B"]``)."""
    return [part.strip() for part in str(label).split(COMBINATION_SEP)]


def _parse_dose(value, n_parts: int, label: str, column: str | None) -> list[float]:
    """Doses of the parts of one treatment label, validated."""
    where = f" in obs['{column}']" if column else ""
    if isinstance(value, str):
        pieces = [p.strip() for p in value.split(COMBINATION_SEP)]
        try:
            numbers = [float(p) for p in pieces]
        except ValueError:
            raise ValueError(
                f"Dose {value!r}{where} for treatment {label!r} is not a number "
                f"(or numbers joined by '{COMBINATION_SEP}')."
            ) from None
    else:
        try:
            numbers = [float(value)]
        except (TypeError, ValueError):
            raise ValueError(
                f"Dose {value!r}{where} for treatment {label!r} is not a number."
            ) from None
    if len(numbers) == 1:
        numbers = numbers * n_parts
    if len(numbers) != n_parts:
        raise ValueError(
            f"Dose {value!r}{where} gives {len(numbers)} doses, but treatment {label!r} has "
            f"{n_parts} parts; give one dose or one per part joined by '{COMBINATION_SEP}'."
        )
    for number in numbers:
        if not np.isfinite(number):
            raise ValueError(f"Dose {value!r}{where} for treatment {label!r} is NaN or infinite.")
        if number < 0:
            raise ValueError(f"Dose {value!r}{where} for treatment {label!r} is negative.")
    return numbers


@dataclass(frozen=True)
class TreatmentEncoder:
    """Maps treatment labels and doses to FCR's dose-scaled multi-hot treatment vectors.

    Parameters
    ----------
    control
        The control label.
    components
        The single treatments, in vector order.
    max_parts
        The width of the padded sparse form (the most parts in one combination).

    Examples
    --------
    >>> enc = TreatmentEncoder.from_labels(["control", "A", "B", "A+B"], control="control")
    >>> enc.components
    ('A', 'B')
    >>> idx, dose = enc.encode(["A+B", "control"], ["0.5+1", 0])
    >>> idx.tolist(), dose.tolist()
    ([[0, 1], [2, 2]], [[0.5, 1.0], [0.0, 0.0]])
    """

    control: str
    components: tuple[str, ...]
    max_parts: int

    @classmethod
    def from_labels(cls, labels: Sequence[str], control: str) -> TreatmentEncoder:
        """Build the encoder from the treatment categories seen at setup."""
        components: set[str] = set()
        max_parts = 1
        for label in labels:
            if label == control:
                continue
            parts = split_treatment(label)
            if any(part == "" for part in parts):
                raise ValueError(f"Treatment {label!r} has an empty part.")
            if control in parts:
                raise ValueError(
                    f"Treatment {label!r} combines the control {control!r} with other "
                    "treatments; write the combination without the control."
                )
            if len(set(parts)) != len(parts):
                raise ValueError(f"Treatment {label!r} names the same part twice.")
            components.update(parts)
            max_parts = max(max_parts, len(parts))
        return cls(control=control, components=tuple(sorted(components)), max_parts=max_parts)

    @property
    def n_components(self) -> int:
        """Length of the treatment vector."""
        return len(self.components)

    def encode(
        self,
        labels: Sequence[str],
        doses: Sequence | None = None,
        dose_column: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode labels and doses into the padded sparse form.

        Parameters
        ----------
        labels
            One treatment label per cell.
        doses
            One dose per cell (number, or ``"d1+d2"`` for combinations); ``None`` means dose 1
            for every treated cell. Doses of control cells are ignored.
        dose_column
            Column name used in error messages.

        Returns
        -------
        Component indices ``(n, max_parts)`` (int64, padding ``n_components``) and doses
        ``(n, max_parts)`` (float32, padding 0).
        """
        labels = pd.Series(np.asarray(labels, dtype=object).ravel())
        if doses is None:
            dose_values = pd.Series(np.ones(len(labels)))
        else:
            # numbers stay numbers (no Python object per cell); other values become objects
            dose_values = np.asarray(doses).ravel()
            if dose_values.dtype.kind not in "biuf":
                dose_values = dose_values.astype(object)
            dose_values = pd.Series(dose_values)
            if len(dose_values) != len(labels):
                raise ValueError("`doses` must have one entry per treatment label.")
        lookup = {name: i for i, name in enumerate(self.components)}
        # encode each distinct (label, dose) once, then broadcast to the cells; the pairs are
        # factorized as integer codes (a MultiIndex of tuples grows superlinearly with cells);
        # pandas >= 3 keeps NaN / None as NaN in astype(str): give them a code of their own so
        # that their doses are checked (and rejected) like any other
        label_codes, _ = pd.factorize(labels.astype(str).to_numpy(), use_na_sentinel=False)
        dose_codes = string_codes(dose_values)
        pair_codes = (
            label_codes.astype(np.int64) * (int(dose_codes.max(initial=0)) + 1) + dose_codes
        )
        codes, uniques = pd.factorize(pair_codes)
        first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
        u_idx = np.full((len(uniques), self.max_parts), self.n_components, dtype=np.int64)
        u_dose = np.zeros((len(uniques), self.max_parts), dtype=np.float32)
        for row, cell in enumerate(first):
            label = labels.iloc[cell]
            if label == self.control:
                continue
            parts = split_treatment(label)
            unknown = [p for p in parts if p not in lookup]
            if unknown:
                raise ValueError(
                    f"Treatment {unknown[0]!r} (in {label!r}) was not seen when the model was set "
                    f"up; known treatments: {list(self.components)}."
                )
            if len(parts) > self.max_parts:
                raise ValueError(
                    f"Treatment {label!r} combines {len(parts)} treatments; the model was set up "
                    f"with at most {self.max_parts}."
                )
            dose = dose_values.iloc[cell]
            dose = dose.item() if isinstance(dose, np.generic) else dose  # as given, in errors
            numbers = _parse_dose(dose, len(parts), label, dose_column)
            u_idx[row, : len(parts)] = [lookup[p] for p in parts]
            u_dose[row, : len(parts)] = numbers
        return u_idx[codes], u_dose[codes]

    def encode_one(self, label: str, dose=None, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Encode one target treatment, repeated ``n`` times (for counterfactuals)."""
        doses = None if dose is None else [dose]
        idx, values = self.encode([label], doses)
        return np.repeat(idx, n, axis=0), np.repeat(values, n, axis=0)


def string_codes(values: pd.Series) -> np.ndarray:
    """Codes of ``values`` as ``values.astype(str)`` would group them, without a string per cell.

    The distinct values are factorized first and only they are turned into strings (two values
    with the same string, e.g. 1 and "1", share a code), so that a dose column of millions of
    cells is not copied into millions of Python strings.
    """
    try:
        codes, uniques = pd.factorize(values.to_numpy(), use_na_sentinel=False)
    except TypeError:  # unhashable values (e.g. lists): their strings, per cell
        return pd.factorize(values.astype(str).to_numpy(), use_na_sentinel=False)[0]
    as_str = pd.Series(np.asarray(uniques, dtype=object)).astype(str).to_numpy()
    remap, _ = pd.factorize(as_str, use_na_sentinel=False)
    return remap[codes]


def dense_treatment(idx: torch.Tensor, dose: torch.Tensor, n_components: int) -> torch.Tensor:
    """Dense dose-scaled multi-hot vectors ``(n, n_components)`` from the padded form."""
    out = torch.zeros(idx.shape[0], n_components + 1, device=dose.device, dtype=dose.dtype)
    out.scatter_add_(1, idx, dose)
    return out[:, :n_components]
