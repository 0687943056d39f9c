"""Response-prediction scores, identifiability scores and the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from fcr_tools.baselines import AdditiveBaseline, ContextAdjustedBaseline, ControlMeanBaseline
from fcr_tools.metrics import (
    block_r2,
    cluster_scores,
    conditional_hsic,
    energy_distance,
    mean_corr_coef,
    response_scores,
    score_heldout_groups,
    top_degs,
)


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


def test_additive_baseline_sums_the_parts_of_an_unmeasured_combination():
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(3)
    shift = {"control": np.zeros(4), "A": np.array([1.0, 0, 0, 2]), "B": np.array([0, -1.0, 0, 1])}
    obs = pd.DataFrame({"drug": np.repeat(["control", "A", "B"], 20)})
    x = rng.normal(size=(60, 4)) * 0.01 + np.stack([shift[d] for d in obs["drug"]])
    train = ad.AnnData(x.astype(np.float32), obs=obs)
    additive = AdditiveBaseline(train, "drug")
    pred = additive.predict_counterfactual(train[:3].copy(), treatment="A+B")
    expected = (
        x[:20].mean(0) + (x[20:40].mean(0) - x[:20].mean(0)) + (x[40:].mean(0) - x[:20].mean(0))
    )
    np.testing.assert_allclose(pred.X[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'A\\+C'"):
        additive.predict_counterfactual(train[:3].copy(), treatment="A+C")


def _converging_screen(slope: float, measured: dict[str, list[str]], seed: int = 0):
    """Contexts whose controls differ; each treatment moves a context by a common shift plus
    ``slope`` times its controls' difference from the mean of all contexts' controls."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    contexts = sorted(measured)
    base = {c: rng.normal(size=30) for c in contexts}
    centre = np.mean(list(base.values()), axis=0)
    shift = {"A": rng.normal(size=30), "B": rng.normal(size=30)}
    rows, labels = [], []
    for c in contexts:
        for treatment in ["control", *measured[c]]:
            mean = base[c]
            if treatment != "control":
                mean = base[c] + shift[treatment] + slope * (base[c] - centre)
            rows.append(mean + 1e-3 * rng.normal(size=(10, 30)))
            labels += [(c, treatment)] * 10
    obs = pd.DataFrame(labels, columns=["line", "drug"])
    truth = {c: {t: base[c] + shift[t] + slope * (base[c] - centre) for t in shift} for c in base}
    return ad.AnnData(np.concatenate(rows).astype(np.float32), obs=obs), truth


def test_context_adjusted_baseline_learns_the_slope_and_predicts_unmeasured_pairs():
    measured = {"c0": ["A", "B"], "c1": ["A", "B"], "c2": ["A", "B"], "c3": ["B"]}
    train, truth = _converging_screen(-0.5, measured)
    adjusted = ContextAdjustedBaseline(train, "drug", "line")
    additive = AdditiveBaseline(train, "drug", "line")
    # every context's shift predicted from the others': the misses are the slope times the
    # control differences, so leaving one context out recovers it
    assert adjusted.slope == pytest.approx(-0.5, abs=0.01)
    cells = train[(train.obs["line"] == "c3") & (train.obs["drug"] == "control")].copy()
    pred = adjusted.predict_counterfactual(cells, treatment="A")
    np.testing.assert_allclose(pred.X[0], truth["c3"]["A"], atol=0.02)
    miss = np.abs(additive.predict_counterfactual(cells, treatment="A").X[0] - truth["c3"]["A"])
    assert miss.max() > 0.2  # the additive baseline misses the context's own start


def test_context_adjusted_baseline_is_additive_without_a_slope_to_learn():
    # each treatment in one context only: nothing to leave out, slope 0
    train, _ = _converging_screen(-0.5, {"c0": ["A"], "c1": ["B"], "c2": []})
    adjusted = ContextAdjustedBaseline(train, "drug", "line")
    assert adjusted.slope == 0.0
    cells = train[train.obs["drug"] == "control"].copy()
    for treatment in ["A", "B"]:
        np.testing.assert_array_equal(
            adjusted.predict_counterfactual(cells, treatment=treatment).X,
            AdditiveBaseline(train, "drug", "line").predict_counterfactual(cells, treatment).X,
        )
    # a slope beyond [-1, 1] (shifts growing with the controls' difference) is clipped
    steep, _ = _converging_screen(3.0, {c: ["A", "B"] for c in ["c0", "c1", "c2"]})
    assert ContextAdjustedBaseline(steep, "drug", "line").slope == 1.0


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


def test_block_r2_separates_information_from_noise():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(800, 2))
    assert block_r2(np.c_[np.tanh(z), z[:, :1] ** 3], z) > 0.8
    assert block_r2(rng.normal(size=(800, 3)), z) < 0.1
    with pytest.raises(ValueError, match="same number of cells"):
        block_r2(z[:10], z)


@pytest.mark.parametrize("method", ["kmeans", "leiden"])
def test_cluster_scores_match_labels(method):
    rng = np.random.default_rng(4)
    labels = np.repeat(["a", "b", "c"], 80)
    centers = {"a": [0, 0], "b": [10, 0], "c": [0, 10]}
    latent = np.array([centers[lab] for lab in labels]) + rng.normal(size=(240, 2))
    good = cluster_scores(latent, labels, method=method, resolution=0.1)
    assert good["nmi"] > 0.9 and good["ari"] > 0.9 and good["silhouette"] > 0.5
    bad = cluster_scores(rng.normal(size=(240, 2)), labels, method="kmeans")
    assert bad["nmi"] < 0.2
    with pytest.raises(ValueError, match="'louvain'"):
        cluster_scores(latent, labels, method="louvain")


def test_conditional_hsic_detects_dependence_within_groups_only():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(4), 60)
    shift = groups[:, None] * 3.0
    a = rng.normal(size=(240, 2)) + shift
    independent = rng.normal(size=(240, 2)) + shift  # dependent only through the group
    assert conditional_hsic(a, independent, groups, n_permutations=100)["p_value"] > 0.05
    dependent = a + 0.3 * rng.normal(size=(240, 2))
    assert conditional_hsic(a, dependent, groups, n_permutations=100)["p_value"] < 0.05
    with pytest.raises(ValueError, match="at least 5 cells"):
        conditional_hsic(a[:3], a[:3], groups[:3])


def test_energy_distance_is_zero_for_identical_sets_and_grows_with_shift():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 4))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(x, x + 0.5) < energy_distance(x, x + 2.0)
