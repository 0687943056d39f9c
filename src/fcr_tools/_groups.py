"""Vectorised operations on the (covariate, treatment) groups of a minibatch."""

from __future__ import annotations

import torch


def group_index(*columns: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group id of each row from the unique rows of the given columns.

    Each column is ``(n,)`` or ``(n, k)``; they are compared exactly.

    Returns
    -------
    ``(n,)`` int64 ids in ``[0, n_groups)`` and ``n_groups``.
    """
    n = columns[0].shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=columns[0].device), 0
    # one 1-D unique per column, combined in mixed radix and renumbered after each column:
    # the ids are those of the unique rows in lexicographic order (as torch.unique(dim=0)
    # gives them), without its slow row-wise sort
    inverse = torch.zeros(n, dtype=torch.long, device=columns[0].device)
    for column in columns:
        for values in column.reshape(n, -1).to(torch.float64).unbind(1):
            levels, codes = torch.unique(values, return_inverse=True)
            _, inverse = torch.unique(inverse * len(levels) + codes, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1


def group_mean(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` ``(n, d)`` within each group -> ``(n_groups, d)``."""
    sums = values.new_zeros(n_groups, values.shape[1]).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]


def between_group_share(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Share of the sum of squares of ``values`` ``(n, d)`` that their group means explain.

    ``sum_g n_g |mean_g|^2 / sum_i |v_i|^2``, in ``[0, 1]``: 1 when the rows of each group are
    equal, about ``n_groups / n`` when the rows are independent of their group with mean
    zero, and unchanged when ``values`` is rescaled. Rows of zeros add nothing; empty groups
    are allowed.
    """
    sums = values.new_zeros(n_groups, values.shape[1]).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).to(values.dtype)
    explained = (sums.pow(2).sum(-1) / counts).sum()
    return explained / values.pow(2).sum().clamp(min=1e-8)


def spread_share(
    values: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    strata: torch.Tensor,
    n_strata: int,
) -> torch.Tensor:
    """Share of the variation of ``values``' spread within groups that the groups explain.

    Each row's squared deviation from its group's mean, times ``n / (n - 1)`` for a group of
    ``n`` rows (so that groups of different sizes compare; rows of groups of one are left
    out), is centred on the mean of its stratum (each group lies in one stratum), and the
    result is :func:`between_group_share` of that over the groups: about ``n_groups / n``
    when every group of a stratum spreads alike, up to 1 when the spread of each row is
    that of its group and the groups of a stratum differ. Unchanged when ``values`` is
    rescaled.

    Parameters
    ----------
    values
        ``(n, d)``.
    groups, n_groups
        Group of each row, as :func:`group_index` gives them.
    strata, n_strata
        Stratum of each row; rows of one group share it.
    """
    counts = torch.bincount(groups, minlength=n_groups).to(values.dtype)[groups]
    usable = (counts > 1).to(values.dtype)
    centred = values - group_mean(values, groups, n_groups)[groups]
    scale = usable * counts / (counts - 1).clamp(min=1)
    spread = centred.pow(2) * scale[:, None]
    sums = spread.new_zeros(n_strata, spread.shape[1]).index_add_(0, strata, spread)
    n_usable = spread.new_zeros(n_strata).index_add_(0, strata, usable)
    typical = sums / n_usable.clamp(min=1)[:, None]
    return between_group_share((spread - typical[strata]) * usable[:, None], groups, n_groups)


def moment_matched(
    mean: torch.Tensor, var: torch.Tensor, groups: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the equal-weight mixture of the cells' Gaussians in each group."""
    mix_mean = group_mean(mean, groups, n_groups)
    second = group_mean(var + mean**2, groups, n_groups)
    return mix_mean, (second - mix_mean**2).clamp(min=1e-6)


def within_group_derangement(
    groups: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random partner from the same group for every row, never the row itself.

    Rows are shuffled within their group, then each row takes the next row of its group
    (cyclically). Groups of one row have no valid partner.

    Returns
    -------
    ``(n,)`` partner indices and a ``(n,)`` boolean mask of rows that have a valid partner.
    """
    n = groups.shape[0]
    noise = torch.rand(n, device=groups.device)
    order = torch.argsort(groups.to(torch.float64) + noise.to(torch.float64))
    sorted_groups = groups[order]
    counts = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n, device=groups.device) - starts[sorted_groups]
    next_position = starts[sorted_groups] + (position + 1) % counts[sorted_groups]
    partner = torch.empty_like(order)
    partner[order] = order[next_position]
    return partner, counts[groups] > 1
