"""Response-prediction scores, identifiability scores and the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from fcr_tools.baselines import AdditiveBaseline, ControlMeanBaseline
from fcr_tools.metrics import mean_corr_coef, response_scores, score_heldout_groups, top_degs


def test_top_degs_ranks_by_t_statistic():
    rng = np.random.default_rng(0)
    control = rng.normal(size=(60, 6))
    treated = rng.normal(size=(60, 6)) + np.array([0, 4, 0, -2, 0, 0.0])
    assert list(top_degs(treated, control, 2)) == [1, 3]


def test_response_scores_perfect_and_control_predictions():
    rng = np.random.default_rng(1)
    control = rng.normal(size=(50, 40))
    true = control + rng.normal(0, 2, size=40)
    perfect = response_scores(true, true, control)
    assert perfect["r2_all"] == pytest.approx(1.0)
    assert perfect["r2_delta"] == pytest.approx(1.0)
    assert perfect["pearson_delta_deg20"] == pytest.approx(1.0)
    no_change = response_scores(control, true, control)
    assert no_change["r2_deg20"] < perfect["r2_deg20"]
    assert no_change["r2_delta"] < 0.01
    assert np.isnan(no_change["pearson_delta_deg20"])


def test_mcc_is_invariant_to_permutation_and_scale_and_detects_mixing():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 3))
    assert mean_corr_coef(np.c_[z[:, [2, 0, 1]] * [3, -1, 0.5], rng.normal(size=500)], z) == (
        pytest.approx(1.0)
    )
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    assert mean_corr_coef(z @ rotation, z) < 0.95
    with pytest.raises(ValueError, match="fewer than"):
        mean_corr_coef(z[:, :2], z)


def test_baselines_predict_context_means(make_screen):
    adata = make_screen(n_holdout_pairs=1, n_cells_per_condition=12)
    train = adata[adata.obs["split"] == "train"].copy()
    control = ControlMeanBaseline(train, "drug", "cell_line", dose_key="dose")
    additive = AdditiveBaseline(train, "drug", "cell_line", dose_key="dose")
    cells = adata[adata.obs["drug"] == "control"].copy()
    pred = control.predict_counterfactual(cells, treatment="drug_1", dose=1.0)
    line0 = (cells.obs["cell_line"] == "cell_line_0").to_numpy()
    expected = train[(train.obs["drug"] == "control") & (train.obs["cell_line"] == "cell_line_0")]
    np.testing.assert_allclose(pred.X[line0][0], np.asarray(expected.X.mean(0)), rtol=1e-5)
    shifted = additive.predict_counterfactual(cells, treatment="drug_1", dose=1.0)
    assert shifted.shape == pred.shape
    assert not np.allclose(shifted.X, pred.X)
    assert list(shifted.obs["drug"].unique()) == ["drug_1"]
    with pytest.raises(ValueError, match="'drug_9'"):
        additive.predict_counterfactual(cells, treatment="drug_9", dose=1.0)


def test_score_heldout_groups_is_tidy(make_screen):
    adata = make_screen(n_holdout_pairs=1, n_cells_per_condition=12)
    train = adata[adata.obs["split"] == "train"].copy()
    predictors = {
        "control_mean": ControlMeanBaseline(train, "drug", "cell_line", dose_key="dose"),
        "additive": AdditiveBaseline(train, "drug", "cell_line", dose_key="dose"),
    }
    table = score_heldout_groups(
        predictors, adata, "drug", "cell_line", dose_key="dose", min_cells=10
    )
    n_doses = adata.obs["dose"][adata.obs["dose"] > 0].nunique()
    assert len(table) == 2 * n_doses
    assert {"cell_line", "drug", "dose", "method", "n_cells", "r2_deg20"} <= set(table.columns)
    with pytest.raises(ValueError, match="min_cells=100"):
        score_heldout_groups(predictors, adata, "drug", "cell_line", "dose", min_cells=100)
    with pytest.raises(KeyError, match="'fold'"):
        score_heldout_groups(predictors, adata, "drug", "cell_line", split_key="fold")
