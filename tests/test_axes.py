"""The aligned axes of z_tx: the rotation search, and how the model reports z_tx with it."""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch
from scipy.stats import ortho_group

from conftest import SETUP, TINY, small_screen
from fcr_tools import FCRModel
from fcr_tools._axes import condition_covariances, fit_rotation, total_correlation


def _planted(d=4, n_conditions=30, seed=0):
    """Covariances diagonal in the rows of a random rotation ``true`` (``true.T D true``)."""
    rng = np.random.default_rng(seed)
    true = ortho_group.rvs(d, random_state=seed)
    variances = np.exp(rng.uniform(-2, 2, (n_conditions, d)))
    covs = np.einsum("ji,cj,jk->cik", true, variances, true)
    return covs, rng.integers(5, 50, n_conditions).astype(float), true


def test_fit_rotation_recovers_planted_axes():
    covs, counts, true = _planted()
    assert total_correlation(covs, counts) > 0.1
    rotation = fit_rotation(covs, counts, seed=0)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(4), atol=1e-10)
    assert total_correlation(covs, counts, rotation) < 1e-6
    # the found axes are the planted ones, up to order and sign
    match = np.abs(rotation @ true.T)
    np.testing.assert_allclose(np.sort(match, axis=1)[:, -1], 1.0, atol=1e-4)
    np.testing.assert_allclose(match.sum(0), 1.0, atol=1e-3)


def test_fit_rotation_keeps_axes_that_are_already_aligned():
    rng = np.random.default_rng(1)
    variances = np.exp(rng.uniform(-1, 1, (10, 3)))
    covs = np.stack([np.diag(v) for v in variances])
    counts = np.full(10, 20.0)
    assert total_correlation(covs, counts) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(fit_rotation(covs, counts), np.eye(3))


def test_fit_rotation_of_nothing_is_the_identity():
    np.testing.assert_array_equal(fit_rotation(np.zeros((0, 3, 3)), np.zeros(0)), np.eye(3))
    one = np.ones((4, 1, 1))
    np.testing.assert_array_equal(fit_rotation(one, np.ones(4)), np.eye(1))


def test_condition_covariances_are_the_aggregate_posteriors():
    rng = np.random.default_rng(2)
    mean, var = rng.normal(size=(9, 2)), rng.uniform(0.1, 1, (9, 2))
    groups = np.array(["a"] * 4 + ["b"] * 4 + ["c"])  # "c" has one cell: left out
    covs, counts = condition_covariances(mean, var, groups)
    np.testing.assert_array_equal(counts, [4, 4])
    for cov, rows in zip(covs, [slice(0, 4), slice(4, 8)], strict=True):
        expected = np.cov(mean[rows].T, bias=True) + np.diag(var[rows].mean(0))
        np.testing.assert_allclose(cov, expected)


@pytest.fixture(scope="module")
def aligned_model():
    """A small trained model whose z_tx varies within conditions along correlated directions.

    A tiny model's z_tx stays close to its prior (nothing to align), so the encoder head's
    mean rows are then replaced by random ones of different scales mixed by a non-orthogonal
    matrix, and the axes aligned again. Read only.
    """
    adata = small_screen(n_cells_per_condition=20)
    FCRModel.setup_anndata(adata, **SETUP)
    scvi.settings.seed = 0
    model = FCRModel(adata, **{**TINY, "n_latent_tx": 3})
    model.train(max_epochs=3, batch_size=64, shrinkage=False, enable_progress_bar=False)
    model.trained_axes = dict(model.interaction_axes_)
    mix = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]])
    head = model.module.encoders["tx"].net[-1]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        spread = torch.randn(3, head.in_features, generator=generator)
        head.weight[:3] = mix @ (spread * torch.tensor([[20.0], [10.0], [5.0]]))
    model.align_interaction_axes()
    return model


def test_train_records_the_aligned_axes(aligned_model):
    record = aligned_model.trained_axes  # as train() left it
    assert set(record) == {
        "rotation",
        "total_correlation",
        "total_correlation_aligned",
        "n_conditions",
    }
    np.testing.assert_allclose(record["rotation"] @ record["rotation"].T, np.eye(3), atol=1e-8)
    assert record["total_correlation_aligned"] <= record["total_correlation"]
    assert record["n_conditions"] == 27  # 3 cell lines x (4 drugs x 2 doses + control)


def test_z_tx_is_reported_in_its_aligned_axes(aligned_model):
    model = aligned_model
    record = model.interaction_axes_
    rotation = record["rotation"]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-8)
    assert not np.allclose(np.abs(rotation), np.eye(3), atol=0.05)
    assert record["total_correlation"] > 0.05
    assert record["total_correlation_aligned"] < 0.5 * record["total_correlation"]

    reported = model.get_latent_representation(block="tx")
    own = np.concatenate(
        [out["qz_tx"].loc.numpy() for out in model.inference_batches(batch_size=50)]
    )
    np.testing.assert_allclose(reported, own @ rotation.T, atol=1e-5)
    # a rotation: the distances between cells, so neighbour graphs, are unchanged
    np.testing.assert_allclose(
        np.linalg.norm(reported[:20, None] - reported[None, :20], axis=-1),
        np.linalg.norm(own[:20, None] - own[None, :20], axis=-1),
        atol=1e-4,
    )
    # the other blocks as the module gives them, next to the rotated z_tx
    both = model.get_latent_representation(block=["t", "tx"])
    np.testing.assert_allclose(both[:, -3:], reported, atol=1e-6)
    t_own = np.concatenate([out["qz_t"].loc.numpy() for out in model.inference_batches()])
    np.testing.assert_allclose(both[:, :-3], t_own, atol=1e-6)

    target = model.adata.copy()
    model.write_latents(target)
    np.testing.assert_allclose(target.obsm["X_fcr_tx"], reported, atol=1e-6)


def test_aligned_axes_leave_predictions_alone(aligned_model):
    model = aligned_model
    controls = model.adata[model.adata.obs["drug"] == "control"].copy()
    aligned = model.predict_counterfactual(controls, treatment="drug_1", dose=1.0)
    record = model.interaction_axes_
    model.interaction_axes_ = None
    try:
        own = model.predict_counterfactual(controls, treatment="drug_1", dose=1.0)
        unrotated = model.get_latent_representation(block="tx")
    finally:
        model.interaction_axes_ = record
    np.testing.assert_array_equal(aligned.X, own.X)
    np.testing.assert_allclose(
        model.get_latent_representation(block="tx"), unrotated @ record["rotation"].T, atol=1e-5
    )


def test_align_interaction_axes_is_reproducible_and_saved(aligned_model, tmp_path):
    model = aligned_model
    record = dict(model.interaction_axes_)
    try:
        again = model.align_interaction_axes()
        np.testing.assert_allclose(again, record["rotation"], atol=1e-8)
        model.save(tmp_path / "m")
        loaded = FCRModel.load(tmp_path / "m", adata=model.adata.copy())
    finally:
        model.interaction_axes_ = record
    assert loaded.fcr_version_["model_format"] == "1.5"
    np.testing.assert_allclose(loaded.interaction_axes_["rotation"], record["rotation"])
    np.testing.assert_allclose(
        loaded.get_latent_representation(block="tx"),
        model.get_latent_representation(block="tx"),
        atol=1e-6,
    )


def test_a_failed_alignment_warns_and_keeps_the_model(adata, build_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no convergence")

    monkeypatch.setattr(FCRModel, "align_interaction_axes", broken)
    with pytest.warns(UserWarning, match=r"Aligning the axes of z_tx failed.*no convergence"):
        model = build_model(adata, train={"shrinkage": False})
    assert model.is_trained_ and model.interaction_axes_ is None
    own = next(iter(model.inference_batches()))["qz_tx"].loc
    np.testing.assert_array_equal(
        model.get_latent_representation(block="tx")[: len(own)], torch.as_tensor(own).numpy()
    )


def test_alignment_leaves_the_random_state_alone(aligned_model):
    """What follows training (the shrinkage's second training) draws the same numbers."""
    model = aligned_model
    record = dict(model.interaction_axes_)
    try:
        torch.manual_seed(3)
        model.align_interaction_axes()
        after = torch.rand(5)
    finally:
        model.interaction_axes_ = record
    torch.manual_seed(3)
    np.testing.assert_array_equal(after.numpy(), torch.rand(5).numpy())
