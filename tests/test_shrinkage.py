"""fit_additive_shrinkage / AdditiveShrinkage: FCR shrunk towards the additive baseline."""

from __future__ import annotations

import numpy as np
import pytest
import scvi

from fcr_tools.baselines import AdditiveBaseline
from fcr_tools.tl import AdditiveShrinkage, fit_additive_shrinkage
from fcr_tools.tl._shrinkage import _internal_pairs, _least_squares_weight

HELD = ("cell_line_0", "drug_0")


@pytest.fixture(scope="module")
def _fitted(_screen_template):
    """A tiny model trained without the pair HELD, and its shrinkage (module scope)."""
    from conftest import SETUP, TINY, TRAIN
    from fcr_tools import FCRModel

    full = _screen_template.copy()
    pair = (full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == HELD[1])
    train = full[~pair.to_numpy()].copy()
    FCRModel.setup_anndata(train, **SETUP)
    scvi.settings.seed = 0
    model = FCRModel(train, **TINY)
    model.train(**TRAIN)
    obs_before = train.obs.copy()
    shrunk = fit_additive_shrinkage(model, seed=0, min_cells=5, batch_size=64)
    return full, train, model, shrunk, obs_before


def test_weight_and_pairs_recorded(_fitted):
    shrunk = _fitted[3]
    assert 0.0 <= shrunk.weight_ <= 1.0
    assert shrunk.internal_pairs_, "the weight was chosen on some held-out pairs"
    for context, treatment in shrunk.internal_pairs_:
        assert treatment != "control"
        assert (context, treatment) != HELD  # never a pair the training data lacks
    assert "weight=" in repr(shrunk)


def test_training_data_untouched(_fitted):
    _, train, _, _, obs_before = _fitted
    assert list(train.obs.columns) == list(obs_before.columns)
    np.testing.assert_array_equal(train.obs["drug"], obs_before["drug"])


def test_unmeasured_pair_is_blended(_fitted, snapshot):
    full, train, model, shrunk, _ = _fitted
    controls = full[(full.obs["cell_line"] == HELD[0]) & (full.obs["drug"] == "control")].copy()
    check = snapshot(controls)
    pred = shrunk.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    check(controls)
    fcr = model.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    additive = AdditiveBaseline(train, "drug", "cell_line", dose_key="dose")
    add = additive.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    w = shrunk.weight_
    expected = w * np.asarray(fcr.X, dtype=np.float64) + (1 - w) * np.asarray(add.X)
    np.testing.assert_allclose(pred.X, expected, rtol=1e-5, atol=1e-5)
    assert (pred.obs["shrinkage_weight"] == w).all()
    assert pred.obs["drug"].astype(str).eq(HELD[1]).all()


def test_measured_pair_is_fcr(_fitted):
    full, _, model, shrunk, _ = _fitted
    controls = full[(full.obs["cell_line"] == "cell_line_1") & (full.obs["drug"] == "control")]
    pred = shrunk.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    fcr = model.predict_counterfactual(controls, treatment=HELD[1], dose=1.0)
    np.testing.assert_array_equal(pred.X, fcr.X)
    assert (pred.obs["shrinkage_weight"] == 1.0).all()


def test_same_seed_same_weight(_fitted):
    _, _, model, shrunk, _ = _fitted
    again = fit_additive_shrinkage(model, seed=0, min_cells=5, batch_size=64)
    assert again.weight_ == pytest.approx(shrunk.weight_)
    assert again.internal_pairs_ == shrunk.internal_pairs_


def test_least_squares_weight_recovers_mixture():
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(3):
        a, b = rng.normal(size=50), rng.normal(size=50)
        groups.append((0.3 * a + 0.7 * b, (a, b)))
    assert _least_squares_weight(groups) == pytest.approx(0.3)
    far = [(a + 2 * (a - b), (a, b)) for _, (a, b) in groups]  # beyond FCR: clipped to 1
    assert _least_squares_weight(far) == 1.0


def test_internal_pairs_need_the_treatment_elsewhere():
    contexts = np.array(["A", "A", "B", "B", "B", "C"])
    treatments = np.array(["ctl", "x", "ctl", "x", "y", "ctl"])
    pairs = _internal_pairs(contexts, treatments, "ctl", np.random.default_rng(0))
    assert len(pairs) == 1 and pairs[0][1] == "x"  # y is measured in B only
    combos = np.array(["ctl", "p", "ctl", "q", "p+q", "ctl"])
    assert _internal_pairs(contexts, combos, "ctl", np.random.default_rng(0)) == [("B", "p+q")]


def test_errors(adata, build_model):
    untrained = build_model(adata, train=False)
    with pytest.raises(ValueError, match="Train the model first"):
        fit_additive_shrinkage(untrained)
    one_line = adata[adata.obs["cell_line"] == "cell_line_0"].copy()
    model = build_model(one_line)
    with pytest.raises(ValueError, match="measured in one context only"):
        fit_additive_shrinkage(model)
    with pytest.raises(ValueError, match=r"weight must lie in \[0, 1\]"):
        AdditiveShrinkage(model, None, 1.5)
