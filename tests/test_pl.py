"""fcr_tools.pl: the plots return figures, save them, and leave the data alone."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import fcr_tools


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_history_shows_every_term(trained_model, tmp_path):
    fig = fcr_tools.pl.history(trained_model, save=str(tmp_path / "history.png"))
    assert (tmp_path / "history.png").stat().st_size > 0
    titles = [ax.get_title() for ax in _visible(fig)]
    for term in ["loss", "kl cell", "adversarial", "discriminator accuracy"]:
        assert term in titles
    loss = _visible(fig)[titles.index("loss")]
    assert {line.get_label() for line in loss.get_lines()} == {"train", "validation"}


def test_history_keys_and_errors(trained_model):
    fig = fcr_tools.pl.history(trained_model, keys=["loss", "elbo_train"], show=False)
    assert [ax.get_title() for ax in _visible(fig)] == ["loss", "elbo train"]
    fig = fcr_tools.pl.history(trained_model.history, keys="treatment_ce", show=False)
    assert len(_visible(fig)) == 1
    with pytest.raises(KeyError, match="not_a_term"):
        fcr_tools.pl.history(trained_model, keys=["not_a_term"], show=False)


def test_predicted_vs_true_one_group_from_arrays():
    rng = np.random.default_rng(0)
    control = rng.normal(size=(40, 30))
    true = control + np.r_[np.full(5, 2.0), np.zeros(25)]
    predicted = true + rng.normal(scale=0.05, size=true.shape)
    fig = fcr_tools.pl.predicted_vs_true(
        predicted, true, control, n_degs=5, label_degs=2, title="A549 | Dex", show=False
    )
    (ax,) = _visible(fig)
    assert ax.get_title() == "A549 | Dex"
    assert len(ax.texts) == 3  # two gene labels and the scores
    assert "R2 top-5 DEGs" in ax.texts[-1].get_text()
    red = ax.collections[1].get_offsets()
    assert red.shape == (5, 2)
    fig = fcr_tools.pl.predicted_vs_true(
        predicted, true, control, n_degs=5, delta=True, show=False
    )
    ax = _visible(fig)[0]
    assert ax.get_xlabel() == "true change from control"
    assert "R2 of the change" in ax.texts[-1].get_text()
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 0], 2.0, atol=1e-9)


def test_predicted_vs_true_groups_from_anndata(trained_model, adata, snapshot, tmp_path):
    controls = adata[(adata.obs["drug"] == "control") & (adata.obs["cell_line"] == "cell_line_0")]
    groups = {}
    for drug in ["drug_0", "drug_1"]:
        mask = (
            (adata.obs["drug"] == drug)
            & (adata.obs["cell_line"] == "cell_line_0")
            & (adata.obs["dose"] == 1.0)
        )
        groups[f"cell_line_0 | {drug}"] = adata[mask]
    check = snapshot(adata)
    predicted = {
        name: trained_model.predict_counterfactual(controls.copy(), treatment=name[-6:], dose=1.0)
        for name in groups
    }
    fig = fcr_tools.pl.predicted_vs_true(
        predicted,
        groups,
        dict.fromkeys(groups, controls),
        n_degs=5,
        save=str(tmp_path / "pvt.pdf"),
    )
    check(adata)
    assert [ax.get_title() for ax in _visible(fig)] == list(groups)
    assert (tmp_path / "pvt.pdf").exists()
    ax = _visible(fig)[0]
    assert ax.texts[0].get_text() in set(adata.var_names)  # DEGs named by var_names


def test_predicted_vs_true_errors():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="same genes"):
        fcr_tools.pl.predicted_vs_true(x, np.zeros((3, 5)), x, show=False)
    with pytest.raises(TypeError, match="dicts"):
        fcr_tools.pl.predicted_vs_true({"a": x}, x, x, show=False)
    with pytest.raises(KeyError, match="b"):
        fcr_tools.pl.predicted_vs_true({"a": x, "b": x}, {"a": x}, {"a": x}, show=False)


def _effects():
    return pd.DataFrame(
        {
            "context": ["A549", "A549", "K562", "K562", "MCF7", "MCF7"],
            "treatment": ["drugA", "drugB"] * 3,
            "strength": [0.1, 0.8, 0.2, 0.5, 0.05, 0.9],
            "latent_strength": [1.0, 2.0, 1.5, 0.5, 0.2, 3.0],
        }
    )


def test_interaction_heatmap_from_a_table(tmp_path):
    effects = _effects()
    before = effects.copy()
    fig = fcr_tools.pl.interaction_heatmap(effects, save=str(tmp_path / "heat.png"))
    pd.testing.assert_frame_equal(effects, before)
    assert (tmp_path / "heat.png").stat().st_size > 0
    ax = fig.axes[0]
    # sorted by mean strength: drugB first; MCF7 (0.475), A549 (0.45), K562 (0.35)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["drugB", "drugA"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["MCF7", "A549", "K562"]
    image = ax.images[0].get_array()
    assert image[0, 0] == pytest.approx(0.9)
    assert len(ax.texts) == 6  # annotated
    assert "interaction strength" in fig.axes[1].get_ylabel()


def test_interaction_heatmap_order_value_and_errors():
    fig = fcr_tools.pl.interaction_heatmap(
        _effects(),
        value="latent_strength",
        contexts=["K562", "A549"],
        treatments=["drugA"],
        annotate=False,
        show=False,
    )
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["K562", "A549"]
    assert ax.images[0].get_array().tolist() == [[1.5], [1.0]]
    assert not ax.texts
    with pytest.raises(KeyError, match="nope"):
        fcr_tools.pl.interaction_heatmap(_effects(), value="nope", show=False)
    with pytest.raises(KeyError, match="HeLa"):
        fcr_tools.pl.interaction_heatmap(_effects(), contexts=["HeLa"], show=False)


def test_interaction_heatmap_from_a_model(trained_model):
    _, ax = plt.subplots()
    fig = fcr_tools.pl.interaction_heatmap(
        trained_model, value="specificity", ax=ax, show=False, max_cells_per_context=10
    )
    assert fig is ax.figure
    assert ax.images[0].get_array().shape == (3, 4)


def _with_umaps(adata, blocks=("x", "t", "tx")):
    """``adata`` with made-up UMAP coordinates stored as tl.block_umap stores them."""
    rng = np.random.default_rng(0)
    for block in blocks:
        adata.obsm[f"X_umap_fcr_{block}"] = rng.normal(size=(adata.n_obs, 2)).astype(np.float32)
    return adata


def test_latent_umaps_draws_the_stored_umaps(adata, snapshot, tmp_path):
    _with_umaps(adata)
    check = snapshot(adata)
    fig = fcr_tools.pl.latent_umaps(
        adata, color=["cell_line", "drug"], save=str(tmp_path / "u.png")
    )
    check(adata)
    assert (tmp_path / "u.png").stat().st_size > 0
    axes = _visible(fig)
    assert len(axes) == 6  # 2 colours x 3 blocks
    assert axes[2].get_title() == "z_tx (interaction)\ncoloured by cell_line"
    # the cells of cell_line_0 sit where obsm says
    first = axes[2].collections[0].get_offsets()
    cells = (adata.obs["cell_line"] == "cell_line_0").to_numpy()
    np.testing.assert_array_equal(first, adata.obsm["X_umap_fcr_tx"][cells])


def test_block_umap_plots_one_block(adata, snapshot):
    _with_umaps(adata, blocks=["t"])
    check = snapshot(adata)
    fig = fcr_tools.pl.block_umap(adata, "t", color=["drug", "dose"], show=False)
    check(adata)
    titles = [ax.get_title() for ax in _visible(fig)]
    assert titles == ["z_t (treatment)\ncoloured by drug", "z_t (treatment)\ncoloured by dose"]
    drugs = _visible(fig)[0]
    assert len(drugs.collections) == len(adata.obs["drug"].cat.categories)
    assert sum(len(c.get_offsets()) for c in drugs.collections) == adata.n_obs


def test_plots_do_not_compute_umaps(adata, snapshot):
    adata.obsm["X_fcr_tx"] = np.zeros((adata.n_obs, 2), dtype=np.float32)
    check = snapshot(adata)
    with pytest.raises(KeyError, match=r"X_umap_fcr_tx.*tl\.block_umap\(adata, blocks='tx'\)"):
        fcr_tools.pl.block_umap(adata, "tx", show=False)
    with pytest.raises(KeyError, match=r"X_umap_mine_x.*prefix='X_mine'"):
        fcr_tools.pl.latent_umaps(adata, prefix="X_mine", blocks=["x"], show=False)
    _with_umaps(adata, blocks=["x"])
    with pytest.raises(KeyError, match=r"'X_umap_fcr_t', 'X_umap_fcr_tx'.*\['t', 'tx'\]"):
        fcr_tools.pl.latent_umaps(adata, show=False)
    # the 0.1 call pl.block_umap(adata, use_rep) is told what changed
    with pytest.raises(KeyError, match="obsm key, not a block name"):
        fcr_tools.pl.block_umap(adata, "X_fcr_tx", show=False)
    with pytest.raises(KeyError, match="color='nope'"):
        fcr_tools.pl.block_umap(adata, "x", color="nope", show=False)
    assert not {"X_umap_fcr_t", "X_umap_fcr_tx", "X_umap"} & set(adata.obsm)
    del adata.obsm["X_umap_fcr_x"]
    check(adata)
