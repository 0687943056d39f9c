"""fcr_tools.pp.prepare_screen: the preprocessing recipe."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fcr_tools import FCRModel
from fcr_tools.pp import prepare_screen

LINES = ["A549", "K562", "MCF7"]
DRUGS = ["Vehicle", "Dex", "SAHA", "Nutlin"]
DOSES = [10.0, 100.0, 1000.0, 10000.0]


def raw_screen(n_per_group: int = 6, n_genes: int = 60, as_sparse: bool = True) -> ad.AnnData:
    """Counts of a small screen: every line x drug (x dose for treated cells)."""
    rows = []
    for line in LINES:
        for drug in DRUGS:
            for dose in [np.nan] if drug == "Vehicle" else DOSES:
                rows += [{"cell_line": line, "product_name": drug, "dose": dose}] * n_per_group
    obs = pd.DataFrame(rows)
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    rng = np.random.default_rng(0)
    rates = rng.gamma(0.5, 4.0, size=n_genes)
    counts = rng.poisson(rates, size=(len(obs), n_genes)).astype(np.float32)
    counts[:, -1] = 0  # a gene without counts
    matrix = sparse.csr_matrix(counts) if as_sparse else counts
    return ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def test_recipe_steps():
    raw = raw_screen()
    before = raw.copy()
    out = prepare_screen(raw, "product_name", "cell_line", dose_key="dose", n_top_genes=20)
    # the input is untouched
    assert raw.shape == before.shape and list(raw.obs.columns) == list(before.obs.columns)
    assert (raw.X != before.X).nnz == 0
    assert raw.obs["product_name"].tolist() == before.obs["product_name"].tolist()
    # controls, doses, counts, normalisation, genes, split
    assert list(out.obs["product_name"].cat.categories) == ["control", "Dex", "Nutlin", "SAHA"]
    assert (
        out.obs.loc[before.obs["product_name"] == "Vehicle", "product_name"] == "control"
    ).all()
    treated = out.obs["product_name"] != "control"
    expected = np.log10(1 + before.obs["dose"]) / np.log10(1 + 10000)
    np.testing.assert_allclose(out.obs.loc[treated, "dose"], expected[treated.to_numpy()])
    assert (out.obs.loc[~treated, "dose"] == 0).all()
    assert (out.obs.loc[~treated, "dose_raw"] == 0).all()
    assert out.n_vars == 20 and "g59" not in out.var_names
    counts = out.layers["counts"].toarray()
    np.testing.assert_array_equal(counts, before[:, out.var_names].X.toarray())
    total = before.X.toarray().sum(1)
    np.testing.assert_allclose(np.expm1(out.X.toarray()), counts / total[:, None] * 1e4, rtol=1e-4)
    assert (out.obs["split"] == "train").all()
    assert out.uns["fcr_prepare"]["n_top_genes"] == 20
    # the result registers as is
    FCRModel.setup_anndata(
        out, treatment_key="product_name", dose_key="dose", covariate_keys="cell_line"
    )


def test_inplace_dense_and_other_scalings():
    raw = raw_screen(as_sparse=False)
    n_expressed = int((raw.X.sum(0) > 0).sum())
    result = prepare_screen(
        raw,
        "product_name",
        ["cell_line"],
        dose_key="dose",
        dose_scaling="max",
        n_top_genes=None,
        inplace=True,
    )
    assert result is None
    assert "counts" in raw.layers and raw.n_vars == n_expressed < 60  # genes without counts
    assert raw.obs["dose"].max() == 1.0
    assert raw.obs["dose"].min() == 0.0
    assert sorted(raw.obs["dose"].unique()) == [0.0, 0.001, 0.01, 0.1, 1.0]


def test_seurat_v3_on_counts():
    pytest.importorskip("skmisc")
    out = prepare_screen(
        raw_screen(), "product_name", "cell_line", n_top_genes=15, hvg_flavor="seurat_v3"
    )
    assert out.n_vars == 15


def test_holdout_pairs_given_and_random():
    raw = raw_screen()
    out = prepare_screen(
        raw, "product_name", "cell_line", holdout_pairs=[("K562", "Dex"), (("MCF7",), "SAHA")]
    )
    held = out.obs[out.obs["split"] == "holdout"]
    assert set(zip(held["cell_line"], held["product_name"], strict=True)) == {
        ("K562", "Dex"),
        ("MCF7", "SAHA"),
    }
    assert len(held) == 2 * len(DOSES) * 6
    assert out.uns["fcr_prepare"]["holdout_pairs"] == ["K562|Dex", "MCF7|SAHA"]

    out = prepare_screen(raw, "product_name", "cell_line", n_holdout_pairs=4, seed=3)
    held = out.obs[out.obs["split"] == "holdout"]
    pairs = set(zip(held["cell_line"], held["product_name"], strict=True))
    assert len(pairs) == 4 and all(drug != "control" for _, drug in pairs)
    train = out.obs[(out.obs["split"] == "train") & (out.obs["product_name"] != "control")]
    assert set(train["cell_line"]) == set(LINES)
    assert set(train["product_name"]) == {"Dex", "SAHA", "Nutlin"}
    again = prepare_screen(raw, "product_name", "cell_line", n_holdout_pairs=4, seed=3)
    assert again.uns["fcr_prepare"]["holdout_pairs"] == out.uns["fcr_prepare"]["holdout_pairs"]


def test_errors():
    raw = raw_screen()
    with pytest.raises(KeyError, match="Did you mean"):
        prepare_screen(raw, "product", "cell_line")
    with pytest.raises(ValueError, match="No control cells"):
        prepare_screen(raw, "product_name", "cell_line", control_labels=["DMSO"])
    with pytest.raises(ValueError, match="Cannot hold out 7"):
        prepare_screen(raw, "product_name", "cell_line", n_holdout_pairs=7)
    with pytest.raises(ValueError, match="no treated cells"):
        prepare_screen(raw, "product_name", "cell_line", holdout_pairs=[("K562", "Vehicle")])
    bad_dose = raw.copy()
    bad_dose.obs.loc[bad_dose.obs["product_name"] == "Dex", "dose"] = np.nan
    with pytest.raises(ValueError, match="without a numeric dose"):
        prepare_screen(bad_dose, "product_name", "cell_line", dose_key="dose")
    lognorm = raw.copy()
    lognorm.X = lognorm.X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        prepare_screen(lognorm, "product_name", "cell_line")
