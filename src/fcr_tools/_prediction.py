"""Counterfactual expression of many (treatment, dose) targets from one pass over the cells.

The encoder runs once per minibatch; every target then only needs its priors and the decoder.
With ``groups``, the expected expression is averaged per group without keeping a row per
cell: for the Gaussian likelihood the decoder's output is linear in its last hidden features,
so those are averaged and read out once per group (exact, and the cells x genes output is
never formed); for the negative binomial the per-cell expectations are summed per group.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

from ._module import COUNTERFACTUAL_MODES as MODES
from ._module import _check_choice

Mode = Literal["prior", "sample", "abduction"]
NORMALIZED_SCALE = 1e4  # the NB's normalised expression is given in counts per 10,000


def check_mode(mode: str) -> None:
    """Fail with the allowed values unless ``mode`` is a counterfactual mode."""
    _check_choice("mode", mode, MODES)


def grid_targets(
    treatments: str | Sequence[str], doses, control: str
) -> list[tuple[str, float | str | None]]:
    """Every (treatment, dose) pair of ``treatments`` x ``doses``, in that order, once each.

    ``doses`` is one dose, a list of doses or ``None`` (each treatment's default dose). The
    control label is a single target without a dose, whatever ``doses`` holds.
    """
    if isinstance(treatments, str):
        treatments = [treatments]
    if treatments is None or len(treatments) == 0:
        raise ValueError("treatment is required: one target treatment label or a list of them.")
    if doses is None or isinstance(doses, str | numbers.Real):
        doses = [doses]
    elif len(doses) == 0:
        raise ValueError("dose is an empty list: give at least one dose, or None.")
    pairs = []
    for treatment in map(str, treatments):
        pairs += [(treatment, None)] if treatment == control else [(treatment, d) for d in doses]
    return list(dict.fromkeys(pairs))


def group_codes(frame) -> tuple[np.ndarray, list[tuple]]:
    """Integer group of each row of ``frame`` (by all its columns) and each group's values."""
    if frame.shape[1] == 0:
        return np.zeros(len(frame), dtype=np.int64), [()]
    keys = [tuple(map(str, row)) for row in frame.astype(str).itertuples(index=False)]
    values = list(dict.fromkeys(keys))
    lookup = {key: i for i, key in enumerate(values)}
    return np.fromiter((lookup[k] for k in keys), dtype=np.int64, count=len(keys)), values


@torch.inference_mode()
def counterfactual_expression(
    module,
    batches: Iterable[dict],
    vectors: Sequence[torch.Tensor],
    mode: Mode,
    n_cells: int,
    groups: np.ndarray | None = None,
    n_groups: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Expected expression of the cells of ``batches`` under each treatment vector.

    Parameters
    ----------
    module
        The trained :class:`~fcr_tools.FCRModule` (in eval mode).
    batches
        Inference outputs of consecutive minibatches of the ``n_cells`` cells, in order (as
        yielded by :meth:`fcr_tools.FCRModel.inference_batches`).
    vectors
        One ``(1, n_treatment_components)`` treatment vector per target.
    mode
        Counterfactual mode (see :meth:`fcr_tools.FCRModel.predict_counterfactual`).
    n_cells
        Number of cells the batches hold.
    groups, n_groups
        Group of each cell (``0 .. n_groups - 1``): return group means instead of cells.

    Returns
    -------
    ``mean`` of shape ``(n_targets, n_cells or n_groups, n_genes)`` (float32, the registered
    data's scale) and, for the negative binomial, the normalised expression (counts per
    10,000) of the same shape; ``None`` otherwise.
    """
    nb = module.likelihood == "nb"
    n_genes = module.n_input
    if groups is None:
        shape = (len(vectors), n_cells, n_genes)
        means = np.empty(shape, dtype=np.float32)
        scales = np.empty(shape, dtype=np.float32) if nb else None
    else:
        sums = means = scales = None
        counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    start = 0
    for out in batches:
        n = out["library"].shape[0]
        rows = slice(start, start + n)
        if groups is not None:
            group = torch.as_tensor(groups[rows], device=out["library"].device)
        for k, vector in enumerate(vectors):
            blocks = module.counterfactual_latents(out, vector.expand(n, -1), mode=mode)
            z = torch.cat([blocks["x"], blocks["t"], blocks["tx"]], -1)
            if groups is not None and not nb:  # the decoder is linear in its last features
                values = [module.decoder.features(z)]
            else:
                gen = module.expected_expression(z, out["library"])
                values = [gen["px_mean"]] + ([gen["px_scale"] * NORMALIZED_SCALE] if nb else [])
            if groups is None:
                means[k, rows] = values[0].cpu().numpy()
                if nb:
                    scales[k, rows] = values[1].cpu().numpy()
                continue
            if sums is None:  # float64 sums: groups can hold very many cells
                size = (len(vectors), n_groups)
                sums = [v.new_zeros(*size, v.shape[-1], dtype=torch.float64) for v in values]
            for total, value in zip(sums, values, strict=True):
                total[k].index_add_(0, group, value.double())
        start += n
    if groups is None:
        return means, scales
    if sums is None:  # no cells
        raise ValueError("No cells to predict.")
    weights = torch.as_tensor(counts, dtype=sums[0].dtype, device=sums[0].device)
    averages = [(total / weights.clamp(min=1)[None, :, None]).float() for total in sums]
    if not nb:
        averages = [module.decoder.readout(averages[0])]
    result = [a.cpu().numpy() for a in averages]
    return result[0], (result[1] if nb else None)
