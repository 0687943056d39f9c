import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fcr_tools.data import simulate_counterfactual, simulate_screen

SMALL = {
    "n_cell_lines": 3,
    "n_treatments": 4,
    "doses": (0.1, 1.0),
    "n_cells_per_condition": 10,
    "n_genes": 30,
}


@pytest.fixture(scope="module")
def adata():
    return simulate_screen(**SMALL, n_holdout_pairs=2, seed=1)


def _dense(m):
    return m.toarray() if sparse.issparse(m) else np.asarray(m)


def test_shapes_and_keys(adata):
    n_cond = SMALL["n_treatments"] * len(SMALL["doses"])
    n_ctrl = SMALL["n_cells_per_condition"] * len(SMALL["doses"])
    n = SMALL["n_cell_lines"] * (n_cond * SMALL["n_cells_per_condition"] + n_ctrl)
    assert adata.shape == (n, SMALL["n_genes"])
    assert list(adata.obs_names[:2]) == ["cell_0", "cell_1"]
    assert list(adata.var_names[:2]) == ["gene_0", "gene_1"]
    for key in ("cell_line", "drug", "dose", "condition", "split", "library_size"):
        assert key in adata.obs
    for key in ("cell_line", "drug", "condition", "split"):
        assert isinstance(adata.obs[key].dtype, pd.CategoricalDtype)
    assert adata.obs["dose"].dtype == np.float64
    assert set(adata.obs["drug"].cat.categories) == {"control"} | {
        f"drug_{k}" for k in range(SMALL["n_treatments"])
    }
    ctrl = adata.obs["drug"] == "control"
    assert (adata.obs.loc[ctrl, "dose"] == 0.0).all()
    assert (adata.obs.loc[~ctrl, "dose"] > 0).all()
    assert adata.obs["condition"].iloc[0].count("|") == 2
    assert ((adata.obs["cell_line"] == "cell_line_0") & ctrl).sum() == 20
    dims = {"z_x_true": 4, "z_t_true": 4, "z_tx_true": 4}
    for key, d in dims.items():
        assert adata.obsm[key].shape == (adata.n_obs, d)
        assert adata.obsm[key].dtype == np.float32
    assert set(adata.layers) - {None} == {"counts", "expected"}  # anndata >= 0.13: X is None
    assert adata.X.dtype == np.float32
    assert adata.layers["expected"].dtype == np.float32


def test_counts_and_lognorm(adata):
    counts = _dense(adata.layers["counts"])
    assert np.all(counts >= 0)
    assert np.array_equal(counts, np.round(counts))
    assert np.all(counts.sum(1) > 0)
    expected_x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(_dense(adata.X), expected_x, rtol=1e-5, atol=1e-5)


def test_sparse():
    a = simulate_screen(**SMALL, as_sparse=True, seed=1)
    b = simulate_screen(**SMALL, seed=1)
    assert sparse.isspmatrix_csr(a.X) or isinstance(a.X, sparse.csr_array)
    assert sparse.issparse(a.layers["counts"])
    np.testing.assert_array_equal(a.X.toarray(), b.X)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), b.layers["counts"])


def test_determinism():
    a = simulate_screen(**SMALL, n_holdout_pairs=2, seed=3)
    b = simulate_screen(**SMALL, n_holdout_pairs=2, seed=3)
    c = simulate_screen(**SMALL, n_holdout_pairs=2, seed=4)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])
    np.testing.assert_array_equal(a.obsm["z_tx_true"], b.obsm["z_tx_true"])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns["fcr_simulation"]["holdout_pairs"] == b.uns["fcr_simulation"]["holdout_pairs"]
    np.testing.assert_array_equal(
        a.uns["fcr_simulation"]["decoder"]["w3"], b.uns["fcr_simulation"]["decoder"]["w3"]
    )
    assert not np.array_equal(a.X, c.X)


def _check_holdout(a):
    held = a.uns["fcr_simulation"]["holdout_pairs"]
    obs = a.obs
    pair = obs["cell_line"].astype(str) + "|" + obs["drug"].astype(str)
    assert set(pair[obs["split"] == "holdout"]) == set(held)
    assert not pair[obs["split"] == "train"].isin(held).any()
    # all doses of held-out pairs are held out
    for p in held:
        doses = obs.loc[pair == p, "dose"]
        assert doses.nunique() == len(SMALL["doses"])
    train = obs[(obs["split"] == "train") & (obs["drug"] != "control")]
    assert set(train["cell_line"].astype(str)) == set(obs["cell_line"].cat.categories)
    drugs = set(obs["drug"].cat.categories) - {"control"}
    assert set(train["drug"].astype(str)) == drugs
    assert (obs.loc[obs["drug"] == "control", "split"] == "train").all()
    return held


def test_holdout_count(adata):
    held = _check_holdout(adata)
    assert len(held) == 2
    assert all(isinstance(p, str) for p in held)


def test_holdout_max_and_impossible():
    # 3 x 4 grid: at most 12 - 4 = 8 pairs can be held out
    for seed in range(5):
        a = simulate_screen(**SMALL, n_holdout_pairs=8, seed=seed)
        assert len(_check_holdout(a)) == 8
    with pytest.raises(ValueError, match="at most 8"):
        simulate_screen(**SMALL, n_holdout_pairs=9)


def test_holdout_explicit():
    pairs = [("cell_line_0", "drug_1"), ("cell_line_2", "drug_3")]
    a = simulate_screen(**SMALL, n_holdout_pairs=pairs)
    assert _check_holdout(a) == ["cell_line_0|drug_1", "cell_line_2|drug_3"]
    with pytest.raises(ValueError, match="cell_line_7"):
        simulate_screen(**SMALL, n_holdout_pairs=[("cell_line_7", "drug_1")])
    with pytest.raises(ValueError, match="drug_9"):
        simulate_screen(**SMALL, n_holdout_pairs=[("cell_line_0", "drug_9")])
    every_line = [(f"cell_line_{c}", "drug_0") for c in range(3)]
    with pytest.raises(ValueError, match="drug_0"):
        simulate_screen(**SMALL, n_holdout_pairs=every_line)
    every_drug = [("cell_line_1", f"drug_{k}") for k in range(4)]
    with pytest.raises(ValueError, match="cell_line_1"):
        simulate_screen(**SMALL, n_holdout_pairs=every_drug)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_genes"):
        simulate_screen(n_genes=10, n_latent_x=4, n_latent_t=4, n_latent_tx=4)
    with pytest.raises(ValueError, match="doses"):
        simulate_screen(**{**SMALL, "doses": (0.0, 1.0)})
    with pytest.raises(ValueError, match="drug_99"):
        simulate_screen(**SMALL, combinations=[("drug_0", "drug_99")])


def test_counterfactual_identity(adata):
    y, (zx, _, _) = simulate_counterfactual(adata, "control", return_latents=True)
    ctrl = np.flatnonzero(adata.obs["drug"] == "control")
    sub = adata[ctrl]
    y_id, (zx_id, zt_id, ztx_id) = simulate_counterfactual(
        adata, "control", indices=ctrl, return_latents=True
    )
    assert np.allclose(y_id, sub.layers["expected"], atol=1e-5)
    assert np.array_equal(zx_id, sub.obsm["z_x_true"])
    assert np.allclose(zt_id, sub.obsm["z_t_true"], atol=1e-5)
    assert np.allclose(ztx_id, sub.obsm["z_tx_true"], atol=1e-5)
    assert y.shape == adata.shape and zx.shape == adata.obsm["z_x_true"].shape
    # every condition against itself
    for cond, grp in adata.obs.groupby("condition", observed=True):
        _, drug, dose = str(cond).split("|")
        idx = np.flatnonzero(adata.obs_names.isin(grp.index))
        y_own, (zx_own, zt_own, ztx_own) = simulate_counterfactual(
            adata,
            drug,
            dose=float(dose) if drug != "control" else None,
            indices=idx,
            return_latents=True,
        )
        assert np.allclose(y_own, adata.layers["expected"][idx], atol=1e-5)
        assert np.allclose(zx_own, adata.obsm["z_x_true"][idx])
        assert np.allclose(zt_own, adata.obsm["z_t_true"][idx], atol=1e-5)
        assert np.allclose(ztx_own, adata.obsm["z_tx_true"][idx], atol=1e-5)


def test_counterfactual_matches_real_cells():
    a = simulate_screen(**{**SMALL, "n_cells_per_condition": 150}, seed=2)
    obs = a.obs
    line = obs["cell_line"] == "cell_line_1"
    ctrl = np.flatnonzero(line & (obs["drug"] == "control"))
    real = np.flatnonzero(line & (obs["drug"] == "drug_2") & (obs["dose"] == 1.0))
    y_exp = simulate_counterfactual(a, "drug_2", dose=1.0, indices=ctrl)
    assert not np.allclose(y_exp, a.layers["expected"][ctrl], atol=0.1)
    y_cf = simulate_counterfactual(a, "drug_2", dose=1.0, indices=ctrl, kind="lognorm", seed=5)
    counts = simulate_counterfactual(a, "drug_2", dose=1.0, indices=ctrl, kind="counts", seed=5)
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    np.testing.assert_allclose(y_cf, np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    mean_cf = y_cf.mean(0)
    mean_real = a.X[real].mean(0)
    mean_ctrl = a.X[ctrl].mean(0)
    assert np.corrcoef(mean_cf, mean_real)[0, 1] > 0.95
    # the treatment effect itself is reproduced
    assert np.corrcoef(mean_cf - mean_ctrl, mean_real - mean_ctrl)[0, 1] > 0.9


def test_counterfactual_errors(adata):
    with pytest.raises(ValueError, match="drug_42"):
        simulate_counterfactual(adata, "drug_42")
    with pytest.raises(ValueError, match="-1"):
        simulate_counterfactual(adata, "drug_0", dose=-1.0)
    with pytest.raises(ValueError, match="abc"):
        simulate_counterfactual(adata, "drug_0", dose="abc")
    with pytest.raises(ValueError, match="kind"):
        simulate_counterfactual(adata, "drug_0", kind="raw")
    bare = ad.AnnData(X=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="fcr_simulation"):
        simulate_counterfactual(bare, "drug_0")


def test_interaction_strength_zero():
    a = simulate_screen(**{**SMALL, "n_cells_per_condition": 5}, interaction_strength=0.0)
    ctrl = np.flatnonzero(a.obs["drug"] == "control")
    # counterfactual latents of every cell line under drug_1: z_tx law is N(0, I) throughout
    _, (_, _, ztx) = simulate_counterfactual(a, "drug_1", 1.0, indices=ctrl, return_latents=True)
    np.testing.assert_allclose(ztx, a.obsm["z_tx_true"][ctrl], atol=1e-5)
    p = a.uns["fcr_simulation"]
    assert p["interaction_strength"] == 0.0
    # with interaction the z_tx means differ across cell lines
    b = simulate_screen(**{**SMALL, "n_cells_per_condition": 5}, interaction_strength=1.0)
    _, (_, _, ztx_b) = simulate_counterfactual(b, "drug_1", 1.0, indices=ctrl, return_latents=True)
    assert not np.allclose(ztx_b, b.obsm["z_tx_true"][ctrl], atol=1e-2)
    means = pd.DataFrame(ztx_b).groupby(b.obs["cell_line"].to_numpy()[ctrl]).mean()
    assert means.diff().abs().to_numpy()[1:].max() > 0.5


def test_combinations():
    a = simulate_screen(**SMALL, combinations=[("drug_0", "drug_1")], n_holdout_pairs=1)
    obs = a.obs
    assert "drug_0+drug_1" in obs["drug"].cat.categories
    combo = obs["drug"] == "drug_0+drug_1"
    assert combo.sum() == SMALL["n_cell_lines"] * len(SMALL["doses"]) * 10
    doses = obs["dose"].astype(str)
    assert set(doses[combo]) == {"0.1+0.1", "1.0+1.0"}
    assert set(doses[obs["drug"] == "control"]) == {"0"}
    assert set(doses[obs["drug"] == "drug_2"]) == {"0.1", "1.0"}
    assert "cell_line_0|drug_0+drug_1|1.0+1.0" in set(obs["condition"].astype(str))
    idx = np.flatnonzero(combo)
    for dose in ("1.0+1.0", 1.0):
        sel = idx[(doses.to_numpy()[idx] == "1.0+1.0")]
        y = simulate_counterfactual(a, "drug_0+drug_1", dose=dose, indices=sel)
        assert np.allclose(y, a.layers["expected"][sel], atol=1e-5)
    # asymmetric dose of a combination that was not simulated
    y = simulate_counterfactual(a, "drug_2+drug_3", dose="0.1+1.0", indices=idx[:3])
    assert y.shape == (3, SMALL["n_genes"])
    with pytest.raises(ValueError, match="parts"):
        simulate_counterfactual(a, "drug_2+drug_3", dose="0.1+1.0+1.0")
    # explicit hold-out of a combination
    b = simulate_screen(
        **SMALL,
        combinations=[("drug_0", "drug_1")],
        n_holdout_pairs=[("cell_line_1", "drug_0+drug_1")],
    )
    held = b.obs["split"] == "holdout"
    assert set(b.obs.loc[held, "drug"].astype(str)) == {"drug_0+drug_1"}
    assert held.sum() == len(SMALL["doses"]) * 10


def test_h5ad_round_trip(tmp_path):
    a = simulate_screen(**SMALL, combinations=[("drug_0", "drug_2")], n_holdout_pairs=2, seed=7)
    path = tmp_path / "sim.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    pa, pb = a.uns["fcr_simulation"], b.uns["fcr_simulation"]
    assert set(pa) == set(pb)
    assert list(pb["holdout_pairs"]) == list(pa["holdout_pairs"])
    np.testing.assert_array_equal(pb["m_tx"], pa["m_tx"])
    np.testing.assert_array_equal(pb["decoder"]["w1"], pa["decoder"]["w1"])
    idx = np.arange(0, b.n_obs, 7)
    for treatment, dose in (("drug_1", 0.3), ("drug_0+drug_2", "0.1+1.0"), ("control", None)):
        ya = simulate_counterfactual(a, treatment, dose, indices=idx)
        yb = simulate_counterfactual(b, treatment, dose, indices=idx)
        np.testing.assert_allclose(ya, yb)
    y_own = simulate_counterfactual(
        b, "control", indices=np.flatnonzero(b.obs["drug"] == "control")
    )
    assert np.allclose(y_own, b.layers["expected"][b.obs["drug"] == "control"], atol=1e-5)
    # a read-back screen without combinations (float dose, empty lists) also round-trips
    c = simulate_screen(**SMALL, seed=8)
    c.write_h5ad(tmp_path / "plain.h5ad")
    d = ad.read_h5ad(tmp_path / "plain.h5ad")
    assert d.obs["dose"].dtype == np.float64
    y = simulate_counterfactual(d[:5].copy(), "drug_3", 1.0)
    assert np.allclose(y, simulate_counterfactual(c, "drug_3", 1.0, indices=np.arange(5)))


def test_interaction_sd_range_default_unchanged():
    for kwargs in ({}, {"interaction_rank": None}):
        a = simulate_screen(**SMALL, **kwargs, seed=5)
        b = simulate_screen(**SMALL, **kwargs, interaction_sd_range=(0.3, 1.5), seed=5)
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.obsm["z_tx_true"], b.obsm["z_tx_true"])
        np.testing.assert_array_equal(
            a.uns["fcr_simulation"]["sd_tx"], b.uns["fcr_simulation"]["sd_tx"]
        )
        stored = a.uns["fcr_simulation"]["params"]["interaction_sd_range"]
        np.testing.assert_array_equal(stored, [0.3, 1.5])


@pytest.mark.parametrize("rank", [2, None])
def test_interaction_sd_range_wider(rank):
    narrow = simulate_screen(**SMALL, interaction_rank=rank, seed=6)
    wide = simulate_screen(**SMALL, interaction_rank=rank, interaction_sd_range=(0.1, 3.0), seed=6)
    sd_narrow = narrow.uns["fcr_simulation"]["sd_tx"]
    sd_wide = wide.uns["fcr_simulation"]["sd_tx"]
    assert sd_narrow.min() >= 0.3 and sd_narrow.max() <= 1.5
    assert sd_wide.min() >= 0.1 and sd_wide.max() <= 3.0
    assert np.log(sd_wide).std() > np.log(sd_narrow).std()
    assert np.ptp(sd_wide) > np.ptp(sd_narrow)
    # only the sd of z_tx changes: same means, decoder and z_x / z_t
    pn, pw = narrow.uns["fcr_simulation"], wide.uns["fcr_simulation"]
    np.testing.assert_array_equal(pn["m_tx"], pw["m_tx"])
    np.testing.assert_array_equal(pn["decoder"]["w3"], pw["decoder"]["w3"])
    np.testing.assert_array_equal(narrow.obsm["z_x_true"], wide.obsm["z_x_true"])
    np.testing.assert_array_equal(narrow.obsm["z_t_true"], wide.obsm["z_t_true"])

    # the per-condition spread of z_tx is wider too
    def condition_sds(a):
        z = pd.DataFrame(a.obsm["z_tx_true"], index=a.obs_names)
        return z.groupby(a.obs["condition"].to_numpy()).std().to_numpy()

    assert np.log(condition_sds(wide)).std() > np.log(condition_sds(narrow)).std()
    # a degenerate range gives one sd at full response, and counterfactuals stay exact
    flat = simulate_screen(**SMALL, interaction_rank=rank, interaction_sd_range=(2.0, 2.0))
    np.testing.assert_allclose(flat.uns["fcr_simulation"]["sd_tx"], 2.0)
    ctrl = np.flatnonzero(wide.obs["drug"] == "control")
    own = np.flatnonzero((wide.obs["drug"] == "drug_1") & (wide.obs["dose"] == 1.0))
    y = simulate_counterfactual(wide, "drug_1", 1.0, indices=own)
    assert np.allclose(y, wide.layers["expected"][own], atol=1e-5)
    y = simulate_counterfactual(wide, "control", indices=ctrl)
    assert np.allclose(y, wide.layers["expected"][ctrl], atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        (1.5, 0.3),
        (0.0, 1.0),
        (-0.1, 1.0),
        (0.3, float("inf")),
        (0.3,),
        (0.1, 1.0, 2.0),
        "ab",
        1.0,
        None,
    ],
)
def test_interaction_sd_range_invalid(bad):
    with pytest.raises(ValueError, match="interaction_sd_range"):
        simulate_screen(**SMALL, interaction_sd_range=bad)


# Values recorded from simulate_screen before it was split into one function per law: the
# same seed must keep giving the same screen (the order of the draws is part of the output).
RECORDED = [
    (
        {"n_holdout_pairs": 2},
        0,
        {
            "counts": 934763.0,
            "X": 38508.9327775836,
            "z": (-984.7044157598866, 322.25217537020217, 131.02084281438147),
            "first": ["cell_line_1|drug_1|1.0", "cell_line_1|control|0"],
            "library_size": 2822.062250228744,
            "holdout": ["cell_line_1|drug_1", "cell_line_2|drug_3"],
        },
    ),
    (
        {"interaction_rank": None, "n_holdout_pairs": 2},
        1,
        {
            "counts": 904743.0,
            "X": 46992.26693379879,
            "z": (306.9865636001341, -43.03214973048307, -93.15703119034879),
            "first": ["cell_line_0|drug_2|1.0", "cell_line_1|drug_2|1.0"],
            "library_size": 3570.8181994004567,
            "holdout": ["cell_line_0|drug_3", "cell_line_1|drug_0"],
        },
    ),
    (
        {
            "combinations": [("drug_0", "drug_1")],
            "as_sparse": True,
            "n_holdout_pairs": [("cell_line_1", "drug_0+drug_1")],
        },
        2,
        {
            "counts": 1154256.0,
            "X": 54977.059565901756,
            "z": (762.0800824621692, -10.419319710228592, -64.74625739757903),
            "first": ["cell_line_1|control|0", "cell_line_1|drug_1|0.1"],
            "library_size": 3054.1921320299016,
            "holdout": ["cell_line_1|drug_0+drug_1"],
        },
    ),
    (
        {"interaction_strength": 0.0},
        0,
        {
            "counts": 935583.0,
            "X": 39099.45477205515,
            "z": (-980.4370515951305, 316.9910347192781, 11.592594965128228),
            "first": ["cell_line_0|drug_1|0.1", "cell_line_1|drug_3|1.0"],
            "library_size": 2822.062250228744,
            "holdout": [],
        },
    ),
]


@pytest.mark.parametrize(("kwargs", "seed", "expected"), RECORDED)
def test_recorded_values(kwargs, seed, expected):
    a = simulate_screen(**SMALL, **kwargs, seed=seed)
    assert _dense(a.layers["counts"]).astype(np.float64).sum() == expected["counts"]
    np.testing.assert_allclose(_dense(a.X).astype(np.float64).sum(), expected["X"], rtol=1e-9)
    sums = [a.obsm[k].astype(np.float64).sum() for k in ("z_x_true", "z_t_true", "z_tx_true")]
    np.testing.assert_allclose(sums, expected["z"], rtol=1e-9)
    assert a.obs["condition"].iloc[:2].tolist() == expected["first"]
    np.testing.assert_allclose(a.obs["library_size"].iloc[0], expected["library_size"], rtol=1e-12)
    assert list(a.uns["fcr_simulation"]["holdout_pairs"]) == expected["holdout"]
    held = a.obs["split"] == "holdout"
    pairs = a.obs.loc[held, "cell_line"].astype(str) + "|" + a.obs.loc[held, "drug"].astype(str)
    assert sorted(set(pairs)) == sorted(expected["holdout"])
