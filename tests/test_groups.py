"""Group operations of a minibatch: ids, means, moment matching, within-group derangements."""

import numpy as np
import pytest
import torch

from fcr_tools._groups import (
    between_group_share,
    group_index,
    group_mean,
    moment_matched,
    spread_share,
    within_group_derangement,
)


def _numpy_groups(*columns):
    keys = np.concatenate(
        [np.asarray(c, dtype=np.float64).reshape(len(c), -1) for c in columns], 1
    )
    return [tuple(row) for row in keys]


def test_group_index_matches_unique_rows():
    rng = np.random.default_rng(0)
    covs = torch.as_tensor(rng.integers(0, 3, (50, 2)))
    t_idx = torch.as_tensor(rng.integers(0, 4, (50, 2)))
    t_dose = torch.as_tensor(rng.choice([0.0, 0.1, 1.0], (50, 2)).astype(np.float32))
    groups, n_groups = group_index(covs, t_idx, t_dose)
    assert groups.dtype == torch.int64 and groups.shape == (50,)
    keys = _numpy_groups(covs.numpy(), t_idx.numpy(), t_dose.numpy())
    assert n_groups == len(set(keys))
    assert set(groups.tolist()) == set(range(n_groups))
    for i in range(50):
        for j in range(50):
            assert (groups[i] == groups[j]).item() == (keys[i] == keys[j])


def test_group_index_one_dimensional_columns():
    groups, n_groups = group_index(torch.tensor([3, 1, 3, 2]), torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert n_groups == 3
    assert groups[0] == groups[2]
    assert len({groups[0].item(), groups[1].item(), groups[3].item()}) == 3


def test_group_index_distinguishes_close_doses():
    groups, n_groups = group_index(torch.tensor([0.3, 0.30001, 0.3], dtype=torch.float32))
    assert n_groups == 2
    assert groups[0] == groups[2] != groups[1]


def test_group_mean_against_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 3))
    groups = rng.integers(0, 5, 40)
    groups[:5] = np.arange(5)  # every group present
    out = group_mean(torch.as_tensor(values), torch.as_tensor(groups), 5).numpy()
    expected = np.stack([values[groups == g].mean(0) for g in range(5)])
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_group_mean_empty_group_is_zero():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = group_mean(values, torch.tensor([0, 2]), 3)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]))


def test_moment_matched_against_numpy():
    rng = np.random.default_rng(2)
    mean = rng.normal(size=(30, 4))
    var = rng.uniform(0.1, 2.0, size=(30, 4))
    groups = np.repeat(np.arange(3), 10)
    rng.shuffle(groups)
    m, v = moment_matched(torch.as_tensor(mean), torch.as_tensor(var), torch.as_tensor(groups), 3)
    for g in range(3):
        sel = groups == g
        # mixture of equal-weight Gaussians: E[z] and E[var] + Var(means)
        np.testing.assert_allclose(m[g].numpy(), mean[sel].mean(0), rtol=1e-10)
        np.testing.assert_allclose(
            v[g].numpy(), var[sel].mean(0) + mean[sel].var(0), rtol=1e-8, atol=1e-12
        )


def test_moment_matched_single_cell_is_the_cell():
    mean, var = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])
    m, v = moment_matched(mean, var, torch.tensor([0]), 1)
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(v, var)


def test_moment_matched_variance_is_positive():
    mean = torch.zeros(3, 2)
    var = torch.zeros(3, 2)
    _, v = moment_matched(mean, var, torch.zeros(3, dtype=torch.long), 1)
    assert (v > 0).all()


def test_moment_matched_is_differentiable():
    mean = torch.randn(6, 2, requires_grad=True)
    var = torch.rand(6, 2, requires_grad=True)
    m, v = moment_matched(mean, var, torch.tensor([0, 0, 1, 1, 1, 2]), 3)
    (m.sum() + v.sum()).backward()
    assert mean.grad is not None and torch.isfinite(mean.grad).all()
    assert var.grad is not None and (var.grad != 0).any()


@pytest.mark.parametrize("seed", range(8))
def test_within_group_derangement(seed):
    rng = np.random.default_rng(seed)
    n_groups = 7
    groups_np = rng.integers(0, n_groups, 60)
    groups_np[:3] = [0, 0, 1]  # group 0 has >= 2 rows
    groups_np[groups_np == 6] = 5
    groups_np[-1] = 6  # group 6 is a singleton
    groups = torch.as_tensor(groups_np)
    torch.manual_seed(seed)
    partner, valid = within_group_derangement(groups, n_groups)
    partner, valid = partner.numpy(), valid.numpy()
    counts = np.bincount(groups_np, minlength=n_groups)
    assert partner.shape == (60,) and valid.dtype == bool
    # always within the group, and a permutation of the rows
    np.testing.assert_array_equal(groups_np[partner], groups_np)
    np.testing.assert_array_equal(np.sort(partner), np.arange(60))
    # never itself when the group has more than one row; singletons are masked out
    np.testing.assert_array_equal(valid, counts[groups_np] > 1)
    assert (partner[valid] != np.arange(60)[valid]).all()
    assert not valid[-1]


def test_within_group_derangement_is_random():
    groups = torch.zeros(20, dtype=torch.long)
    torch.manual_seed(0)
    seen = {tuple(within_group_derangement(groups, 1)[0].tolist()) for _ in range(10)}
    assert len(seen) > 1


def test_within_group_derangement_pairs_of_two_swap():
    groups = torch.tensor([0, 1, 0, 1])
    partner, valid = within_group_derangement(groups, 2)
    assert partner.tolist() == [2, 3, 0, 1]
    assert valid.all()


def test_within_group_derangement_all_singletons():
    partner, valid = within_group_derangement(torch.tensor([0, 1, 2]), 3)
    assert partner.tolist() == [0, 1, 2]
    assert not valid.any()


def test_between_group_share_against_numpy():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(40, 3)) + rng.normal(size=(4, 3))[np.arange(40) % 4]
    groups = np.arange(40) % 4
    explained = sum(
        (groups == g).sum() * np.sum(values[groups == g].mean(0) ** 2) for g in range(4)
    )
    share = between_group_share(torch.as_tensor(values), torch.as_tensor(groups), 4)
    assert share.item() == pytest.approx(explained / np.sum(values**2))
    assert 0.0 < share.item() < 1.0


def test_between_group_share_bounds_scale_and_zero_rows():
    rng = np.random.default_rng(4)
    groups = torch.as_tensor(np.arange(30) % 3)
    equal = torch.as_tensor(rng.normal(size=(3, 2)))[groups]
    assert between_group_share(equal, groups, 3).item() == pytest.approx(1.0)
    values = torch.as_tensor(rng.normal(size=(30, 2)))
    share = between_group_share(values, groups, 3)
    # unchanged by a rescaling; rows of zeros in other (or empty) groups add nothing
    assert between_group_share(7.5 * values, groups, 3).item() == pytest.approx(share.item())
    padded = torch.cat([values, torch.zeros(10, 2)])
    padded_groups = torch.cat([groups, torch.full((10,), 4)])
    assert between_group_share(padded, padded_groups, 6).item() == pytest.approx(share.item())
    zeros = between_group_share(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), 1)
    assert zeros.item() == 0.0


def test_between_group_share_is_chance_level_for_independent_rows():
    rng = np.random.default_rng(5)
    values = torch.as_tensor(rng.normal(size=(4000, 4)))
    groups = torch.as_tensor(rng.integers(0, 40, 4000))
    # about n_groups / n = 0.01 when the rows do not depend on their group
    assert between_group_share(values, groups, 40).item() == pytest.approx(0.01, abs=0.004)


def _numpy_spread_share(values, groups, strata):
    """spread_share written out with loops, for the test."""
    spread = np.zeros_like(values)
    usable = np.zeros(len(values), bool)
    for g in np.unique(groups):
        rows = groups == g
        n = rows.sum()
        if n > 1:
            spread[rows] = (values[rows] - values[rows].mean(0)) ** 2 * n / (n - 1)
            usable[rows] = True
    contrast = np.zeros_like(values)
    for s in np.unique(strata):
        rows = (strata == s) & usable
        if rows.any():
            contrast[rows] = spread[rows] - spread[rows].mean(0)
    explained = sum(
        (groups == g).sum() * np.sum(contrast[groups == g].mean(0) ** 2) for g in np.unique(groups)
    )
    return explained / np.sum(contrast**2)


def test_spread_share_against_numpy():
    rng = np.random.default_rng(6)
    groups = rng.integers(0, 12, 120)
    groups[0] = 12  # a group of one row: left out
    strata = groups % 3
    scale = rng.uniform(0.3, 3.0, (13, 2))[groups]
    values = rng.normal(size=(120, 2)) * scale + rng.normal(size=(13, 2))[groups]
    share = spread_share(
        torch.as_tensor(values), torch.as_tensor(groups), 13, torch.as_tensor(strata), 3
    )
    assert share.item() == pytest.approx(_numpy_spread_share(values, groups, strata))


def test_spread_share_sees_spreads_that_differ_within_a_stratum_not_means():
    rng = np.random.default_rng(7)
    n, n_groups = 6000, 20
    groups = torch.as_tensor(np.arange(n) % n_groups)
    strata = groups // 5  # four strata of five groups
    noise = torch.as_tensor(rng.normal(size=(n, 3)))
    shifts = torch.as_tensor(rng.normal(scale=5.0, size=(n_groups, 3)))
    # every group of a stratum spreads alike, whatever its mean: chance level (n_groups / n)
    alike = noise * (1.0 + strata[:, None]) + shifts[groups]
    share = spread_share(alike, groups, n_groups, strata, 4).item()
    assert share == pytest.approx(n_groups / n, abs=0.01)
    # groups of one stratum spread differently: far above chance (a squared deviation varies
    # much from row to row, so the share stays well below 1); a rescaling changes nothing
    scales = torch.as_tensor(rng.uniform(0.2, 3.0, (n_groups, 3)))
    differ = noise * scales[groups] + shifts[groups]
    share = spread_share(differ, groups, n_groups, strata, 4)
    assert share.item() > 10 * n_groups / n
    rescaled = spread_share(4.0 * differ, groups, n_groups, strata, 4)
    assert rescaled.item() == pytest.approx(share.item())


def test_spread_share_of_groups_of_one_is_zero():
    values = torch.randn(5, 2, dtype=torch.float64)
    groups = torch.arange(5)
    assert spread_share(values, groups, 5, torch.zeros(5, dtype=torch.long), 1).item() == 0.0
