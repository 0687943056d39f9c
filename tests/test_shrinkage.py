"""FCRModel.fit_shrinkage / train(shrinkage=True): unmeasured pairs shrunk towards the
context-adjusted additive baseline by a weight chosen on measured pairs held out inside the
training data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scvi

from fcr_tools import FCRModel
from fcr_tools._shrinkage import (
    HeldOutGroup,
    internal_pairs,
    least_squares_sums,
    least_squares_weight,
)
from fcr_tools.baselines import AdditiveBaseline, ContextAdjustedBaseline

HELD = ("cell_line_0", "drug_0")


def _fcr_alone(model, *args, **kwargs):
    """The model's own prediction."""
    return model.predict_counterfactual(*args, shrinkage=False, **kwargs)


@pytest.fixture(scope="module")
def _fitted(_screen_template):
    """A tiny model trained without the pair HELD, with its shrinkage chosen (module scope)."""
    from conftest import SETUP, TINY, TRAIN

    full = _screen_template.copy()
    pair = (full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == HELD[1])
    train = full[~pair.to_numpy()].copy()
    FCRModel.setup_anndata(train, **SETUP)
    scvi.settings.seed = 0
    model = FCRModel(train, **TINY)
    model.train(**TRAIN, shrinkage=False)
    assert model.shrinkage_ is None
    obs_before, uns_before = train.obs.copy(), set(train.uns)
    weight = model.fit_shrinkage(seed=0, min_cells=5, batch_size=64)
    return full, train, model, weight, (obs_before, uns_before)


def test_weight_and_pairs_recorded(_fitted):
    _, _, model, weight, _ = _fitted
    record = model.shrinkage_
    assert 0.0 <= weight <= 1.0 and record["weight"] == weight
    assert record["pairs"] and record["n_groups"] >= 1
    for context, treatment in record["pairs"]:
        assert treatment != "control"
        assert (context, treatment) != HELD  # never a pair the training data lacks
    assert record["means"].shape[1] == model.summary_stats.n_vars
    assert least_squares_weight(sums=record["sums"]) == pytest.approx(weight)
    assert set(record["sums_top_degs"]) == {20, 50}  # the top-DEG criteria, recorded
    assert record["target"] == "context_adjusted"
    _, train, _, _, _ = _fitted
    expected = ContextAdjustedBaseline(train, "drug", "cell_line", dose_key="dose").slope
    assert record["slope"] == pytest.approx(expected) and -1.0 <= record["slope"] <= 1.0


def test_training_data_untouched(_fitted):
    _, train, _, _, (obs_before, uns_before) = _fitted
    assert list(train.obs.columns) == list(obs_before.columns)
    np.testing.assert_array_equal(train.obs["drug"], obs_before["drug"])
    assert set(train.uns) == uns_before


def test_unmeasured_pair_is_blended(_fitted, snapshot):
    full, train, model, w, _ = _fitted
    controls = full[(full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == "control")].copy()
    check = snapshot(controls)
    pred = model.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    check(controls)
    fcr = _fcr_alone(model, controls, treatment=HELD[1], dose=1.0)
    target = ContextAdjustedBaseline(train, "drug", "cell_line", dose_key="dose")
    base = target.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    expected = w * np.asarray(fcr.X, dtype=np.float64) + (1 - w) * np.asarray(base.X)
    np.testing.assert_allclose(pred.X, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred.obs["shrinkage_weight"], w)
    assert pred.obs["drug"].astype(str).eq(HELD[1]).all()


def test_a_record_without_target_shrinks_towards_the_plain_additive_baseline(_fitted):
    """Models saved before the context adjustment keep the baseline their weight was chosen
    against. With w = 0 the prediction is the baseline itself."""
    full, train, model, _, _ = _fitted
    controls = full[(full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == "control")].copy()
    record = model.shrinkage_
    old = {k: v for k, v in record.items() if k not in ("target", "slope")}
    keys = ("drug", "cell_line")
    predictions = []
    try:
        for shrunk, baseline in [
            ({**old, "weight": 0.0}, AdditiveBaseline(train, *keys, dose_key="dose")),
            ({**record, "weight": 0.0}, ContextAdjustedBaseline(train, *keys, dose_key="dose")),
        ]:
            model.shrinkage_ = shrunk
            pred = model.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
            expected = baseline.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
            np.testing.assert_allclose(pred.X, expected.X, rtol=1e-5, atol=1e-5)
            predictions.append(pred.X)
    finally:
        model.shrinkage_ = record  # the fixture is shared
    assert np.abs(predictions[0] - predictions[1]).max() > 1e-3  # the two baselines differ


def test_measured_pair_and_control_are_fcr(_fitted):
    full, _, model, _, _ = _fitted
    controls = full[(full.obs["cell_line"] == "cell_line_1") & (full.obs["drug"] == "control")]
    for treatment, dose in [(HELD[1], 1.0), ("control", None)]:
        pred = model.predict_counterfactual(controls, treatment=treatment, dose=dose)
        fcr = _fcr_alone(model, controls, treatment=treatment, dose=dose)
        np.testing.assert_array_equal(pred.X, fcr.X)
        assert (pred.obs["shrinkage_weight"] == 1.0).all()


def test_grid_matches_single_calls_and_means(_fitted):
    full, _, model, w, _ = _fitted
    controls = full[full.obs["drug"] == "control"].copy()  # every cell line: some measured
    targets = [HELD[1], "drug_1"]
    grid = model.predict_grid(controls, treatment=targets, dose=[1.0])
    for k, treatment in enumerate(targets):
        single = model.predict_counterfactual(controls, treatment=treatment, dose=1.0)
        rows = grid.obs["target"].to_numpy() == k
        np.testing.assert_allclose(grid.X[rows], single.X, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            grid.obs["shrinkage_weight"].to_numpy()[rows], single.obs["shrinkage_weight"]
        )
    # means of groups that mix a shrunk context with measured ones (groupby the source drug)
    means = model.predict_grid(
        controls, treatment=targets, dose=[1.0], aggregate="mean", groupby="drug"
    )
    for k in range(len(targets)):
        rows = grid.obs["target"].to_numpy() == k
        np.testing.assert_allclose(means.X[k], grid.X[rows].mean(0), rtol=1e-4, atol=1e-5)
        weight = grid.obs["shrinkage_weight"].to_numpy()[rows].mean()
        assert means.obs["shrinkage_weight"].iloc[k] == pytest.approx(weight, rel=1e-5)
    assert means.obs["shrinkage_weight"].iloc[0] < 1.0 or w == 1.0


def test_saved_and_loaded_with_the_weight(_fitted, tmp_path):
    full, train, model, w, _ = _fitted
    controls = full[(full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == "control")].copy()
    expected = model.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    model.save(str(tmp_path / "m"))
    for loaded in (
        FCRModel.load(str(tmp_path / "m"), adata=train.copy()),
        FCRModel.load(str(tmp_path / "m")),  # without data: the means come with the model
    ):
        assert loaded.shrinkage_["weight"] == w
        assert loaded.fcr_version_["model_format"] == "1.5"
        assert loaded.shrinkage_["target"] == "context_adjusted"
        pred = loaded.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
        np.testing.assert_allclose(pred.X, expected.X, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weight(_fitted):
    _, _, model, weight, _ = _fitted
    pairs = model.shrinkage_["pairs"]
    try:
        assert model.fit_shrinkage(seed=0, min_cells=5, batch_size=64) == pytest.approx(weight)
        assert model.shrinkage_["pairs"] == pairs
    finally:
        model.shrinkage_["weight"] = weight  # the fixture is shared


def test_least_squares_weight_recovers_mixture():
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(3):
        a, b = rng.normal(size=50), rng.normal(size=50)
        groups.append(HeldOutGroup(0.3 * a + 0.7 * b, a, b, rng.permutation(50)))
    assert least_squares_weight(groups) == pytest.approx(0.3)
    halves = [least_squares_sums(groups[:1]), least_squares_sums(groups[1:])]
    pooled = [halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]]
    assert least_squares_weight(sums=pooled) == pytest.approx(0.3)  # folds pool exactly
    far = [g._replace(truth=g.fcr + 2 * (g.fcr - g.baseline)) for g in groups]
    assert least_squares_weight(far) == 1.0  # beyond FCR: clipped to 1


def test_least_squares_weight_on_top_degs_uses_those_genes_only():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(size=40)
    truth = a.copy()  # FCR exact on the first ten genes ranked ...
    degs = rng.permutation(40)
    truth[degs[10:]] = b[degs[10:]]  # ... the additive baseline on the others
    group = HeldOutGroup(truth, a, b, degs)
    assert least_squares_weight([group], n_degs=10) == pytest.approx(1.0)
    assert 0.0 < least_squares_weight([group]) < 0.5
    sums = least_squares_sums([group], n_degs=10)
    assert least_squares_weight(sums=sums) == pytest.approx(1.0)


def test_internal_pairs_need_the_treatment_elsewhere():
    contexts = np.array(["A", "A", "B", "B", "B", "C"])
    treatments = np.array(["ctl", "x", "ctl", "x", "y", "ctl"])
    pairs = internal_pairs(contexts, treatments, "ctl", np.random.default_rng(0))
    assert len(pairs) == 1 and pairs[0][1] == "x"  # y is measured in B only
    combos = np.array(["ctl", "p", "ctl", "q", "p+q", "ctl"])
    assert internal_pairs(contexts, combos, "ctl", np.random.default_rng(0)) == [("B", "p+q")]
    again = internal_pairs(contexts, treatments, "ctl", np.random.default_rng(0), exclude=pairs)
    assert set(again).isdisjoint(pairs) and again  # another fold: the other "x" pair


def test_train_chooses_the_weight_by_default(build_model):
    from conftest import small_screen

    adata = small_screen(n_cells_per_condition=12)  # groups of >= 10 cells (min_cells)
    model = build_model(adata)
    assert model.shrinkage_ is not None
    assert model.shrinkage_["epochs"] == len(model.history["train_loss"])
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False, shrinkage=False)
    assert model.shrinkage_ is None  # the weight of the earlier training is dropped


def test_skipped_with_a_reason_where_it_cannot_be_chosen(adata, build_model, caplog):
    with caplog.at_level(logging.INFO, logger="scvi"):
        model = build_model(adata)  # 8 cells per group, below min_cells=10
    assert model.shrinkage_ is None
    assert "fewer than min_cells=10" in caplog.text
    with pytest.raises(ValueError, match="fewer than min_cells=10"):
        model.fit_shrinkage()


def test_errors(adata, build_model):
    untrained = build_model(adata, train=False)
    with pytest.raises(ValueError, match="Train the model first"):
        untrained.fit_shrinkage()
    one_line = adata[adata.obs["cell_line"] == "cell_line_0"].copy()
    model = build_model(one_line)
    with pytest.raises(ValueError, match="measured in one context only"):
        model.fit_shrinkage(min_cells=1)
    nb = build_model(adata.copy(), setup={"layer": "counts"}, likelihood="nb")
    with pytest.raises(ValueError, match="Gaussian likelihood only"):
        nb.fit_shrinkage(min_cells=1)


def test_contexts_named_as_the_additive_baseline_names_them(adata, build_model):
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")
    model = build_model(adata, setup={"covariate_keys": ["cell_line", "batch"]}, train=False)
    additive = AdditiveBaseline(adata, "drug", ["cell_line", "batch"], dose_key="dose")
    rows = np.arange(adata.n_obs)
    expected = additive._means.context_labels(adata)
    np.testing.assert_array_equal(model._context_labels(adata, rows), expected)


def test_a_failing_second_training_warns_and_keeps_the_model(adata, build_model, monkeypatch):
    def fail(*args, **kwargs):
        raise FloatingPointError("loss exploded")

    monkeypatch.setattr(FCRModel, "fit_shrinkage", fail)
    with pytest.warns(UserWarning, match="FloatingPointError: loss exploded"):
        model = build_model(adata)
    assert model.is_trained_ and model.shrinkage_ is None
