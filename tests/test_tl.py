"""fcr_tools.tl.interaction_effects: structure, consistency with the counterfactuals, errors."""

from __future__ import annotations

import numpy as np
import pytest

import fcr_tools
from fcr_tools.tl import interaction_effects

COLUMNS = [
    "cell_line",
    "context",
    "treatment",
    "dose",
    "n_cells",
    "strength",
    "specificity",
    "effect",
    "fraction",
    "latent_strength",
    "top_genes",
]


def test_one_row_per_context_and_treatment(trained_model, adata, snapshot):
    check = snapshot(adata)
    effects, genes = interaction_effects(trained_model, n_top_genes=4, return_gene_effects=True)
    check(adata)
    assert list(effects.columns) == COLUMNS
    contexts = sorted(adata.obs["cell_line"].unique())
    treatments = [f"drug_{k}" for k in range(4)]
    assert len(effects) == len(contexts) * len(treatments)
    assert sorted(effects["context"].unique()) == contexts
    assert sorted(effects["treatment"].unique()) == treatments
    controls = adata.obs[adata.obs["drug"] == "control"].groupby("cell_line", observed=True).size()
    for _, row in effects.iterrows():
        assert row["n_cells"] == controls[row["cell_line"]]
        assert len(row["top_genes"]) == 4 and set(row["top_genes"]) <= set(adata.var_names)
    for column in ["strength", "specificity", "effect", "latent_strength"]:
        assert np.isfinite(effects[column]).all() and (effects[column] >= 0).all(), column
    assert genes.shape == (len(effects), adata.n_vars)
    assert list(genes.columns) == list(adata.var_names)
    # the strongest gene by |a - b| is listed first
    for (_, row), (_, gene_row) in zip(effects.iterrows(), genes.iterrows(), strict=True):
        assert row["top_genes"][0] == gene_row.abs().idxmax()


def test_effect_is_the_counterfactual_response(trained_model, adata):
    """``effect`` is the RMS change predict_counterfactual gives from control to treated."""
    effects = interaction_effects(trained_model, treatments="drug_2", dose=0.3)
    for _, row in effects.iterrows():
        controls = adata[
            (adata.obs["drug"] == "control") & (adata.obs["cell_line"] == row["cell_line"])
        ].copy()
        treated = trained_model.predict_counterfactual(controls, treatment="drug_2", dose=0.3)
        untreated = trained_model.predict_counterfactual(controls, treatment="control")
        rms = np.sqrt(((treated.X - untreated.X) ** 2).mean(1)).mean()
        np.testing.assert_allclose(row["effect"], rms, rtol=1e-4)
        assert row["fraction"] == pytest.approx(row["strength"] / row["effect"])
    assert (effects["dose"] == 0.3).all()


def test_one_context_has_no_specificity(make_screen, build_model):
    model = build_model(make_screen(), setup={"covariate_keys": None}, train={"max_epochs": 1})
    effects = interaction_effects(model, treatments=["drug_0", "drug_1"])
    assert list(effects["context"]) == ["all", "all"]
    assert "cell_line" not in effects.columns
    np.testing.assert_allclose(effects["specificity"], 0.0, atol=1e-6)


def test_subsampling_and_counts_model(make_screen, build_model):
    adata = make_screen()
    model = build_model(adata, setup={"layer": "counts"}, likelihood="nb", train={"max_epochs": 1})
    effects = fcr_tools.tl.interaction_effects(model, max_cells_per_context=5, seed=1)
    assert (effects["n_cells"] == 5).all()
    assert np.isfinite(effects[["strength", "effect"]].to_numpy()).all()


def test_bad_arguments(trained_model):
    with pytest.raises(ValueError, match="control"):
        interaction_effects(trained_model, treatments="control")
    with pytest.raises(ValueError, match="drug_9"):
        interaction_effects(trained_model, treatments="drug_9")
    with pytest.raises(ValueError, match="max_cells_per_context"):
        interaction_effects(trained_model, max_cells_per_context=0)
    with pytest.raises(ValueError, match="'sample'"):
        interaction_effects(trained_model, mode="sample")
    treated = trained_model.adata[trained_model.adata.obs["drug"] != "control"].copy()
    with pytest.raises(ValueError, match="no control cells"):
        interaction_effects(trained_model, adata=treated)


def test_latent_usage_is_the_mean_kl_per_dimension(trained_model, adata, snapshot):
    import torch
    from torch.distributions import kl_divergence

    from fcr_tools.tl import latent_usage

    check = snapshot(adata)
    usage = latent_usage(trained_model, adata, active_threshold=0.05)
    check(adata)
    assert list(usage.columns) == ["block", "dim", "kl", "active"]
    assert usage.groupby("block", sort=False).size().to_dict() == {"x": 2, "t": 3, "tx": 2}
    assert (usage["kl"] >= 0).all()
    assert (usage["active"] == (usage["kl"] > 0.05)).all()

    # the same numbers from torch's own KL of the posterior and prior distributions
    module = trained_model.module
    module.eval()
    cells = np.arange(40)
    (tensors,) = list(trained_model._loader(adata, cells, batch_size=40))
    inputs = module._get_inference_input(tensors)
    inputs.pop("n_primary")
    with torch.inference_mode():
        out = module.inference(**inputs)
        expected = np.concatenate(
            [
                kl_divergence(out[f"qz_{b}"], out[f"pz_{b}"]).mean(0).numpy()
                for b in ("x", "t", "tx")
            ]
        )
    subset = latent_usage(trained_model, adata, indices=cells)
    np.testing.assert_allclose(subset["kl"], expected, rtol=1e-4, atol=1e-6)


def test_latent_usage_bad_arguments(trained_model):
    from fcr_tools.tl import latent_usage

    with pytest.raises(ValueError, match="active_threshold"):
        latent_usage(trained_model, active_threshold=-1)
    with pytest.raises(ValueError, match="indices is empty"):
        latent_usage(trained_model, indices=[])


# ------------------------------------------------------------------ block_umap
def test_block_umap_writes_only_the_coordinates(adata):
    rng = np.random.default_rng(0)
    first = (adata.obs["cell_line"] == "cell_line_0").to_numpy()
    adata.obsm["X_fcr_x"] = 20.0 * first[:, None] + rng.normal(size=(adata.n_obs, 2))
    adata.obsm["X_fcr_tx"] = rng.normal(size=(adata.n_obs, 3))
    before = adata.copy()
    copied = fcr_tools.tl.block_umap(adata, blocks="tx", copy=True)
    assert set(copied.obsm) - set(before.obsm) == {"X_umap_fcr_tx"}
    assert set(adata.obsm) == set(before.obsm)  # copy=True leaves adata alone
    assert fcr_tools.tl.block_umap(adata, blocks=["x", "tx"]) is None
    for block in ("x", "tx"):
        coords = adata.obsm[f"X_umap_fcr_{block}"]
        assert coords.shape == (adata.n_obs, 2) and coords.dtype == np.float32
        assert np.isfinite(coords).all()
    # the same seed gives the same embedding
    np.testing.assert_array_equal(copied.obsm["X_umap_fcr_tx"], adata.obsm["X_umap_fcr_tx"])
    # no neighbours graph, X_umap or uns entry of scanpy's is left in adata
    assert set(adata.obsm) - set(before.obsm) == {"X_umap_fcr_x", "X_umap_fcr_tx"}
    assert not adata.obsp and set(adata.uns) == set(before.uns)
    np.testing.assert_array_equal(adata.X, before.X)
    # the two clusters of the context block stay apart in its UMAP
    coords = adata.obsm["X_umap_fcr_x"]
    gap = np.linalg.norm(coords[first].mean(0) - coords[~first].mean(0))
    assert gap > 3 * max(coords[first].std(0).max(), coords[~first].std(0).max())
    # another prefix: obsm["X_mine_t"] -> obsm["X_umap_mine_t"]
    adata.obsm["X_mine_t"] = rng.normal(size=(adata.n_obs, 2))
    fcr_tools.tl.block_umap(adata, blocks="t", prefix="X_mine", n_neighbors=5)
    assert adata.obsm["X_umap_mine_t"].shape == (adata.n_obs, 2)


def test_block_umap_errors(adata):
    adata.obsm["X_fcr_x"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(KeyError, match=r"X_fcr_tx.*write_latents"):
        fcr_tools.tl.block_umap(adata, blocks=["x", "tx"])
    assert "X_umap_fcr_x" not in adata.obsm  # nothing written before the check
    with pytest.raises(ValueError, match="blocks"):
        fcr_tools.tl.block_umap(adata, blocks=[])
    with pytest.raises(ValueError, match="at least 2 cells"):
        fcr_tools.tl.block_umap(adata[:1].copy(), blocks="x")
